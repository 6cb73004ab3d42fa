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
public final class RecordingLayer: ChannelLayer {
    /// The layer that does the work.
    public let base: any ChannelLayer
    private let log = Mutex<[SentMessage]>([])

    /// Records sends made on `base`.
    public init(_ base: any ChannelLayer = InMemoryChannelLayer()) { self.base = base }

    /// The base layer's limit: a consumer under the harness may send what it may under
    /// `runserver` on the same layer (not the protocol's 1 MiB default).
    public var maxMessageSize: Int { base.maxMessageSize }

    /// Everything sent so far.
    public var sent: [SentMessage] { log.withLock { $0 } }
    var count: Int { log.withLock { $0.count } }
    func sent(since index: Int) -> [SentMessage] { log.withLock { Array($0[min(index, $0.count)...]) } }

    /// Records the send, then sends on the base layer.
    public func send(_ message: Message, to channel: String) async throws {
        try await base.send(message, to: channel)
        log.withLock { $0.append(SentMessage(to: .channel(channel), message: message)) }
    }

    /// Records the group send, then sends on the base layer.
    public func sendGroup(_ group: String, message: Message) async throws {
        try await base.sendGroup(group, message: message)
        log.withLock { $0.append(SentMessage(to: .group(group), message: message)) }
    }

    /// Receives from the base layer.
    public func receive(channels: [String], timeout: Duration) async throws -> ReceivedMessage? {
        try await base.receive(channels: channels, timeout: timeout)
    }

    /// A new channel name from the base layer.
    public func newChannel(_ pattern: String) async throws -> String { try await base.newChannel(pattern) }
    /// Adds to a group on the base layer.
    public func groupAdd(_ group: String, channel: String) async throws { try await base.groupAdd(group, channel: channel) }
    /// Removes from a group on the base layer.
    public func groupDiscard(_ group: String, channel: String) async throws { try await base.groupDiscard(group, channel: channel) }
    /// A group's members on the base layer.
    public func groupChannels(_ group: String) async throws -> [String] { try await base.groupChannels(group) }
    /// Flushes the base layer.
    public func flush() async throws { try await base.flush() }
    /// The base layer's global statistics.
    public func globalStatistics() async throws -> GlobalStatistics { try await base.globalStatistics() }
    /// The base layer's statistics for one channel.
    public func channelStatistics(_ channel: String) async throws -> ChannelStatistics { try await base.channelStatistics(channel) }
    /// Closes the base layer.
    public func close() async { await base.close() }
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
            throw ChannelLayerError(.backendError, "the message sent to '\(channel)' could not be received back")
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

extension RecordingLayer: ChannelLayerHistory, ChannelLayerPresence {
    private var metered: MeteredChannelLayer { MeteredChannelLayer(base) }

    /// Forwards to the base layer (see `ChannelLayerHistory`).
    public func historyAppend(_ group: String, message: Message, retention: HistoryRetention) async throws -> StreamPosition {
        try await metered.historyAppend(group, message: message, retention: retention)
    }

    /// Forwards to the base layer (see `ChannelLayerHistory`).
    public func historyRead(_ group: String, after position: StreamPosition?, retention: HistoryRetention) async throws -> HistorySlice {
        try await metered.historyRead(group, after: position, retention: retention)
    }

    /// Forwards to the base layer (see `ChannelLayerHistory`).
    public func groupRestore(_ group: String, channels: [String]) async throws -> [String] {
        try await metered.groupRestore(group, channels: channels)
    }

    /// Forwards to the base layer (see `ChannelLayerHistory`).
    public func groupRemove(_ group: String, channels: [String]) async throws {
        try await metered.groupRemove(group, channels: channels)
    }

    /// Forwards to the base layer (see `ChannelLayerHistory`).
    public func groupCheck(
        processChannel: String, followers: [String: [String]], isOpen: @Sendable (String) -> Bool
    ) async throws -> GroupCheck {
        try await metered.groupCheck(processChannel: processChannel, followers: followers, isOpen: isOpen)
    }

    /// Forwards to the base layer (see `ChannelLayerPresence`).
    public func presenceJoin(_ group: String, connection: String, user: String, meta: String, ttl: Duration) async throws
        -> PresenceChange
    {
        try await metered.presenceJoin(group, connection: connection, user: user, meta: meta, ttl: ttl)
    }

    /// Forwards to the base layer (see `ChannelLayerPresence`).
    public func presenceLeave(_ group: String, connection: String, user: String) async throws -> PresenceChange {
        try await metered.presenceLeave(group, connection: connection, user: user)
    }

    /// Forwards to the base layer (see `ChannelLayerPresence`).
    public func presenceRefresh(_ group: String, connections: [PresenceConnection], ttl: Duration) async throws -> PresenceRenewal {
        try await metered.presenceRefresh(group, connections: connections, ttl: ttl)
    }

    /// Forwards to the base layer (see `ChannelLayerPresence`).
    public func presenceSnapshot(_ group: String) async throws -> PresenceSnapshot {
        try await metered.presenceSnapshot(group)
    }

    /// Forwards to the base layer (see `ChannelLayerPresence`).
    public func presenceSweep() async throws -> [PresenceDiff] {
        try await metered.presenceSweep()
    }
}
