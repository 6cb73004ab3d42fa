import ASGI
import Foundation
import Logging

// MARK: WebSocket consumers

/// The earlier name of ``WebSocketConsumerConfiguration``.
@available(*, deprecated, renamed: "WebSocketConsumerConfiguration")
public typealias WebSocketConsumerOptions = WebSocketConsumerConfiguration

/// What a WebSocket consumer type asks of the framework (Channels' class attributes), as its
/// `options`.
public struct WebSocketConsumerConfiguration: Sendable {
    /// Carry the user from the HTTP session into the channel session on connect (`http_user`);
    /// `socket.user` then works in every handler. Implies `channelSession`.
    public var httpUser: Bool
    /// Give every handler `socket.session`, the channel session.
    public var channelSession: Bool
    /// Handle the socket's messages strictly in order (`strict_ordering`), or only the connect
    /// first (`slight`). Implies `channelSession`.
    public var ordering: Ordering?

    /// `strict`: every message in order; `slight`: only the connect first.
    public enum Ordering: Sendable { case strict, slight }

    /// Options; every one off by default.
    public init(httpUser: Bool = false, channelSession: Bool = false, ordering: Ordering? = nil) {
        self.httpUser = httpUser
        self.channelSession = channelSession
        self.ordering = ordering
    }
}

/// A socket as a consumer type sees it: the message context plus sending helpers. Inside a
/// demultiplexer, sends are wrapped as `{"stream": ..., "payload": ...}`.
public struct WebSocket: Sendable {
    /// The message context: route arguments, sessions, sending.
    public let context: ConsumerContext
    /// The demultiplexer stream this consumer serves, if any.
    public let stream: String?

    /// A socket for a message context, optionally as one stream of a demultiplexer.
    public init(context: ConsumerContext, stream: String? = nil) {
        self.context = context
        self.stream = stream
    }

    /// Arguments captured by the route's named groups (`(?P<room>…)` gives `parameters["room"]`).
    public var parameters: [String: String] { context.parameters }
    /// Django's name for ``parameters``.
    @available(*, deprecated, renamed: "parameters")
    public var kwargs: [String: String] { parameters }
    /// The socket's path.
    public var path: String { context.path }
    /// The logged-in user (anonymous unless the options ask for `httpUser`).
    public var user: User { context.user }
    /// The socket's reply channel (`websocket.send!...`).
    public var replyChannel: Channel? { context.replyChannel }
    /// The channel session (when the options ask for one).
    public var session: Session { get throws { try context.channelSession } }

    /// Accepts the connection.
    public func accept() async throws { try await context.reply(WebSocketSendMessage.accept) }
    /// Sends a text frame (wrapped for the stream inside a demultiplexer).
    public func send(text: String) async throws {
        if let stream {
            let frame = StreamFrame(stream: stream, payload: "{\"text\":" + JSONText.quote(text) + "}")
            try await context.reply(WebSocketSendMessage.text(frame.text))
        } else {
            try await context.reply(WebSocketSendMessage.text(text))
        }
    }
    /// Sends a binary frame.
    public func send(bytes: [UInt8]) async throws { try await context.reply(WebSocketSendMessage.bytes(bytes)) }
    /// Closes the socket (1000 by default).
    public func close(code: Int = 1000) async throws { try await context.reply(WebSocketSendMessage.close(code: code)) }

    /// Sends a value as a JSON text frame (wrapped for the stream inside a demultiplexer).
    public func send<T: Encodable>(json value: T) async throws {
        let payload = String(decoding: try JSONEncoder.channels.encode(value), as: UTF8.self)
        try await context.reply(WebSocketSendMessage.text(stream.map { StreamFrame(stream: $0, payload: payload).text } ?? payload))
    }

    /// Sends a text frame to every socket of a group.
    public func groupSend(_ group: String, text: String) async throws {
        try await context.sendGroup(group, WebSocketSendMessage.text(text).message)
    }

