/// `http.request`: one HTTP request, body included up to the server's chunk size; the rest of a
/// large body follows on `bodyChannel` as ``HTTPBodyChunk`` messages.
public struct HTTPRequestMessage: ASGIMessage, Hashable {
    /// Where the answers go (`reply_channel`).
    public var replyChannel: ReplyChannelName
    /// `1.0`, `1.1` or `2`.
    public var httpVersion: String
    /// Upper-case HTTP method.
    public var method: String
    /// `http`/`https` (`ws`/`wss` for WebSockets).
    public var scheme: String
    /// Percent-decoded.
    public var path: String
    /// Raw, after the `?`.
    public var queryString: [UInt8]
    /// The mount point of the application (`root_path`).
    public var rootPath: String
    /// The headers, names lower-cased, in order.
    public var headers: ASGIHeaders
    /// The body, or its first chunk when `bodyChannel` is set.
    public var body: [UInt8]
    /// Where the rest of the body comes, when it did not fit in one message.
    public var bodyChannel: String?
    /// The client's address, when known.
    public var client: ASGIAddress?
    /// The server's address, when known.
    public var server: ASGIAddress?
    /// An extension (`response_credit`): the server acknowledges the body bytes it has written
    /// to the client on a multi-message response's `disconnect_channel` (``HTTPResponseCredit``),
    /// and a worker keeps at most this many bytes unacknowledged. Absent: no acknowledgements
    /// come (a server that does not know the extension), and nothing waits for them.
    public var responseCredit: Int?

    /// Makes the message from its parts; optional keys default as ASGI 1.0 says.
    public init(
        replyChannel: ReplyChannelName, httpVersion: String = "1.1", method: String, scheme: String = "http", path: String,
        queryString: [UInt8] = [], rootPath: String = "", headers: ASGIHeaders = [], body: [UInt8] = [],
        bodyChannel: String? = nil, client: ASGIAddress? = nil, server: ASGIAddress? = nil, responseCredit: Int? = nil
    ) {
        self.responseCredit = responseCredit
        self.replyChannel = replyChannel
        self.httpVersion = httpVersion
        self.method = method
        self.scheme = scheme
        self.path = path
        self.queryString = queryString
        self.rootPath = rootPath
        self.headers = headers
        self.body = body
        self.bodyChannel = bodyChannel
        self.client = client
        self.server = server
    }

    /// Reads the typed form of `message`; throws ``MessageError`` naming a missing or mistyped key.
    public init(_ message: Message) throws(MessageError) {
        replyChannel = try message.readReplyChannel()
        httpVersion = try message.string("http_version", default: "1.1")
        method = try message.string("method").uppercased()
        scheme = try message.string("scheme", default: "http")
        path = try message.string("path")
        queryString = try message.bytesOrString("query_string")
        rootPath = try message.string("root_path", default: "")
        headers = try message.optional("headers").map { v throws(MessageError) in try ASGIHeaders(v) } ?? []
        body = try message.optionalBytes("body") ?? []
        bodyChannel = try message.optionalString("body_channel")
        client = try ASGIAddress.read(message, "client")
        server = try ASGIAddress.read(message, "server")
        responseCredit = try message.optional("response_credit").map { value throws(MessageError) in
            guard let credit = value.intValue, credit > 0 else {
                throw MessageError(.invalidValue, key: "response_credit", detail: "a positive int")
            }
            return Int(credit)
        }
    }

    /// The message to send.
    public var message: Message {
        var message: Message = [
            "reply_channel": .string(replyChannel.rawValue),
            "http_version": .string(httpVersion),
            "method": .string(method),
            "scheme": .string(scheme),
            "path": .string(path),
            "query_string": .bytes(queryString),
            "root_path": .string(rootPath),
            "headers": headers.asgiValue,
            "body": .bytes(body),
            "client": client?.asgiValue ?? .null,
            "server": server?.asgiValue ?? .null,
        ]
        if let bodyChannel { message["body_channel"] = .string(bodyChannel) }
        if let responseCredit { message["response_credit"] = .int(Int64(responseCredit)) }
        return message
    }

    /// One decoded parameter of the query string.
    public func query(_ name: String) -> String? { PercentCoding.parameter(name, in: queryString) }
}

/// A piece of a large request body, on the request's `body_channel`.
public struct HTTPBodyChunk: ASGIMessage, Hashable {
    /// Body bytes of this message.
    public var content: [UInt8]
    /// The client went away: no more chunks will come.
    public var closed: Bool
    /// True while more body chunks follow on the body channel.
    public var moreContent: Bool

