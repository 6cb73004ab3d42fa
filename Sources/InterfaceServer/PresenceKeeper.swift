import ASGI
import Logging
import Synchronization

/// The sockets of this server tracked as present, by group: renewed by the keeper while they
/// are open.
final class PresenceRegistry: Sendable {
    private let tracked = Mutex<[String: [String: PresenceConnection]]>([:])

    func track(_ connection: PresenceConnection, in group: String) {
        tracked.withLock { $0[group, default: [:]][connection.connection] = connection }
    }

    func untrack(_ connection: String, in group: String) {
        tracked.withLock { all in
            all[group]?.removeValue(forKey: connection)
            if all[group]?.isEmpty == true { all[group] = nil }
        }
    }

    func isTracked(_ connection: String, in group: String) -> Bool {
        tracked.withLock { $0[group]?[connection] != nil }
    }

    var snapshot: [String: [PresenceConnection]] { tracked.withLock { $0.mapValues { Array($0.values) } } }
}

/// Presence changes of this server's sockets, gathered for a moment and told to each group as
/// one diff: a thousand sockets joining a room within a second are a few diffs to its members,
/// not a thousand (each to a thousand sockets). Each user is told in its last state of the
/// moment (the change with the highest version: a join then a leave is a leave), never left
/// out: a diff that says what a client already knows is harmless, one that is missing leaves a
/// ghost. The moments' diffs are sent in order, one moment after the other; across servers
/// the versions put them in order (a client applies a user's change only when it is newer).
final class PresenceDiffBatcher: Sendable {
    private struct State {
        /// Per group, each user's last change (true: joined) and its version.
        var last: [String: [String: (joined: Bool, version: Int64)]] = [:]
        var scheduled = false
        /// The previous moment's sending, which the next one waits for.
        var sending: Task<Void, Never>?
    }

    private let state = Mutex(State())
    let window: Duration

    init(window: Duration = .milliseconds(250)) { self.window = window }

    /// Adds a join (or a leave) of `user` in `group`; the first change of a moment schedules the
    /// send of the diffs when the moment is over.
    func add(
        _ group: String, user: String, joined: Bool, version: Int64, send: @escaping @Sendable ([PresenceDiff]) async -> Void
    ) {
        state.withLock { state in
            if let known = state.last[group]?[user], known.version > version {
                // A later change of this user is already here (calls can finish out of order).
            } else {
                state.last[group, default: [:]][user] = (joined, version)
            }
            guard !state.scheduled else { return }
            state.scheduled = true
            let previous = state.sending
            let window = self.window
            state.sending = Task {
                try? await Task.sleep(for: window)
                let diffs = self.take()
                await previous?.value
                await send(diffs)
            }
        }
    }

    /// The diffs gathered, emptied.
    func take() -> [PresenceDiff] {
        let last = state.withLock { state in
            defer {
                state.last = [:]
                state.scheduled = false
            }
            return state.last
        }
        return last.keys.sorted().map { group in
            let changes = last[group]!
            return PresenceDiff(
                group: group, joins: changes.filter { $0.value.joined }.map(\.key).sorted(),
                leaves: changes.filter { !$0.value.joined }.map(\.key).sorted(),
                versions: changes.mapValues(\.version))
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
                    // Swept while this server stalled past the TTL: tracked again, and said so.
                    let renewal = try await presence.presenceRefresh(group, connections: connections, ttl: ttl)
                    for connection in renewal.back {
                        if server.presence.isTracked(connection.connection, in: group) {
                            server.tellPresence(group, user: connection.user, joined: true, version: renewal.version)
                        } else {
                            // It left while this renewal was on its way (and was put back by it): out again.
                            let change = try await presence.presenceLeave(group, connection: connection.connection, user: connection.user)
                            if change.changed {
                                server.tellPresence(group, user: connection.user, joined: false, version: change.version)
                            }
                        }
                    }
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
