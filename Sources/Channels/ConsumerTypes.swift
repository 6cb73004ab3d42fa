import ASGI
import Foundation

// MARK: WebSocket consumers

/// What a WebSocket consumer type asks of the framework (Channels' class attributes).
public struct WebSocketConsumerOptions: Sendable {
    /// Carry the user from the HTTP session into the channel session on connect (`http_user`);
    /// `socket.user` then works in every handler. Implies `channelSession`.
    public var httpUser: Bool
    /// Give every handler `socket.session`, the channel session.
    public var channelSession: Bool
    /// Handle the socket's messages strictly in order (`strict_ordering`), or only the connect
    /// first (`slight`). Implies `channelSession`.
    public var ordering: Ordering?

    public enum Ordering: Sendable { case strict, slight }

    public init(httpUser: Bool = false, channelSession: Bool = false, ordering: Ordering? = nil) {
        self.httpUser = httpUser
        self.channelSession = channelSession
        self.ordering = ordering
    }
}

/// A socket as a consumer type sees it: the message context plus sending helpers. Inside a
/// demultiplexer, sends are wrapped as `{"stream": ..., "payload": ...}`.
public struct WebSocket: Sendable {
    public let context: ConsumerContext
    /// The demultiplexer stream this consumer serves, if any.
    public let stream: String?

    public init(context: ConsumerContext, stream: String? = nil) {
        self.context = context
        self.stream = stream
    }

    public var kwargs: [String: String] { context.kwargs }
    public var path: String { context.path }
    public var user: User { context.user }
    public var replyChannel: Channel? { context.replyChannel }
    /// The channel session (when the options ask for one).
    public var session: Session { get throws { try context.channelSession } }

    public func accept() async throws { try await context.reply(["accept": true]) }
    public func send(text: String) async throws {
        if let stream {
            try await sendJSONObject(["stream": stream, "payload": ["text": text]], raw: true)
        } else {
            try await context.reply(["text": .string(text)])
        }
    }
    public func send(bytes: [UInt8]) async throws { try await context.reply(["bytes": .bytes(bytes)]) }
    /// Closes the socket (1000 by default).
    public func close(code: Int = 1000) async throws { try await context.reply(["close": .int(Int64(code))]) }

    /// Sends a value as a JSON text frame (wrapped for the stream inside a demultiplexer).
    public func send<T: Encodable>(json value: T) async throws {
        let payload = try JSONSerialization.jsonObject(with: JSONEncoder.channels.encode(value), options: [.fragmentsAllowed])
        try await sendJSONObject(stream.map { ["stream": $0, "payload": payload] as [String: Any] } ?? payload, raw: true)
    }

    private func sendJSONObject(_ object: Any, raw: Bool) async throws {
        let data = try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .fragmentsAllowed])
        try await context.reply(["text": .string(String(decoding: data, as: UTF8.self))])
    }

    /// Sends a text frame to every socket of a group.
    public func groupSend(_ group: String, text: String) async throws {
        try await context.sendGroup(group, ["text": .string(text)])
    }

    public func groupSend<T: Encodable>(_ group: String, json value: T) async throws {
        let data = try JSONEncoder.channels.encode(value)
        try await context.sendGroup(group, ["text": .string(String(decoding: data, as: UTF8.self))])
    }
}

extension JSONEncoder {
    static var channels: JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return encoder
    }
}

/// A WebSocket consumer type, like Channels' `WebsocketConsumer`: one value per message,
/// `connect` / `receive` / `disconnect` handlers, and groups joined on connect and left on
/// disconnect. Route it with `route(MyConsumer.self, path: ...)`.
public protocol WebSocketConsumer: Sendable {
    init()
    static var options: WebSocketConsumerOptions { get }
    /// Groups the socket joins on connect and leaves on disconnect.
    func connectionGroups(_ socket: WebSocket) -> [String]
    /// Default: accept.
    func connect(_ socket: WebSocket) async throws
    func receive(_ socket: WebSocket, text: String?, bytes: [UInt8]?) async throws
    func disconnect(_ socket: WebSocket, code: Int) async throws
}

extension WebSocketConsumer {
    public static var options: WebSocketConsumerOptions { .init() }
    public func connectionGroups(_ socket: WebSocket) -> [String] { [] }
    public func connect(_ socket: WebSocket) async throws { try await socket.accept() }
    public func receive(_ socket: WebSocket, text: String?, bytes: [UInt8]?) async throws {}
    public func disconnect(_ socket: WebSocket, code: Int) async throws {}
}

/// A JSON WebSocket consumer type, like Channels' `JsonWebsocketConsumer`: text frames are
/// decoded as `Incoming`; a frame that is not valid `Incoming` is logged and dropped.
public protocol JSONWebSocketConsumer: WebSocketConsumer {
    associatedtype Incoming: Decodable & Sendable
    func receive(_ socket: WebSocket, json: Incoming) async throws
}

