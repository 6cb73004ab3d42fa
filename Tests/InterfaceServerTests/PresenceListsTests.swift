import ASGI
import Synchronization
import Testing

@testable import InterfaceServer

/// A layer whose presence list is read at once and answered 50 ms later: a socket that joins
/// meanwhile is not in it.
final class SlowPresenceLayer: ForwardingChannelLayer, ChannelLayerPresence {
    let memory = InMemoryChannelLayer()
    var base: any ChannelLayer { memory }
    let reads = Atomic<Int>(0)
    /// Reads still to refuse.
    let refusing = Atomic<Int>(0)

    func presenceSnapshot(_ group: String) async throws(ChannelLayerError) -> PresenceSnapshot {
        reads.add(1, ordering: .relaxed)
        if refusing.load(ordering: .relaxed) > 0 {
            refusing.subtract(1, ordering: .relaxed)
            throw ChannelLayerError(.connectionLost, "refused (test)")
        }
        let snapshot = try await memory.presenceSnapshot(group)
        try? await Task.sleep(for: .milliseconds(50))
        return snapshot
    }
}

@Suite("presence lists for joining sockets", .timeLimit(.minutes(1)))
struct PresenceListsTests {
    /// 100 sockets join one group over a few hundred milliseconds and each asks for its list:
    /// every list it gets was read after its own join (it is in it), and the reads are shared
    /// (one at a time, each answering every socket that asked before it began).
    @Test func eachJoinerGetsAListReadAfterItsJoinAndReadsAreShared() async throws {
        let layer = SlowPresenceLayer()
        let lists = PresenceLists()
        let count = 100
        let missing = await withTaskGroup(of: Bool.self) { group in
            for index in 0..<count {
                group.addTask {
                    try? await Task.sleep(for: .milliseconds(3 * index))
                    let user = "user-\(index)"
                    _ = try? await layer.presenceJoin("room", connection: "c\(index)", user: user, meta: "{}", ttl: .seconds(60))
                    guard let list = await lists.list("room", from: layer) else { return true }
                    return !list.snapshot.members.contains { $0.user == user }
                }
            }
            var missing = 0
            for await absent in group where absent { missing += 1 }
            return missing
        }
        #expect(missing == 0, "\(missing) sockets got a list read before their own join")
        let reads = layer.reads.load(ordering: .relaxed)
        #expect(reads == lists.reads.load(ordering: .relaxed))
        #expect(reads <= count / 2, "reads shared: \(reads) reads for \(count) sockets")
    }

    /// A read that fails is tried again before the sockets waiting for it are answered: one
    /// failure does not leave every socket of a storm without its list.
    @Test func aFailedReadIsTriedAgain() async throws {
        let lists = PresenceLists()
        let layer = SlowPresenceLayer()
        _ = try await layer.presenceJoin("room", connection: "c1", user: "ann", meta: "{}", ttl: .seconds(60))
        layer.refusing.store(2, ordering: .relaxed)
        #expect(await lists.list("room", from: layer)?.snapshot.members.map(\.user) == ["ann"])
        #expect(layer.reads.load(ordering: .relaxed) == 3, "two refused, the third answered")
        layer.refusing.store(10, ordering: .relaxed)
        #expect(await lists.list("room", from: layer) == nil, "refused every time: nil, after a few tries")
    }

    /// A list is not kept: a socket that asks after a read ended gets a read of its own.
    @Test func aListIsNotKeptForLaterJoiners() async throws {
        let lists = PresenceLists()
        let layer = SlowPresenceLayer()
        _ = try await layer.presenceJoin("room", connection: "c1", user: "ann", meta: "{}", ttl: .seconds(60))
        #expect(await lists.list("room", from: layer)?.snapshot.members.map(\.user) == ["ann"])
        _ = try await layer.presenceJoin("room", connection: "c2", user: "bob", meta: "{}", ttl: .seconds(60))
        let second = await lists.list("room", from: layer)
        #expect(second?.snapshot.members.map(\.user) == ["ann", "bob"], "read again, not kept")
        #expect(second?.text == PresenceText.list(second?.snapshot.members ?? [], version: second?.snapshot.version ?? -1))
    }
}