    /// Makes the message from its parts; optional keys default as ASGI 1.0 says.
    public init(content: [UInt8], closed: Bool = false, moreContent: Bool) {
        self.content = content
        self.closed = closed
        self.moreContent = moreContent
    }

    /// Reads the typed form of `message`; throws ``MessageError`` naming a missing or mistyped key.
    public init(_ message: Message) throws(MessageError) {
        content = try message.optionalBytes("content") ?? []
        closed = try message.bool("closed", default: false)
        moreContent = try message.bool("more_content", default: false)
    }

    /// The message to send.
    public var message: Message {
        ["content": .bytes(content), "closed": .bool(closed), "more_content": .bool(moreContent)]
    }
}

/// The first message of an HTTP response: status, headers and the first (or only) content.
public struct HTTPResponseStart: ASGIMessage, Hashable {
    /// The HTTP status code.
    public var status: Int
    /// The headers, names lower-cased, in order.
    public var headers: ASGIHeaders
    /// Body bytes of this message.
    public var content: [UInt8]
    /// More ``HTTPResponseChunk`` messages follow.
    public var moreContent: Bool
    /// An extension of ours (servers that do not know it ignore it): a channel the responder
    /// reads, where the server sends `http.disconnect` when the client leaves before the
    /// response ends, so a streaming consumer stops at once (as well as on `http.disconnect`).
    public var disconnectChannel: String?
    /// An extension (`credit`): the responder waits for ``HTTPResponseCredit`` on its
    /// `disconnect_channel` (the request carried `response_credit`); only then does the server
    /// send credit there.
    public var takesCredit: Bool

    /// Makes the message from its parts; optional keys default as ASGI 1.0 says.
    public init(
        status: Int, headers: ASGIHeaders = [], content: [UInt8] = [], moreContent: Bool = false,
        disconnectChannel: String? = nil, takesCredit: Bool = false
    ) {
        self.takesCredit = takesCredit
        self.status = status
        self.headers = headers
        self.content = content
        self.moreContent = moreContent
        self.disconnectChannel = disconnectChannel
    }

    /// Reads the typed form of `message`; throws ``MessageError`` naming a missing or mistyped key.
    public init(_ message: Message) throws(MessageError) {
        let status = try message.int("status")
        guard (100...999).contains(status) else {
            throw MessageError(.invalidValue, key: "status", detail: "\(status) is not an HTTP status code")
        }
        self.status = Int(status)
        headers = try message.optional("headers").map { v throws(MessageError) in try ASGIHeaders(v) } ?? []
        content = try message.optionalBytes("content") ?? []
        moreContent = try message.bool("more_content", default: false)
        disconnectChannel = try message.optionalString("disconnect_channel")
        takesCredit = try message.bool("credit", default: false)
    }

    /// The message to send.
    public var message: Message {
        var message: Message = [
            "status": .int(Int64(status)), "headers": headers.asgiValue, "content": .bytes(content),
            "more_content": .bool(moreContent),
        ]
        if let disconnectChannel { message["disconnect_channel"] = .string(disconnectChannel) }
        if takesCredit { message["credit"] = .bool(true) }
        return message
    }
}

/// A later piece of an HTTP response.
public struct HTTPResponseChunk: ASGIMessage, Hashable {
    /// Body bytes of this message.
    public var content: [UInt8]
    /// False on the last piece.
    public var moreContent: Bool
    /// An extension (`abort`): the application failed while the response was being sent; the
    /// server cuts the connection (HTTP/2: resets the stream) so the client sees an incomplete
    /// response instead of a short one that looks whole, or one that never ends.
    public var abort: Bool
    /// An extension (`worker_lost`), sent by an interface server to its own reply channel: the
    /// worker streaming this response stopped renewing its lease (``ResponseStreamLeases``), so
    /// the response is cut (503 when it had not started). Ordered after the chunks already sent.
    public var workerLost: Bool

    /// Makes the message from its parts; optional keys default as ASGI 1.0 says.
    public init(content: [UInt8], moreContent: Bool, abort: Bool = false, workerLost: Bool = false) {
        self.content = content
        self.moreContent = moreContent
        self.abort = abort
        self.workerLost = workerLost
    }

