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

    var snapshot: [String: [String]] { followers.withLock { $0.mapValues { $0.sorted() } } }
}

/// Puts back the member sets of followed groups that vanished while their sockets are
/// connected: Redis under `maxmemory` with an eviction policy can evict a group's sorted set,
/// and then nobody in it gets the group's messages, with no error anywhere. Every
/// `--group-check-interval` this server asks the layer to re-create each followed group that is
/// gone with the followers it knows (``ChannelLayerHistory/groupRestore(_:channels:window:)``):
/// one script call per group, nothing when the set is there. Messages sent while the set was
/// gone are in the group's history, and the sockets' tail check writes them.
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
            do {
                for (group, channels) in server.followers.snapshot {
                    let added = try await history.groupRestore(group, channels: channels, window: interval * 3)
                    guard added > 0 else { continue }
                    Self.restored.increment(by: added)
                    server.logger.warning(
                        "a followed group's member set was gone (evicted under maxmemory, or deleted); its followers on this server were added back",
                        metadata: ["group": "\(group)", "added": "\(added)"])
                }
                failures = 0
            } catch {
                failures += 1
                if failures == 1 || failures % 30 == 0 {
                    server.logger.warning("the followed groups' check failed", metadata: ["error": "\(error)", "failures": "\(failures)"])
                }
            }
        }
    }
}
