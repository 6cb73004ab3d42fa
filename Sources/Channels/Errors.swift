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
public struct ConsumerContextError: Error, Sendable, CustomStringConvertible {
    /// What kind of misuse or stall; compare with the static codes.
    public struct Code: Sendable, Hashable, CustomStringConvertible {
        let name: String
        /// The code's name.
        public var description: String { name }

        /// Called outside a running consumer (and it needs one: a socket to track, an order to keep).
        public static let noConsumer = Code(name: "noConsumer")
        /// Called outside a consumer with no layer given and no `ChannelLayers.default` set.
        public static let noLayer = Code(name: "noLayer")
        /// The message being handled has no `reply_channel` to answer on.
        public static let noReplyChannel = Code(name: "noReplyChannel")
        /// The group keeps no history: `GroupHistory.keep` it first.
        public static let historyNotKept = Code(name: "historyNotKept")
        /// The channel layer in use keeps no group history or no presence.
        public static let layerLacksFeature = Code(name: "layerLacksFeature")
        /// A streamed response got no credit from its server within its credit timeout (an
        /// acknowledgement was lost, or the server stopped reading).
        public static let noCredit = Code(name: "noCredit")
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

    /// The code and the message.
    public var description: String { "\(code): \(message)" }
}

/// Reading a request's body failed: a chunk did not come in time, or the client left during
/// the upload. The consumer's response then goes nowhere; the worker logs it and moves on.
public struct RequestBodyError: Error, Sendable, CustomStringConvertible {
    /// Why the body could not be read.
    public struct Code: Sendable, Hashable, CustomStringConvertible {
        let name: String
        /// The code's name.
        public var description: String { name }

        /// The next chunk did not arrive within the body timeout.
        public static let chunkMissing = Code(name: "chunkMissing")
        /// The client closed the connection before the body was whole.
        public static let clientLeft = Code(name: "clientLeft")
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

    /// The code and the message.
    public var description: String { "\(code): \(message)" }
}
