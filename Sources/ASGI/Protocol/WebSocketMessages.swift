/// `websocket.connect`: a client asks to open a WebSocket; the answer is a ``WebSocketSendMessage``
/// with `accept` (or `close`) on the reply channel.
public struct WebSocketConnectMessage: ASGIMessage, Hashable {
    /// Where the answers go (`reply_channel`).
    public var replyChannel: ReplyChannelName
    /// `http`/`https` (`ws`/`wss` for WebSockets).
    public var scheme: String
    /// Percent-decoded.
    public var path: String
    /// The raw query string, without the `?`.
    public var queryString: [UInt8]
    /// The mount point of the application (`root_path`).
    public var rootPath: String
    /// The headers, names lower-cased, in order.
    public var headers: ASGIHeaders
    /// The client's address, when known.
    public var client: ASGIAddress?
    /// The server's address, when known.
    public var server: ASGIAddress?
    /// Always 0: the first message of the socket.
    public var order: Int64

    /// Makes the message from its parts; optional keys default as ASGI 1.0 says.
    public init(
        replyChannel: ReplyChannelName, scheme: String = "ws", path: String, queryString: [UInt8] = [], rootPath: String = "",
        headers: ASGIHeaders = [], client: ASGIAddress? = nil, server: ASGIAddress? = nil, order: Int64 = 0
    ) {
        self.replyChannel = replyChannel
        self.scheme = scheme
        self.path = path
        self.queryString = queryString
        self.rootPath = rootPath
        self.headers = headers
        self.client = client
        self.server = server
        self.order = order
    }

    /// Reads the typed form of `message`; throws ``MessageError`` naming a missing or mistyped key.
    public init(_ message: Message) throws(MessageError) {
        replyChannel = try message.readReplyChannel()
        scheme = try message.string("scheme", default: "ws")
        path = try message.string("path")
        queryString = try message.bytesOrString("query_string")
        rootPath = try message.string("root_path", default: "")
        headers = try message.optional("headers").map { v throws(MessageError) in try ASGIHeaders(v) } ?? []
        client = try ASGIAddress.read(message, "client")
        server = try ASGIAddress.read(message, "server")
        order = try message.int("order", default: 0)
    }

    /// The message to send.
    public var message: Message {
        [
            "reply_channel": .string(replyChannel.rawValue),
            "scheme": .string(scheme),
            "path": .string(path),
            "query_string": .bytes(queryString),
            "root_path": .string(rootPath),
            "headers": headers.asgiValue,
            "client": client?.asgiValue ?? .null,
            "server": server?.asgiValue ?? .null,
            "order": .int(order),
        ]
    }

    /// One decoded parameter of the query string.
    public func query(_ name: String) -> String? { PercentCoding.parameter(name, in: queryString) }
}

/// What a WebSocket frame carries.
public enum WebSocketData: Sendable, Hashable {
    /// A text frame.
    case text(String)
    /// A binary frame.
    case bytes([UInt8])

    /// The text, for a text frame.
    public var text: String? { if case .text(let t) = self { t } else { nil } }
    /// The bytes, for a binary frame.
    public var bytes: [UInt8]? { if case .bytes(let b) = self { b } else { nil } }

    /// `text` or `bytes` of a message; nil when it has neither. Throws when one has the wrong type.
    static func read(_ message: Message) throws(MessageError) -> WebSocketData? {
        if let text = try message.optionalString("text") { return .text(text) }
        if let bytes = try message.optionalBytes("bytes") { return .bytes(bytes) }
        return nil
    }

    func write(into message: inout Message) {
        switch self {
        case .text(let t): message["text"] = .string(t)
        case .bytes(let b): message["bytes"] = .bytes(b)
        }
    }
}

/// `websocket.receive`: one frame from the client.
public struct WebSocketReceiveMessage: ASGIMessage, Hashable {
    /// Where the answers go (`reply_channel`).
    public var replyChannel: ReplyChannelName
    /// The socket's path.
    public var path: String
    /// 1 for the first frame, then one more per message of the socket.
    public var order: Int64
    /// The frame's text or bytes.
    public var data: WebSocketData

    /// Makes the message from its parts; optional keys default as ASGI 1.0 says.
    public init(replyChannel: ReplyChannelName, path: String, order: Int64, data: WebSocketData) {
        self.replyChannel = replyChannel
        self.path = path
        self.order = order
        self.data = data
    }

