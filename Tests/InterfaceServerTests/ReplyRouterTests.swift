import ASGI
import Foundation
import Logging
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import InterfaceServer

/// A layer whose first non-blocking receive fails (a connection lost while the router collects
/// a hand-over); everything else goes to an in-memory layer.
final class FailingOnceLayer: ForwardingChannelLayer {
    let base: any ChannelLayer = InMemoryChannelLayer(configuration: .init(capacity: 10_000))
    private let failed = Atomic<Bool>(false)

    func receiveBatch(channels: [String], max: Int, timeout: Duration) async throws(ChannelLayerError) -> [ReceivedMessage] {
        if timeout <= .zero, failed.compareExchange(expected: false, desired: true, ordering: .relaxed).exchanged {
            throw ChannelLayerError(.connectionLost, "the test's layer lost its connection")
        }
        return try await base.receiveBatch(channels: channels, max: max, timeout: timeout)
    }
}

/// Takes replies and keeps what they said.
final class KeptReplies: ReplyReceiver, Sendable {
    let texts = Mutex<[String]>([])
    func receiveReply(_ reply: Message) { texts.withLock { $0.append(reply["text"]?.stringValue ?? "?") } }
    func replyStoreLost() {}
}

/// Takes batched replies and keeps what they said, with a "|" where a batch ended (a write).
final class KeptBatches: ReplyReceiver, Sendable {
    let seen = Mutex<[String]>([])
    func receiveReply(_ reply: Message) { seen.withLock { $0.append(reply["text"]?.stringValue ?? "?") } }
    func receiveBatchedReply(_ reply: Message, payloads: ReplyPayloads) { receiveReply(reply) }
    func endReplyBatch() { seen.withLock { $0.append("|") } }
    func replyStoreLost() {}
    func take() -> [String] {
        seen.withLock { seen in
            defer { seen = [] }; return seen
        }
    }
}

