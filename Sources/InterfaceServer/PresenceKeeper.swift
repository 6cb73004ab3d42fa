import ASGI
import Logging
import Synchronization

/// The sockets of this server tracked as present, by group: renewed by the keeper while they
/// are open.
final class PresenceRegistry: Sendable {
    private let tracked = Mutex<[String: Set<String>]>([:])

    func track(_ connection: String, in group: String) {
        tracked.withLock { _ = $0[group, default: []].insert(connection) }
    }

    func untrack(_ connection: String, in group: String) {
        tracked.withLock { all in
            all[group]?.remove(connection)
            if all[group]?.isEmpty == true { all[group] = nil }
        }
    }

    var snapshot: [String: Set<String>] { tracked.withLock { $0 } }
}

/// Presence changes of this server's sockets, gathered for a moment and told to each group as
/// one diff: a thousand sockets joining a room within a second are a few diffs to its members,
/// not a thousand (each to a thousand sockets). A user who joins and leaves within the moment
/// is no change at all.
final class PresenceDiffBatcher: Sendable {
    private struct State {
        var net: [String: [String: Int]] = [:]
        var scheduled = false
    }

    private let state = Mutex(State())
    let window: Duration

    init(window: Duration = .milliseconds(250)) { self.window = window }

    /// Adds a join (or a leave) of `user` in `group`; the first change of a moment schedules the
    /// send of the diffs when the moment is over.
    func add(_ group: String, user: String, joined: Bool, send: @escaping @Sendable ([PresenceDiff]) async -> Void) {
        let schedule = state.withLock { state -> Bool in
            state.net[group, default: [:]][user, default: 0] += joined ? 1 : -1
            defer { state.scheduled = true }
            return !state.scheduled
        }
        guard schedule else { return }
        let window = self.window
        Task {
            try? await Task.sleep(for: window)
            await send(self.take())
        }
    }

    /// The diffs gathered, emptied.
    func take() -> [PresenceDiff] {
        let net = state.withLock { state in
            defer {
                state.net = [:]
                state.scheduled = false
            }
            return state.net
        }
        return net.keys.sorted().compactMap { group in
            let changes = net[group]!
            let diff = PresenceDiff(
                group: group, joins: changes.filter { $0.value > 0 }.map(\.key).sorted(),
                leaves: changes.filter { $0.value < 0 }.map(\.key).sorted())
            return diff.isEmpty ? nil : diff
        }
    }
}

/// Renews the presence of this server's sockets every third of the presence TTL, and sweeps
/// out the connections nobody renewed (their server died), telling their groups who left.
/// Every server sweeps; a connection is removed (and its leave told) once.
struct PresenceKeeper {
    let server: ServerContext

    func run() async {
        guard let presence = server.layer as? any ChannelLayerPresence else { return }
        let ttl = server.configuration.presenceTTL
        var failures = 0
        while !Task.isCancelled {
            do {
                try await Task.sleep(for: ttl / 3)
            } catch {
                return
            }
            do {
                for (group, connections) in server.presence.snapshot {
                    try await presence.presenceRefresh(group, connections: Array(connections), ttl: ttl)
                }
                for diff in try await presence.presenceSweep() {
                    try await server.layer.sendGroup(diff.group, message: ["text": .string(PresenceText.diff(diff))])
                }
                failures = 0
            } catch {
                failures += 1
                if failures == 1 || failures % 30 == 0 {
                    server.logger.warning("presence renewal failed", metadata: ["error": "\(error)", "failures": "\(failures)"])
                }
            }
        }
    }
}
