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
