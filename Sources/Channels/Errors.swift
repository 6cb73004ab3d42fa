import ASGI

// The framework's errors, one per domain, each with a code to switch over: what a consumer
// throws to steer its socket, what a consumer's helpers throw when used where they cannot work,
// what reading a request's body throws, what a session throws. A failure of the channel layer
// itself stays a `ChannelLayerError`.

/// Errors a consumer can throw with meaning.
public enum ConsumerError: Error, Sendable {
    /// Refuse a WebSocket connection (on connect) or close it (later).
    case denyConnection
    /// Close the WebSocket with this code.
    case close(code: Int)
    /// Not now: the message goes back on its channel (at most `Worker.maxRetries` times).
    case consumeLater
}

/// A consumer's helper called where it cannot work: outside a consumer, on a message with no
/// reply channel, for a group that keeps no history, on a layer without history or presence,
/// or a streamed response that got no credit from its server.
public struct ConsumerContextError: CodedError, Sendable {
    /// What kind of misuse or stall.
    public enum Code: String, Sendable, Hashable, CustomStringConvertible {
        /// Called outside a running consumer (and it needs one: a socket to track, an order to keep).
        case noConsumer
        /// Called outside a consumer with no layer given and no `ChannelLayers.default` set.
        case noLayer
        /// The message being handled has no `reply_channel` to answer on.
        case noReplyChannel
        /// The group keeps no history: `GroupHistory.keep` it first.
        case historyNotKept
        /// The channel layer in use keeps no group history or no presence.
        case layerLacksFeature
        /// A streamed response got no credit from its server within its credit timeout (an
        /// acknowledgement was lost, or the server stopped reading).
        case noCredit

        /// The code's name.
        public var description: String { rawValue }
    }

    /// What went wrong.
    public var code: Code
    /// What happened, naming the helper, group or channel.
    public var message: String

    /// An error of `code`.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }
}

/// Reading a request's body failed: a chunk did not come in time, or the client left during
/// the upload. The consumer's response then goes nowhere; the worker logs it and moves on.
public struct RequestBodyError: CodedError, Sendable {
    /// Why the body could not be read.
    public enum Code: String, Sendable, Hashable, CustomStringConvertible {
        /// The next chunk did not arrive within the body timeout.
        case chunkMissing
        /// The client closed the connection before the body was whole.
        case clientLeft

        /// The code's name.
        public var description: String { rawValue }
    }

    /// Why.
    public var code: Code
    /// What happened, naming the body channel.
    public var message: String

    /// An error of `code`.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }
}