extension JSONWebSocketConsumer {
    public func receive(_ socket: WebSocket, text: String?, bytes: [UInt8]?) async throws {
        guard let data = text.map({ Data($0.utf8) }) ?? bytes.map({ Data($0) }) else { return }
        try await receiveJSONData(socket, data)
    }

    func receiveJSONData(_ socket: WebSocket, _ data: Data) async throws {
        let value: Incoming
        do {
            value = try JSONDecoder().decode(Incoming.self, from: data)
        } catch {
            socket.context.logger.warning("dropped a frame that is not valid JSON for \(Self.self)",
                                          metadata: ["path": "\(socket.path)", "error": "\(error)"])
            return
        }
        try await receive(socket, json: value)
    }
}

/// The socket-level plumbing shared by consumer types: dispatch by channel, groups on
/// connect/disconnect, and the session wrappers the options ask for.
enum WebSocketDispatch {
    static let channels = ["websocket.connect", "websocket.receive", "websocket.disconnect"]

    static func wrap(_ options: WebSocketConsumerOptions, _ body: @escaping Consumer) -> Consumer {
        var consumer = body
        if let ordering = options.ordering { consumer = enforceOrdering(slight: ordering == .slight, consumer) }
        if options.httpUser {
            let inner = consumer
            let fromHTTP = channelSessionUserFromHTTP(inner)
            let later = channelSessionUser(inner)
            consumer = { context in
                try await (context.channel == "websocket.connect" ? fromHTTP : later)(context)
            }
        } else if options.channelSession {
            consumer = channelSession(consumer)
        }
        return consumer
    }
}

/// Routes a WebSocket consumer type for its three channels.
public func route<C: WebSocketConsumer>(_ type: C.Type, path: String? = nil, filters: [String: String] = [:],
                                        name: String? = nil) -> RoutingEntry {
    let consumer = WebSocketDispatch.wrap(C.options) { context in
        let socket = WebSocket(context: context)
        let instance = C()
        try await dispatch(instance, socket)
    }
    return route(WebSocketDispatch.channels, path: path, filters: filters, name: name ?? "\(C.self)", consumer)
}

func dispatch<C: WebSocketConsumer>(_ instance: C, _ socket: WebSocket) async throws {
    let context = socket.context
    switch context.channel {
    case "websocket.connect":
        if let reply = context.replyChannel {
            for group in instance.connectionGroups(socket) { try await context.layer.groupAdd(group, channel: reply.name) }
        }
        try await instance.connect(socket)
    case "websocket.receive":
        try await instance.receive(socket, text: context.message["text"]?.stringValue, bytes: context.message["bytes"]?.bytesValue)
    case "websocket.disconnect":
        if let reply = context.replyChannel {
            for group in instance.connectionGroups(socket) { try await context.layer.groupDiscard(group, channel: reply.name) }
        }
        try await instance.disconnect(socket, code: Int(context.message["code"]?.intValue ?? 1000))
    default:
        context.logger.warning("a WebSocket consumer got a message on an unexpected channel", metadata: ["channel": "\(context.channel)"])
    }
}

// MARK: Demultiplexer

/// A stream of a demultiplexer: a JSON consumer whose frames arrive as the `payload` of
/// `{"stream": name, "payload": ...}` and whose sends are wrapped the same way.
public protocol StreamConsumer: Sendable {
    init()
    func connect(_ socket: WebSocket) async throws
    func receive(_ socket: WebSocket, payload: Data) async throws
    func disconnect(_ socket: WebSocket, code: Int) async throws
}

extension StreamConsumer {
    public func connect(_ socket: WebSocket) async throws {}
    public func disconnect(_ socket: WebSocket, code: Int) async throws {}
}

extension StreamConsumer where Self: WebSocketConsumer {
    /// A consumer type used both on its own socket and as a stream: accept on its own socket;
    /// inside a demultiplexer the demultiplexer accepts.
    public func connect(_ socket: WebSocket) async throws {
        if socket.stream == nil { try await socket.accept() }
    }

    public func disconnect(_ socket: WebSocket, code: Int) async throws {}
}

extension StreamConsumer where Self: JSONWebSocketConsumer {
    public func receive(_ socket: WebSocket, payload: Data) async throws { try await receiveJSONData(socket, payload) }
}

/// Like Channels' `WebsocketDemultiplexer`: one socket carries several streams; each frame is
/// `{"stream": name, "payload": ...}` and goes to that stream's consumer. Connect and
/// disconnect go to every stream's consumer; the socket is accepted once.
public protocol WebSocketDemultiplexer: WebSocketConsumer {
    static var streams: [String: any StreamConsumer.Type] { get }
}