    /// Reads the typed form of `message`; throws ``MessageError`` naming a missing or mistyped key.
    public init(_ message: Message) throws(MessageError) {
        replyChannel = try message.readReplyChannel()
        path = try message.string("path", default: "")
        order = try message.int("order", default: 0)
        guard let data = try WebSocketData.read(message) else {
            throw MessageError(.missingKey, key: "text", detail: "a websocket.receive has text or bytes")
        }
        self.data = data
    }

    /// The message to send.
    public var message: Message {
        var message: Message = ["reply_channel": .string(replyChannel.rawValue), "path": .string(path), "order": .int(order)]
        data.write(into: &message)
        return message
    }
}

/// `websocket.disconnect`: the socket closed, with its close code (1006 when the connection dropped).
public struct WebSocketDisconnectMessage: ASGIMessage, Hashable {
    /// Where the answers go (`reply_channel`).
    public var replyChannel: ReplyChannelName
    /// The WebSocket close code.
    public var code: Int
    /// The socket's path.
    public var path: String
    /// The socket's message number: connect is 0.
    public var order: Int64

    /// Makes the message from its parts; optional keys default as ASGI 1.0 says.
    public init(replyChannel: ReplyChannelName, code: Int, path: String, order: Int64) {
        self.replyChannel = replyChannel
        self.code = code
        self.path = path
        self.order = order
    }

    /// Reads the typed form of `message`; throws ``MessageError`` naming a missing or mistyped key.
    public init(_ message: Message) throws(MessageError) {
        replyChannel = try message.readReplyChannel()
        code = Int(try message.int("code", default: 1000))
        path = try message.string("path", default: "")
        order = try message.int("order", default: 0)
    }

    /// The message to send.
    public var message: Message {
        ["reply_channel": .string(replyChannel.rawValue), "code": .int(Int64(code)), "path": .string(path), "order": .int(order)]
    }
}

/// A message on a WebSocket's reply channel: accept or refuse, a frame, a close, or several at
/// once (ASGI 1.0 lets one message accept, send and close).
public struct WebSocketSendMessage: ASGIMessage, Hashable {
    /// true: accept the connection; false: refuse it (only before it is open).
    public var accept: Bool?
    /// The frame's text or bytes.
    public var data: WebSocketData?
    /// Close with this code after any frame.
    public var close: Int?

    /// Makes the message from its parts; optional keys default as ASGI 1.0 says.
    public init(accept: Bool? = nil, data: WebSocketData? = nil, close: Int? = nil) {
        self.accept = accept
        self.data = data
        self.close = close
    }

    /// Accept the connection.
    public static let accept = WebSocketSendMessage(accept: true)
    /// Refuse the connection (403).
    public static let refuse = WebSocketSendMessage(accept: false)
    /// A text frame.
    public static func text(_ text: String) -> WebSocketSendMessage { .init(data: .text(text)) }
    /// A binary frame.
    public static func bytes(_ bytes: [UInt8]) -> WebSocketSendMessage { .init(data: .bytes(bytes)) }
    /// Close the socket with `code`.
    public static func close(code: Int = 1000) -> WebSocketSendMessage { .init(close: code) }

    /// The keys a WebSocket reply may hold.
    public static let keys: Set<String> = ["accept", "text", "bytes", "close"]

    /// Reads the typed form of `message`; throws ``MessageError`` naming a missing or mistyped key.
    public init(_ message: Message) throws(MessageError) {
        accept = try message.optional("accept").map { v throws(MessageError) in
            guard let b = v.boolValue else { throw MessageError(.wrongType, key: "accept", detail: "expected bool, found \(v.typeName)") }
            return b
        }
        data = try WebSocketData.read(message)
        switch message.optional("close") {
        case nil, .bool(false)?: close = nil
        case .bool(true)?: close = 1000
        case .int(let code)? where (1000...4999).contains(code): close = Int(code)
        case let other?:
            throw MessageError(.invalidValue, key: "close", detail: "expected true or a close code 1000-4999, found \(other)")
        }
    }

    /// The message to send.
    public var message: Message {
        var message = Message()
        if let accept { message["accept"] = .bool(accept) }
        data?.write(into: &message)
        if let close { message["close"] = .int(Int64(close)) }
        return message
    }
}
