/// A message of the ASGI 1.0 HTTP and WebSocket protocols as a typed value.
///
/// Each converts to and from the ``Message`` that travels on the layer. Conversion to a message
/// writes the keys in the order the interface server has always written them, so the bytes on
/// the wire do not depend on which side used the typed form. Reading throws ``MessageError``
/// naming the key that was missing or had the wrong type. Custom channels keep plain ``Message``.
public protocol ASGIMessage: Sendable {
    /// Reads the typed form of `message`.
    init(_ message: Message) throws(MessageError)
    /// The message to send.
    var message: Message { get }
}

/// A network address as ASGI 1.0 writes it: `[host, port]`.
public struct ASGIAddress: Sendable, Hashable, CustomStringConvertible {
    /// Host name or IP address.
    public var host: String
    /// Port number.
    public var port: Int

    /// Makes the message from its parts; optional keys default as ASGI 1.0 says.
    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    /// `[host, port]`.
    public var asgiValue: ASGIValue { [.string(host), .int(Int64(port))] }

    /// Reads `[host, port]` (nil stays nil). Throws, naming `key`, on another shape.
    static func read(_ message: Message, _ key: String) throws(MessageError) -> ASGIAddress? {
        guard let value = message.optional(key) else { return nil }
        guard case .array(let pair) = value, pair.count == 2, let host = pair[0].stringValue, let port = pair[1].intValue else {
            throw MessageError(.invalidValue, key: key, detail: "expected [host, port], found \(value)")
        }
        return ASGIAddress(host: host, port: Int(port))
    }

    /// A readable form for logs.
    public var description: String { "\(host):\(port)" }
}

extension Message {
    /// `reply_channel`, checked: present, a string, and a process-specific or single-reader name.
    public func replyChannelName() throws(MessageError) -> ReplyChannelName {
        let name = try string("reply_channel")
        do {
            return try ReplyChannelName(validating: name)
        } catch {
            throw MessageError(.invalidValue, key: "reply_channel", detail: error.description)
        }
    }

    /// `reply_channel` as the typed messages read it: present, a string and a valid channel
    /// name. Not required to be `!` or `?`: Channels 1.x's own test clients name their reply
    /// channels `<alias><letters>`, and a message from them must not be refused.
    func readReplyChannel() throws(MessageError) -> ReplyChannelName {
        let name = try string("reply_channel")
        do {
            try ChannelNames.validateChannel(name)
        } catch {
            throw MessageError(.invalidValue, key: "reply_channel", detail: error.description)
        }
        return ReplyChannelName(trusted: name)
    }

    /// `reply_channel` when the message has one (a string), unchecked; nil otherwise.
    public var replyChannel: String? { self["reply_channel"]?.stringValue }

    /// A string or bytes value read as bytes (ASGI 1.0 producers write `query_string` either way).
    func bytesOrString(_ key: String, default defaultValue: [UInt8] = []) throws(MessageError) -> [UInt8] {
        switch optional(key) {
        case nil: return defaultValue
        case .bytes(let b)?: return b
        case .string(let s)?: return Array(s.utf8)
        case let other?: throw MessageError(.wrongType, key: key, detail: "expected bytes, found \(other.typeName)")
        }
    }

    func string(_ key: String, default defaultValue: String) throws(MessageError) -> String {
        try optionalString(key) ?? defaultValue
    }

    func int(_ key: String, default defaultValue: Int64) throws(MessageError) -> Int64 {
        guard let value = optional(key) else { return defaultValue }
        guard let i = value.intValue else { throw MessageError(.wrongType, key: key, detail: "expected int, found \(value.typeName)") }
        return i
    }
}
