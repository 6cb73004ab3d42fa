/// An error from a channel layer operation.
///
/// A struct with an extensible ``Code`` rather than an enum, so new failure kinds can be
/// added without breaking callers that switch over the ones they handle.
public struct ChannelLayerError: Error, Sendable, CustomStringConvertible {
    /// What kind of failure; compare with the static codes (`channelFull`, `connectionLost`, ...).
    public struct Code: Sendable, Hashable, CustomStringConvertible {
        let name: String
        /// The code's name.
        public var description: String { name }

        /// The channel holds `capacity` messages; the send was refused.
        public static let channelFull = Code(name: "channelFull")
        /// The encoded message is over the layer's size limit.
        public static let messageTooLarge = Code(name: "messageTooLarge")
        /// A channel, group or pattern name breaks the naming rules.
        public static let invalidName = Code(name: "invalidName")
        /// The message cannot be sent as it is (for example, it holds a reserved key).
        public static let invalidMessage = Code(name: "invalidMessage")
        /// The backing store could not be reached, or the connection died during the call.
        public static let connectionLost = Code(name: "connectionLost")
        /// The backing store answered with an error.
        public static let backendError = Code(name: "backendError")
        /// Redis refused a write: it reached `maxmemory` and its policy (`noeviction`) evicts nothing.
        public static let outOfMemory = Code(name: "outOfMemory")
        /// The layer's configuration is unusable (a bad URL, no hosts, ...).
        public static let invalidConfiguration = Code(name: "invalidConfiguration")
        /// The layer has been closed.
        public static let closed = Code(name: "closed")
        /// The calling task was cancelled while the layer worked for it (not a failure of the
        /// layer: nothing is counted as an error).
        public static let cancelled = Code(name: "cancelled")
    }

    /// What kind of failure.
    public var code: Code
    /// What happened, naming the channel or endpoint.
    public var message: String
    /// The error that caused this one, if any.
    public var underlying: (any Error)?

    /// An error of `code`.
    public init(_ code: Code, _ message: String, underlying: (any Error)? = nil) {
        self.code = code
        self.message = message
        self.underlying = underlying
    }

    /// `error` as a layer error: itself when it is one, `cancelled` for a `CancellationError`,
    /// else `backendError` carrying it as `underlying`.
    public init(wrapping error: any Error) {
        switch error {
        case let error as ChannelLayerError: self = error
        case is CancellationError: self.init(.cancelled, "cancelled", underlying: error)
        default: self.init(.backendError, "\(error)", underlying: error)
        }
    }

    /// The code and the message.
    public var description: String {
        var text = "\(code): \(message)"
        if let underlying { text += " (\(underlying))" }
        return text
    }

    /// The channel is at capacity (ASGI's `ChannelFull`).
    public static func channelFull(_ channel: String) -> ChannelLayerError {
        ChannelLayerError(.channelFull, "channel '\(channel)' is full")
    }

    /// A `messageTooLarge` error naming the channel, the message's size and the limit.
    public static func messageTooLarge(_ channel: String, size: Int, limit: Int) -> ChannelLayerError {
        ChannelLayerError(.messageTooLarge, "message for '\(channel)' is \(size) bytes, over the limit of \(limit)")
    }
}

/// Runs `body`, turning whatever it throws into a ``ChannelLayerError`` (see
/// ``ChannelLayerError/init(wrapping:)``): the boundary where a layer's internals, which may
/// throw other errors, meet the typed throws of ``ChannelLayer``.
@inlinable
public func withLayerErrors<T>(_ body: () async throws -> T) async throws(ChannelLayerError) -> T {
    do {
        return try await body()
    } catch {
        throw ChannelLayerError(wrapping: error)
    }
}

extension ChannelLayerError {
    /// What ``notReady(_:)`` carries as `underlying`.
    public struct NotReady: Error, Sendable {
        /// The marker.
        public init() {}
    }

    /// The backing store refused the call without running it, for a moment (Redis loading its
    /// data set after a restart, busy with a script, a replica cut off from its master): a
    /// ``Code/connectionLost``, so every caller that tries again after a lost connection tries
    /// this again too, but one that certainly did not run (``mayHaveRun`` is false).
    public static func notReady(_ message: String) -> ChannelLayerError {
        ChannelLayerError(.connectionLost, message, underlying: NotReady())
    }

    /// Whether the failed call may have run in the backing store before it failed: false only
    /// for a refusal that ran nothing (``notReady(_:)``). A send tried again after one that may
    /// have run may be stored twice.
    public var mayHaveRun: Bool { !(underlying is NotReady) }
}