    /// Sends a value as JSON to every member of a group.
    public func groupSend<T: Encodable>(_ group: String, json value: T) async throws {
        let data = try JSONEncoder.channels.encode(value)
        try await context.sendGroup(group, WebSocketSendMessage.text(String(decoding: data, as: UTF8.self)).message)
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
    static var options: WebSocketConsumerConfiguration { get }
    /// Groups the socket joins on connect and leaves on disconnect.
    func connectionGroups(_ socket: WebSocket) -> [String]
    /// Default: accept.
    func connect(_ socket: WebSocket) async throws
    /// A frame from the client: `.text` or `.bytes`.
    func receive(_ socket: WebSocket, data: WebSocketData) async throws
    func disconnect(_ socket: WebSocket, code: Int) async throws
}

extension WebSocketConsumer {
    /// Default: no session, no user, no ordering.
    public static var options: WebSocketConsumerConfiguration { .init() }
    /// Default: no groups.
    public func connectionGroups(_ socket: WebSocket) -> [String] { [] }
    /// Default: accept.
    public func connect(_ socket: WebSocket) async throws { try await socket.accept() }
    /// Default: ignore the frame.
    public func receive(_ socket: WebSocket, data: WebSocketData) async throws {}
    /// Default: nothing to do.
    public func disconnect(_ socket: WebSocket, code: Int) async throws {}
}

/// A JSON WebSocket consumer type, like Channels' `JsonWebsocketConsumer`: text frames are
/// decoded as `Incoming`; a frame that is not valid `Incoming` is logged and dropped.
public protocol JSONWebSocketConsumer: WebSocketConsumer {
    associatedtype Incoming: Decodable & Sendable
    func receive(_ socket: WebSocket, json: Incoming) async throws
}

extension JSONWebSocketConsumer {
    /// Decodes the frame as `Incoming` and hands it to `receive(_:json:)`; a frame that does not
    /// decode is logged and dropped.
    public func receive(_ socket: WebSocket, data: WebSocketData) async throws {
        switch data {
        case .text(let text): try await receiveJSONData(socket, Data(text.utf8))
        case .bytes(let bytes): try await receiveJSONData(socket, Data(bytes))
        }
    }

    func receiveJSONData(_ socket: WebSocket, _ data: Data) async throws {
        let value: Incoming
        do {
            value = try JSONDecoder().decode(Incoming.self, from: data)
        } catch {
            socket.context.logger.warning(
                "dropped a frame that is not valid JSON for \(Self.self)",
                metadata: ["path": "\(socket.path)", "error": "\(error)"])
            return
        }
        try await receive(socket, json: value)
    }
}

/// The socket-level plumbing shared by consumer types: dispatch by channel, groups on
/// connect/disconnect, and the session wrappers the options ask for.
enum WebSocketDispatch {
    static let channels = ASGIChannel.websocket

    static func wrap(_ options: WebSocketConsumerConfiguration, _ body: @escaping Consumer) -> Consumer {
        var consumer = body
        if let ordering = options.ordering { consumer = enforceOrdering(slight: ordering == .slight, consumer) }
        if options.httpUser {
            let inner = consumer
            let fromHTTP = channelSessionUserFromHTTP(inner)
            let later = channelSessionUser(inner)
            consumer = { context in
                try await (context.channel == ASGIChannel.websocketConnect ? fromHTTP : later)(context)
            }
        } else if options.channelSession {
            consumer = channelSession(consumer)
        }
        return consumer
    }
}

/// Routes a WebSocket consumer type for its three channels.
public func route<C: WebSocketConsumer>(
    _ type: C.Type, path: String? = nil, filters: [String: String] = [:],
    name: String? = nil
) -> RoutingEntry {
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
    case ASGIChannel.websocketConnect:
        if let reply = context.replyChannel {
            for group in instance.connectionGroups(socket) { try await context.layer.groupAdd(group, channel: reply.name) }
        }
        try await instance.connect(socket)
    case ASGIChannel.websocketReceive:
        let frame = try context.message(as: WebSocketReceiveMessage.self)
        try await instance.receive(socket, data: frame.data)
    case ASGIChannel.websocketDisconnect:
        let disconnect = try context.message(as: WebSocketDisconnectMessage.self)
        if let reply = context.replyChannel {
            for group in instance.connectionGroups(socket) { try await context.layer.groupDiscard(group, channel: reply.name) }
        }
        try await instance.disconnect(socket, code: disconnect.code)
    default:
        context.logger.warning("a WebSocket consumer got a message on an unexpected channel", metadata: ["channel": "\(context.channel)"])
    }
}
