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

@Suite("reply router", .timeLimit(.minutes(1)))
struct ReplyRouterTests {
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
