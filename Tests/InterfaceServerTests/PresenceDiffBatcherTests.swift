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
        batcher.add("room", user: "alice", joined: true, version: 10, send: send)
        batcher.add("room", user: "alice", joined: false, version: 11, send: send)
        batcher.add("room", user: "bob", joined: true, version: 12, send: send)
        batcher.add("room", user: "carol", joined: false, version: 13, send: send)
        batcher.add("other", user: "dan", joined: true, version: 5, send: send)
        try await waitFor(sent, count: 1)
        #expect(
            sent.all.first == [
                PresenceDiff(group: "other", joins: ["dan"], versions: ["dan": 5]),
                PresenceDiff(group: "room", joins: ["bob"], leaves: ["alice", "carol"], versions: ["alice": 11, "bob": 12, "carol": 13]),
            ])
    }

    @Test("a change that finished after a later one of the same user does not undo it")
    func theHigherVersionWins() async throws {
        let batcher = PresenceDiffBatcher(window: .milliseconds(50))
        let sent = Sent()
        let send: @Sendable ([PresenceDiff]) async -> Void = { diffs in sent.diffs.withLock { $0.append(diffs) } }
        // The join (version 21) was told first; the leave before it (version 20) comes late.
        batcher.add("room", user: "alice", joined: true, version: 21, send: send)
        batcher.add("room", user: "alice", joined: false, version: 20, send: send)
        try await waitFor(sent, count: 1)
        #expect(sent.all.first == [PresenceDiff(group: "room", joins: ["alice"], versions: ["alice": 21])])
    }

    @Test("the frames carry the versions a client orders a user's changes by")
    func framesCarryVersions() {
        #expect(
            PresenceText.diff(PresenceDiff(group: "g", joins: ["b\"q"], leaves: ["a"], versions: ["a": 7, "b\"q": 9]))
                == #"{"type":"presence_diff","joins":["b\"q"],"leaves":["a"],"versions":{"a":7,"b\"q":9}}"#)
        #expect(
            PresenceText.list([PresenceMember(user: "a", connections: 2, meta: "{}")], version: 42)
                == #"{"type":"presence","users":["a"],"version":42}"#)
        // Never lower than the last, even when the clock is behind it.
        #expect(PresenceVersion.next(after: Int64.max / 2) == Int64.max / 2 + 1)
        let now = PresenceVersion.next(after: 0)
        #expect(now > 1_700_000_000_000_000 && PresenceVersion.next(after: now) > now)
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
        batcher.add("room", user: "erin", joined: true, version: 1, send: slowFirst)
        // The first moment is over (its diffs taken, its send under way): the leave is the next one's.
        for _ in 0..<500 where !firstStarted.load(ordering: .relaxed) { try await Task.sleep(for: .milliseconds(5)) }
        batcher.add("room", user: "erin", joined: false, version: 2, send: slowFirst)
        try await waitFor(sent, count: 2)
        #expect(
            sent.all == [
                [PresenceDiff(group: "room", joins: ["erin"], versions: ["erin": 1])],
                [PresenceDiff(group: "room", leaves: ["erin"], versions: ["erin": 2])],
            ])
    }
}