    /// Reads the typed form of `message`; throws ``MessageError`` naming a missing or mistyped key.
    public init(_ message: Message) throws(MessageError) {
        content = try message.optionalBytes("content") ?? []
        moreContent = try message.bool("more_content", default: false)
        abort = try message.bool("abort", default: false)
        workerLost = try message.bool("worker_lost", default: false)
    }

    /// The message to send.
    public var message: Message {
        var message: Message = ["content": .bytes(content), "more_content": .bool(moreContent)]
        if abort { message["abort"] = .bool(true) }
        if workerLost { message["worker_lost"] = .bool(true) }
        return message
    }
}

/// Where a worker streaming a response tells the server serving it that it is alive.
///
/// A response of several messages runs as long as its consumer sends (a stream of server-sent
/// events may run for hours), so nothing about the response tells its server that the worker
/// sending it died (`SIGKILL`, an OOM kill, a lost host): the client would wait forever. A worker
/// of ours therefore holds a lease (``ChannelLayerLeases``) for each response it streams to a
/// request that carried `response_credit` (sent by our servers, which watch the leases), named
/// after the response's `disconnect_channel`, noted with its reply channel, in the pool of the
/// server's process channel, and renews it while the response runs. The server claims the
/// leases of its pool that lapsed and sends ``HTTPResponseChunk`` with `worker_lost` to each
/// one's reply channel: the client sees the response cut, as when a worker fails mid-response.
public enum ResponseStreamLeases {
    /// The lease pool of the server whose process channel is `processChannel` (ends with `!`).
    public static func pool(processChannel: String) -> String { "streams:" + processChannel }

    /// The pool of the server that reads `replyChannel` (a process-specific name); nil for a
    /// reply channel of another form, which no server of ours watches.
    public static func pool(replyChannel: String) -> String? {
        guard let bang = replyChannel.firstIndex(of: "!"), replyChannel.index(after: bang) != replyChannel.endIndex else {
            return nil
        }
        return pool(processChannel: String(replyChannel[...bang]))
    }
}

/// A message on an HTTP reply channel: the start of the response (it has a `status`) or a later piece.
public enum HTTPResponseMessage: ASGIMessage, Hashable {
    /// The first message: it has a `status`.
    case start(HTTPResponseStart)
    /// A later piece of the body.
    case chunk(HTTPResponseChunk)

    /// Reads the typed form of `message`; throws ``MessageError`` naming a missing or mistyped key.
    public init(_ message: Message) throws(MessageError) {
        self = message["status"] == nil ? .chunk(try HTTPResponseChunk(message)) : .start(try HTTPResponseStart(message))
    }

    /// The message to send.
    public var message: Message {
        switch self {
        case .start(let start): start.message
        case .chunk(let chunk): chunk.message
        }
    }
}

/// `http.disconnect`: the client left before its response finished.
public struct HTTPDisconnectMessage: ASGIMessage, Hashable {
    /// Where the answers go (`reply_channel`).
    public var replyChannel: ReplyChannelName
    /// The request's path.
    public var path: String

    /// Makes the message from its parts; optional keys default as ASGI 1.0 says.
    public init(replyChannel: ReplyChannelName, path: String) {
        self.replyChannel = replyChannel
        self.path = path
    }

    /// Reads the typed form of `message`; throws ``MessageError`` naming a missing or mistyped key.
    public init(_ message: Message) throws(MessageError) {
        replyChannel = try message.readReplyChannel()
        path = try message.string("path", default: "")
    }

    /// The message to send.
    public var message: Message { ["reply_channel": .string(replyChannel.rawValue), "path": .string(path)] }
}

/// An extension: the body bytes of a multi-message response the server has written to its
/// client so far, sent to the response's `disconnect_channel` when the request carried
/// `response_credit` (the worker's streams then wait for room instead of piling up in the layer).
public struct HTTPResponseCredit: ASGIMessage, Hashable {
    /// Body bytes written to the client since the response started.
    public var written: Int

    /// Makes the message.
    public init(written: Int) { self.written = written }

    /// Reads the typed form of `message`; throws ``MessageError`` naming a missing or mistyped key.
    public init(_ message: Message) throws(MessageError) {
        guard let written = message["written"]?.intValue, written >= 0 else {
            throw MessageError(.invalidValue, key: "written", detail: "an int >= 0")
        }
        self.written = Int(written)
    }

    /// Whether `message` is a credit (else, on a disconnect channel, it is `http.disconnect`).
    public static func isCredit(_ message: Message) -> Bool { message["written"] != nil }

    /// The message to send.
    public var message: Message { ["written": .int(Int64(written))] }
}