@Suite("reply router", .timeLimit(.minutes(1)))
struct ReplyRouterTests {
    /// A bundle's member list resolves once to its connections and is kept by identity; what is
    /// kept must follow every change: a connection gone, a name taken over by another, a name
    /// nobody held that is registered later. Each member gets every message of a hand-over, in
    /// order, and writes once (the "|").
    @Test func aKeptMemberListFollowsEveryChange() async throws {
        let router = ReplyRouter(layer: InMemoryChannelLayer(), prefix: "routertest", logger: Logger(label: "test"))
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let loops = [group.next(), group.next()]
        let names = (0..<10).map { _ in router.newReplyChannel() }
        var receivers = names.map { _ in KeptBatches() }
        func register(_ index: Int, _ receiver: KeptBatches) async throws {
            let loop = loops[index % 2]
            try await loop.submit { router.register(names[index], receiver, on: loop) }.get()
        }
        for index in names.indices { try await register(index, receivers[index]) }
        let list = BundleMemberList(names)
        func send(_ texts: [String], to list: BundleMemberList) async throws {
            router.deliver(texts.map { ReceivedBundle(members: list, message: ["text": .string($0)]) })
            // Both loops have run what was handed to them.
            for loop in loops { try await loop.submit {}.get() }
        }

        try await send(["a", "b"], to: list)
        for receiver in receivers { #expect(receiver.take() == ["a", "b", "|"]) }
        try await send(["c"], to: list)
        for receiver in receivers { #expect(receiver.take() == ["c", "|"]) }
        #expect(router.keptListCount == 1, "the list was not kept")
        #expect(router.listHandOvers.load(ordering: .relaxed) == 2)

        // Taken over: the new connection gets it, the old one nothing.
        let takenOver = receivers[3]
        receivers[3] = KeptBatches()
        try await register(3, receivers[3])
        try await send(["d"], to: list)
        #expect(takenOver.take().isEmpty, "a connection that lost its name still got the message")
        for receiver in receivers { #expect(receiver.take() == ["d", "|"]) }

        // Gone: the others get it, the message for it is counted as unroutable.
        try await loops[1].submit { router.unregister(names[5]) }.get()
        try await send(["e"], to: list)
        #expect(receivers[5].take().isEmpty, "a connection that is gone still got the message")
        for (index, receiver) in receivers.enumerated() where index != 5 { #expect(receiver.take() == ["e", "|"]) }
        #expect(router.unroutableCount == 1)
        try await send(["f"], to: list)
        #expect(router.unroutableCount == 2)
        #expect(receivers[5].take().isEmpty)
        for (index, receiver) in receivers.enumerated() where index != 5 { #expect(receiver.take() == ["f", "|"]) }

        // Registered again (a name nobody held): the list reaches it again.
        receivers[5] = KeptBatches()
        try await register(5, receivers[5])
        let before = router.listHandOvers.load(ordering: .relaxed)
        try await send(["g"], to: list)
        for receiver in receivers { #expect(receiver.take() == ["g", "|"]) }
        #expect(router.unroutableCount == 2)
        #expect(router.listHandOvers.load(ordering: .relaxed) == before + 1, "the list was not resolved again")

        // Several lists in one hand-over, a reply of its own to one member, and a list with a
        // name held nowhere: each connection takes its messages in order, and writes once per
        // run of one list.
        let other = BundleMemberList(Array(names.prefix(4)))
        let partly = BundleMemberList([names[8], router.processChannel + "gone", names[9]])
        let handOvers = router.listHandOvers.load(ordering: .relaxed)
        router.deliver([
            ReceivedBundle(members: list, message: ["text": "h"]), ReceivedBundle(members: list, message: ["text": "i"]),
            ReceivedBundle(members: other, message: ["text": "j"]), ReceivedBundle(channel: names[2], message: ["text": "k"]),
            ReceivedBundle(members: partly, message: ["text": "l"]), ReceivedBundle(members: list, message: ["text": "m"]),
        ])
        for loop in loops { try await loop.submit {}.get() }
        for (index, receiver) in receivers.enumerated() {
            var expected = ["h", "i", "|"]
            if index < 4 { expected += ["j", "|"] }
            if index == 2 { expected += ["k", "|"] }
            if index >= 8 { expected += ["l", "|"] }
            expected += ["m", "|"]
            #expect(receiver.take() == expected, "member \(index)")
        }
        #expect(router.listHandOvers.load(ordering: .relaxed) == handOvers + 3, "the resolved runs were looked up member by member")
        #expect(router.unroutableCount == 3)

        // A name listed twice (a crafted body): its copies stay in order, message by message.
        let twice = BundleMemberList([names[0], names[0], names[1]])
        router.deliver([ReceivedBundle(members: twice, message: ["text": "n"]), ReceivedBundle(members: twice, message: ["text": "o"])])
        for loop in loops { try await loop.submit {}.get() }
        #expect(receivers[0].take() == ["n", "n", "o", "o", "|"])
        #expect(receivers[1].take() == ["n", "o", "|"])
        try await group.shutdownGracefully()
    }

    /// Swift compares strings as characters: a name with a Kelvin sign where a socket's has a
    /// K is the same key to a dictionary of strings. Only the exact bytes of a registered name
    /// reach its connection (an asgi_redis sender allows Unicode letters in names).
    @Test func onlyTheExactBytesOfANameReachItsConnection() async throws {
        let router = ReplyRouter(layer: InMemoryChannelLayer(), prefix: "routertest", logger: Logger(label: "test"))
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        var channel = router.newReplyChannel()
        while !channel.dropFirst(router.processChannel.count).contains("K") { channel = router.newReplyChannel() }
        let kept = KeptReplies()
        try await loop.submit { router.register(channel, kept, on: loop) }.get()
        let alias = channel.replacingOccurrences(of: "K", with: "\u{212A}")
        #expect(alias == channel, "Swift's own comparison calls them equal")
        #expect(router.isOpen(channel) && !router.isOpen(alias))
        #expect(
            router.targetKey(alias).hasPrefix("!") && router.targetKey(channel) == String(channel.dropFirst(router.processChannel.count)))
        router.deliver(["text": "alias"], to: alias)
        router.deliver(["text": "real"], to: channel)
        try await Task.sleep(for: .milliseconds(100))
        #expect(kept.texts.withLock { $0 } == ["real"])
    }

    /// 100 replies wait; the router takes 64, and its next take (collecting the hand-over) fails.
    /// The 64 it holds are delivered all the same, and the other 36 after its back-off.
    @Test func repliesTakenBeforeAFailedTakeAreDelivered() async throws {
        let layer = FailingOnceLayer()
        let router = ReplyRouter(layer: layer, prefix: "routertest", logger: Logger(label: "test"))
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let kept = KeptReplies()
        let channels = (0..<100).map { _ in router.newReplyChannel() }
        // Registered on the loop the replies are handed over on, as connections do.
        try await loop.submit { for channel in channels { router.register(channel, kept, on: loop) } }.get()
        for (index, channel) in channels.enumerated() {
            try await layer.send(["text": .string("reply \(index)")], to: channel)
        }
        let running = Task { await router.run() }
        var waited = 0
        while kept.texts.withLock({ $0.count }) < 100, waited < 1_000 {
            try await Task.sleep(for: .milliseconds(10))
            waited += 1
        }
        running.cancel()
        await running.value
        let texts = kept.texts.withLock { $0 }
        #expect(texts.count == 100, "\(texts.count) of 100 replies delivered: taken replies were dropped with the failed take")
        #expect(Set(texts) == Set((0..<100).map { "reply \($0)" }))
        #expect(router.unroutableCount == 0)
    }
}
