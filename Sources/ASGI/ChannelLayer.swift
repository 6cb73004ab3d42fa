/// A message taken off a channel, with the full name of the channel it was sent to.
public struct ReceivedMessage: Sendable, Hashable {
    /// The channel the message was received from (the full name for `!` channels).
    public var channel: String
    /// The message.
    public var message: Message

    /// A message received from `channel`.
    public init(channel: String, message: Message) {
        self.channel = channel
        self.message = message
    }
}

/// Counters for one channel.
public struct ChannelStatistics: Sendable, Hashable, Codable {
    /// Messages sent to the channel (within the counter's lifetime).
    public var messagesCount: Int
    /// Sends refused because the channel was full.
    public var channelFullCount: Int
    /// Messages waiting now.
    public var messagesPending: Int
    /// Age in seconds of the oldest waiting message.
    public var messagesMaxAge: Double

    /// Statistics with every figure given (zero by default).
    public init(messagesCount: Int = 0, channelFullCount: Int = 0, messagesPending: Int = 0, messagesMaxAge: Double = 0) {
        self.messagesCount = messagesCount
        self.channelFullCount = channelFullCount
        self.messagesPending = messagesPending
        self.messagesMaxAge = messagesMaxAge
    }
}

/// Counters for the whole layer.
public struct GlobalStatistics: Sendable, Hashable, Codable {
    /// Messages sent since the layer's statistics began.
    public var messagesCount: Int
    /// Sends refused because a channel was full.
    public var channelFullCount: Int
    /// Bodies that could not be decoded and were skipped by this process's receives.
    public var malformedMessagesDropped: Int

    /// Statistics with every figure given (zero by default).
    public init(messagesCount: Int = 0, channelFullCount: Int = 0, malformedMessagesDropped: Int = 0) {
        self.messagesCount = messagesCount
        self.channelFullCount = channelFullCount
        self.malformedMessagesDropped = malformedMessagesDropped
    }
}

/// An ASGI 1.0 channel layer: named, expiring FIFO queues with groups.
///
/// Delivery is at most once and FIFO per channel for one reader. Every operation validates
/// the names it is given and throws ``ChannelLayerError`` with code `invalidName` for a bad one.
public protocol ChannelLayer: Sendable {
    /// The extensions this layer supports: `groups`, `flush`, `statistics`.
    var extensions: Set<String> { get }

    /// Sends a message; never waits. Throws `channelFull` when the channel is at capacity and
    /// `messageTooLarge` past the size limit.
    func send(_ message: Message, to channel: String) async throws

    /// Takes the next message from any of `channels`. With a zero timeout it does not wait;
    /// otherwise it waits (without polling) up to `timeout` and returns nil if nothing came.
    /// A `prefix!` name receives every `prefix!*` message under its full name.
    func receive(channels: [String], timeout: Duration) async throws -> ReceivedMessage?

    /// A fresh single-reader channel name: `pattern` (ending in `?`) plus random letters.
    func newChannel(_ pattern: String) async throws -> String

    func groupAdd(_ group: String, channel: String) async throws
    func groupDiscard(_ group: String, channel: String) async throws
    /// The current members of a group (expired members excluded).
    func groupChannels(_ group: String) async throws -> [String]
    /// Sends to every member; a full member is skipped, never an error.
    func sendGroup(_ group: String, message: Message) async throws

    /// Removes every message, group and counter of the layer.
    func flush() async throws

    func globalStatistics() async throws -> GlobalStatistics
    func channelStatistics(_ channel: String) async throws -> ChannelStatistics

    /// Releases connections and threads. Calls after `close` throw `closed`.
    func close() async

    /// Registers (or renews) this process as the reader of `processChannel` (a `prefix!` name),
    /// one that understands bundled group messages: a group send then stores one message per
    /// process channel, carrying the list of its members, instead of one per member. Readers
    /// that never register (Daphne 1.4 on asgi_redis) keep getting one message per member.
    ///
    /// Call it when the reader starts and then periodically. Returns false when a registration
    /// made earlier by this layer is gone: the store lost its data (a Redis restarted empty),
    /// and with it every group membership of this process's channels.
    func registerBundleReader(_ processChannel: String) async throws -> Bool

    /// The largest encoded message a send accepts.
    var maxMessageSize: Int { get }

    /// Waits like `receive`, then takes up to `max` messages in all (FIFO per channel), for
    /// readers that dispatch in order and want fewer round trips under load. Empty when the
    /// timeout passed with nothing.
    func receiveBatch(channels: [String], max: Int, timeout: Duration) async throws -> [ReceivedMessage]
}

extension ChannelLayer {
    /// The ASGI extensions every layer here implements.
    public var extensions: Set<String> { ["groups", "flush", "statistics"] }

    /// A layer that cannot lose its data and delivers group sends to process channels as it
    /// sees fit needs no registration.
    public func registerBundleReader(_ processChannel: String) async throws -> Bool { true }

    /// The ASGI default: 1 MiB.
    public var maxMessageSize: Int { 1024 * 1024 }

    /// A non-blocking receive.
    public func receive(channels: [String]) async throws -> ReceivedMessage? {
        try await receive(channels: channels, timeout: .zero)
    }

    /// Default: one `receive`, as a batch of at most one.
    public func receiveBatch(channels: [String], max: Int, timeout: Duration) async throws -> [ReceivedMessage] {
        guard let first = try await receive(channels: channels, timeout: timeout) else { return [] }
        var batch = [first]
        while batch.count < max, let next = try await receive(channels: channels, timeout: .zero) { batch.append(next) }
        return batch
    }
}

/// What an operator's tools (`stats`, the operations page) may ask a layer beyond ASGI: which
/// channels hold messages and which groups exist. Layers that can answer adopt it; tools ask
/// with `layer as? any ChannelLayerInspection` and show less when a layer cannot.
public protocol ChannelLayerInspection: ChannelLayer {
    /// Names of the channels that hold messages now (the non-local `prefix!` form for process channels).
    func pendingChannels() async throws -> [String]
    /// Names of the groups that have members now.
    func groups() async throws -> [String]
    /// A short description of where the layer keeps its data, for logs and pages (no passwords).
    var location: String { get }
}

/// The reserved key that carries the full name of a `!` channel inside a stored message.
public let asgiChannelKey = "__asgi_channel__"

extension Duration {
    /// The duration in seconds as a Double.
    public var seconds: Double {
        let (s, atto) = components
        return Double(s) + Double(atto) / 1e18
    }

    /// The duration in whole nanoseconds (saturating at `Int64`'s bounds).
    public var nanoseconds: Int64 {
        let (s, atto) = components
        let (whole, overflow) = s.multipliedReportingOverflow(by: 1_000_000_000)
        if overflow { return s < 0 ? .min : .max }
        return whole.addingReportingOverflow(atto / 1_000_000_000).overflow ? .max : whole + atto / 1_000_000_000
    }
}
