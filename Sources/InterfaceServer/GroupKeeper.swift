import ASGI
import CoreMetrics
import Logging
import Synchronization

/// The groups this server's sockets follow (with history), and which sockets: the server added
/// them to those groups itself (``WebSocketSession`` joins a followed group before reading its
/// history), so it knows the members a vanished group set must get back.
final class FollowerRegistry: Sendable {
    private let followers = Mutex<[String: Set<String>]>([:])

    func add(_ channel: String, to group: String) {
        followers.withLock { _ = $0[group, default: []].insert(channel) }
    }

    func remove(_ channel: String, from group: String) {
        followers.withLock { all in
            all[group]?.remove(channel)
            if all[group]?.isEmpty == true { all[group] = nil }
        }
    }

    func contains(_ channel: String, in group: String) -> Bool {
        followers.withLock { $0[group]?.contains(channel) ?? false }
    }

    var snapshot: [String: [String]] { followers.withLock { $0.mapValues { $0.sorted() } } }
}

/// Keeps the sockets that follow a group (with history) in its member set while they follow:
/// Redis under `maxmemory` with an eviction policy can evict a group's sorted set, and then
/// nobody in it gets the group's messages, with no error anywhere; a member can also expire
/// (`group_expiry`) while its socket is open. Every `--group-check-interval` this server asks
/// the layer to add back each of its followers missing from its group
/// (``ChannelLayerHistory/groupRestore(_:channels:)``: one script per group, nothing written
/// when all are there). A socket that closed while that call was on its way is taken out again
/// (its disconnect may already have discarded it: re-added, it would be a dead member for a
/// day). Messages sent while followers were missing are in the group's history, and the
/// sockets' tail check writes them.
struct GroupKeeper {
    let server: ServerContext

    static let restored = Counter(label: "channels_group_members_restored_total")

    func run() async {
        let interval = server.configuration.groupCheckInterval
        guard interval > .zero, let history = server.layer as? any ChannelLayerHistory else { return }
        var failures = 0
        while !Task.isCancelled {
            do {
                try await Task.sleep(for: interval)
            } catch {
                return
            }
            var failed: (any Error)?
            for (group, channels) in server.followers.snapshot {
                // One group's failure (its shard down) does not stop the others' check.
                do {
                    let added = try await history.groupRestore(group, channels: channels)
                    guard !added.isEmpty else { continue }
                    let gone = added.filter { !server.followers.contains($0, in: group) }
                    if !gone.isEmpty { try await history.groupRemove(group, channels: gone) }
                    let back = added.count - gone.count
                    guard back > 0 else { continue }
                    Self.restored.increment(by: back)
                    server.logger.warning(
                        "sockets that follow a group were missing from its member set (evicted under maxmemory, expired or deleted); added back",
                        metadata: ["group": "\(group)", "added": "\(back)"])
                } catch {
                    failed = error
                }
            }
            if let failed {
                failures += 1
                if failures == 1 || failures % 30 == 0 {
                    server.logger.warning("the followed groups' check failed", metadata: ["error": "\(failed)", "failures": "\(failures)"])
                }
            } else {
                failures = 0
            }
        }
    }
}
