import ASGI
import Synchronization
import Testing

@testable import InterfaceServer

/// The presence diff batcher: each user told in its last state of a moment (never left out),
/// moments sent one after the other.
@Suite("presence diff batcher", .timeLimit(.minutes(1)))
struct PresenceDiffBatcherTests {
    final class Sent: Sendable {
        let diffs = Mutex<[[PresenceDiff]]>([])
        var all: [[PresenceDiff]] { diffs.withLock { $0 } }
    }

    private func waitFor(_ sent: Sent, count: Int) async throws {
        for _ in 0..<500 where sent.all.count < count { try await Task.sleep(for: .milliseconds(10)) }
        #expect(sent.all.count == count)
    }

    @Test("a moment's changes are one diff, each user in its last state; a join then a leave is a leave")
    func lastStateWins() async throws {
        let batcher = PresenceDiffBatcher(window: .milliseconds(50))
        let sent = Sent()
        let send: @Sendable ([PresenceDiff]) async -> Void = { diffs in sent.diffs.withLock { $0.append(diffs) } }
        batcher.add("room", user: "alice", joined: true, send: send)
        batcher.add("room", user: "alice", joined: false, send: send)
        batcher.add("room", user: "bob", joined: true, send: send)
        batcher.add("room", user: "carol", joined: false, send: send)
        batcher.add("other", user: "dan", joined: true, send: send)
        try await waitFor(sent, count: 1)
        #expect(
            sent.all.first == [
                PresenceDiff(group: "other", joins: ["dan"]), PresenceDiff(group: "room", joins: ["bob"], leaves: ["alice", "carol"]),
            ])
    }

    @Test("a join and a leave in two moments are two diffs, in order, even when the first send is slow")
    func momentsInOrder() async throws {
        let batcher = PresenceDiffBatcher(window: .milliseconds(30))
        let sent = Sent()
        let firstStarted = Atomic<Bool>(false)
        let slowFirst: @Sendable ([PresenceDiff]) async -> Void = { diffs in
            if diffs.first?.joins == ["erin"] {
                firstStarted.store(true, ordering: .relaxed)
                try? await Task.sleep(for: .milliseconds(200))
            }
            sent.diffs.withLock { $0.append(diffs) }
        }
        batcher.add("room", user: "erin", joined: true, send: slowFirst)
        // The first moment is over (its diffs taken, its send under way): the leave is the next one's.
        for _ in 0..<500 where !firstStarted.load(ordering: .relaxed) { try await Task.sleep(for: .milliseconds(5)) }
        batcher.add("room", user: "erin", joined: false, send: slowFirst)
        try await waitFor(sent, count: 2)
        #expect(sent.all == [[PresenceDiff(group: "room", joins: ["erin"])], [PresenceDiff(group: "room", leaves: ["erin"])]])
    }
}