extension WebSocketDemultiplexer {
    public func connect(_ socket: WebSocket) async throws {
        try await socket.accept()
        for (name, type) in Self.streams.sorted(by: { $0.key < $1.key }) {
            try await type.init().connect(WebSocket(context: socket.context, stream: name))
        }
    }

    public func receive(_ socket: WebSocket, text: String?, bytes: [UInt8]?) async throws {
        guard let data = text.map({ Data($0.utf8) }) ?? bytes.map({ Data($0) }),
              let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
              let stream = object["stream"] as? String, let payload = object["payload"] else {
            socket.context.logger.warning("dropped a frame without stream and payload", metadata: ["path": "\(socket.path)"])
            return
        }
        guard let type = Self.streams[stream] else {
            socket.context.logger.warning("dropped a frame for an unknown stream", metadata: ["stream": "\(stream)"])
            return
        }
        let payloadData = try JSONSerialization.data(withJSONObject: payload, options: [.fragmentsAllowed])
        try await type.init().receive(WebSocket(context: socket.context, stream: stream), payload: payloadData)
    }

    public func disconnect(_ socket: WebSocket, code: Int) async throws {
        for (name, type) in Self.streams.sorted(by: { $0.key < $1.key }) {
            try await type.init().disconnect(WebSocket(context: socket.context, stream: name), code: code)
        }
    }
}

// MARK: HTTP consumers

/// An HTTP request as an ``HTTPConsumer`` sees it.
public struct HTTPRequest: Sendable {
    public let context: ConsumerContext
    public let method: String
    public let path: String
    public let queryString: String
    /// Header names lower-cased, in order, duplicates kept.
    public let headers: [(name: String, value: String)]
    public let body: [UInt8]

    public var kwargs: [String: String] { context.kwargs }
    public var user: User { context.user }
    public var cookies: [String: String] { HTTPRequestInfo.cookies(in: context.message) }
    public func header(_ name: String) -> String? { headers.first { $0.name == name.lowercased() }?.value }
    public func query(_ name: String) -> String? { HTTPRequestInfo.queryParameter(name, in: context.message) }
    public var form: [String: String] { HTTPRequestInfo.formFields(body) }

    static func from(_ context: ConsumerContext) async throws -> HTTPRequest {
        var headers: [(name: String, value: String)] = []
        for header in context.message["headers"]?.arrayValue ?? [] {
            guard let pair = header.arrayValue, pair.count == 2 else { continue }
            headers.append((String(decoding: pair[0].bytesValue ?? [], as: UTF8.self).lowercased(),
                            String(decoding: pair[1].bytesValue ?? [], as: UTF8.self)))
        }
        return HTTPRequest(context: context, method: context.message["method"]?.stringValue ?? "GET", path: context.path,
                           queryString: String(decoding: context.message["query_string"]?.bytesValue ?? [], as: UTF8.self),
                           headers: headers, body: try await context.requestBody())
    }
}

/// A whole HTTP response.
public struct HTTPResponse: Sendable {
    public var status: Int
    public var headers: [(String, String)]
    public var body: [UInt8]
    public var contentType: String

    public init(status: Int = 200, contentType: String = "text/plain; charset=utf-8", headers: [(String, String)] = [],
                body: [UInt8]) {
        self.status = status
        self.contentType = contentType
        self.headers = headers
        self.body = body
    }

    public init(status: Int = 200, contentType: String = "text/plain; charset=utf-8", headers: [(String, String)] = [],
                _ text: String) {
        self.init(status: status, contentType: contentType, headers: headers, body: Array(text.utf8))
    }

    public static func json<T: Encodable>(_ value: T, status: Int = 200) throws -> HTTPResponse {
        HTTPResponse(status: status, contentType: "application/json", body: Array(try JSONEncoder.channels.encode(value)))
    }
}

/// An HTTP consumer type: request in, response out. Return nil when the consumer answered
/// itself (a streamed response through `request.context.respondStart` / `respondChunk`).
public protocol HTTPConsumer: Sendable {
    init()
    /// Wrap in `httpSessionUser` so `request.user` and `context.httpSession` work.
    static var httpUser: Bool { get }
    func handle(_ request: HTTPRequest) async throws -> HTTPResponse?
}

extension HTTPConsumer {
    public static var httpUser: Bool { false }
}

/// Routes an HTTP consumer type on `http.request`.
public func route<C: HTTPConsumer>(_ type: C.Type, path: String? = nil, method: String? = nil,
                                   filters: [String: String] = [:], name: String? = nil) -> RoutingEntry {
    var consumer: Consumer = { context in
        let request = try await HTTPRequest.from(context)
        if let response = try await C().handle(request) {
            try await context.respond(status: response.status, contentType: response.contentType,
                                      headers: response.headers, body: response.body)
        }
    }
    if C.httpUser { consumer = httpSessionUser(consumer) }
    return route("http.request", path: path, method: method, filters: filters, name: name ?? "\(C.self)", consumer)
}
