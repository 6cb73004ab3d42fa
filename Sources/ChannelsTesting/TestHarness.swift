import ASGI
import Channels
import Logging
import Synchronization

/// One send a consumer made, as the harness saw it.
public struct SentMessage: Sendable, Hashable, CustomStringConvertible {
    /// Where a send went.
    public enum Destination: Sendable, Hashable {
        case channel(String)
        case group(String)
    }

    /// The channel or group sent to.
    public var to: Destination
    /// The message sent.
    public var message: Message

    /// The destination and the message, for test failure output.
    public var description: String {
        switch to {
        case .channel(let name): "-> \(name): \(message)"
        case .group(let name): "-> group \(name): \(message)"
        }
    }
}

/// A layer that forwards to another and records every send and group send, in order.
/// Everything else (the size limit, batches, groups, statistics) is the base layer's, through
/// `ForwardingChannelLayer`: a consumer under the harness may do what it may under `runserver`
/// on the same layer.
public final class RecordingLayer: ForwardingChannelLayer {
    /// The layer that does the work.
    public let base: any ChannelLayer
    private let log = Mutex<[SentMessage]>([])

    /// Records sends made on `base`.
    public init(_ base: any ChannelLayer = InMemoryChannelLayer()) { self.base = base }

    /// Everything sent so far.
    public var sent: [SentMessage] { log.withLock { $0 } }
    var count: Int { log.withLock { $0.count } }
    func sent(since index: Int) -> [SentMessage] { log.withLock { Array($0[min(index, $0.count)...]) } }

    /// Records the send, then sends on the base layer.
    public func send(_ message: Message, to channel: String) async throws(ChannelLayerError) {
        try await base.send(message, to: channel)
        log.withLock { $0.append(SentMessage(to: .channel(channel), message: message)) }
    }

    /// Records the group send, then sends on the base layer.
    public func sendGroup(_ group: String, message: Message) async throws(ChannelLayerError) {
        try await base.sendGroup(group, message: message)
        log.withLock { $0.append(SentMessage(to: .group(group), message: message)) }
    }
}

/// Runs an application's consumers without a server or worker processes: hand it a message,
/// get back what the consumers sent. Messages the consumers send to routed channels (a
/// `chat-messages` channel, re-queued messages) are run too when you call ``runPending(limit:)``.
///
/// ```swift
/// let harness = try TestHarness(routing)
/// let sent = try await harness.send(["path": "/hello/", "reply_channel": "test.reply?a"], to:
/// "http.request")
/// ```
public final class TestHarness: Sendable {
    /// The recording layer the consumers run on.
    public let layer: RecordingLayer
    /// The worker that dispatches to the consumers (one consumer at a time).
    public let worker: Worker
    /// Sessions and users the consumers see.
    public let environment: ConsumerEnvironment

    /// A harness for `routing` on `layer` (in memory by default).
    public init(
        _ routing: [RoutingEntry], layer: any ChannelLayer = InMemoryChannelLayer(),
        environment: ConsumerEnvironment = ConsumerEnvironment(),
        logger: Logger = Logger(label: "channels.test")
    ) throws {
        self.layer = RecordingLayer(layer)
        self.environment = environment
        self.worker = Worker(router: try Router(routing), layer: self.layer, concurrency: 1, environment: environment, logger: logger)
    }

    /// Sends `message` to `channel`, runs the consumer for it (and for whatever it queued on
    /// routed channels, when `runPending` is true) and returns every send made meanwhile.
    @discardableResult
    public func send(_ message: Message, to channel: String, runPending: Bool = true) async throws -> [SentMessage] {
        let start = layer.count
        try await layer.base.send(message, to: channel)
        guard let received = try await layer.base.receive(channels: [channel], timeout: .zero) else {
            throw TestClientError(.notReceived, "the message sent to '\(channel)' could not be received back")
        }
        await worker.dispatch(received)
        if runPending { try await self.runPending() }
        return layer.sent(since: start)
    }

    /// Runs consumers for every message waiting on a routed channel until none is left.
    /// Returns how many ran.
    @discardableResult
    public func runPending(limit: Int = 10_000) async throws -> Int {
        var ran = 0
        while ran < limit, let received = try await layer.base.receive(channels: worker.channels, timeout: .zero) {
            await worker.dispatch(received)
            ran += 1
        }
        return ran
    }

    /// The next message waiting on `channel` (a reply channel, say), or nil.
    public func receive(from channel: String, timeout: Duration = .zero) async throws -> Message? {
        try await layer.base.receive(channels: [channel], timeout: timeout)?.message
    }

    /// A fresh single-reader reply channel.
    public func newReplyChannel() async throws -> String { try await layer.base.newChannel("test.reply?") }
}

/// History and presence go to the base layer (`ForwardingChannelLayer`'s defaults).
extension RecordingLayer: ChannelLayerHistory, ChannelLayerPresence {}
