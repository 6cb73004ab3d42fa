import ASGI
import Foundation
import Logging

/// A stream of a demultiplexer: a JSON consumer whose frames arrive as the `payload` of
/// `{"stream": name, "payload": ...}` and whose sends are wrapped the same way.
public protocol StreamConsumer: Sendable {
    init()
    func connect(_ socket: WebSocket) async throws
    func receive(_ socket: WebSocket, payload: Data) async throws
    func disconnect(_ socket: WebSocket, code: Int) async throws
}

extension StreamConsumer {
    /// Default: nothing to do on connect (the demultiplexer accepts the socket).
    public func connect(_ socket: WebSocket) async throws {}
    /// Default: nothing to do on disconnect.
    public func disconnect(_ socket: WebSocket, code: Int) async throws {}
}

extension StreamConsumer where Self: WebSocketConsumer {
    /// A consumer type used both on its own socket and as a stream: accept on its own socket;
    /// inside a demultiplexer the demultiplexer accepts.
    public func connect(_ socket: WebSocket) async throws {
        if socket.stream == nil { try await socket.accept() }
    }

    /// Default: nothing to do on disconnect.
    public func disconnect(_ socket: WebSocket, code: Int) async throws {}
}

extension StreamConsumer where Self: JSONWebSocketConsumer {
    /// Decodes the payload as the consumer's `Incoming` and hands it to `receive(_:json:)`.
    public func receive(_ socket: WebSocket, payload: Data) async throws { try await receiveJSONData(socket, payload) }
}

/// Like Channels' `WebsocketDemultiplexer`: one socket carries several streams; each frame is
/// `{"stream": name, "payload": ...}` and goes to that stream's consumer. Connect and
/// disconnect go to every stream's consumer; the socket is accepted once.
public protocol WebSocketDemultiplexer: WebSocketConsumer {
    static var streams: [String: any StreamConsumer.Type] { get }
}

extension WebSocketDemultiplexer {
    /// Accepts the socket once, then tells every stream's consumer, in name order.
    public func connect(_ socket: WebSocket) async throws {
        try await socket.accept()
        for (name, type) in Self.streams.sorted(by: { $0.key < $1.key }) {
            try await type.init().connect(WebSocket(context: socket.context, stream: name))
        }
    }

    /// Routes a `{"stream": ..., "payload": ...}` frame to that stream's consumer; other frames are
    /// logged and dropped.
    public func receive(_ socket: WebSocket, data: WebSocketData) async throws {
        let json =
            switch data {
            case .text(let text): Data(text.utf8)
            case .bytes(let bytes): Data(bytes)
            }
        guard let frame = StreamFrame(json: json) else {
            socket.context.logger.warning("dropped a frame without stream and payload", metadata: ["path": "\(socket.path)"])
            return
        }
        guard let type = Self.streams[frame.stream] else {
            socket.context.logger.warning("dropped a frame for an unknown stream", metadata: ["stream": "\(frame.stream)"])
            return
        }
        try await type.init().receive(WebSocket(context: socket.context, stream: frame.stream), payload: Data(frame.payload.utf8))
    }

    /// Tells every stream's consumer, in name order.
    public func disconnect(_ socket: WebSocket, code: Int) async throws {
        for (name, type) in Self.streams.sorted(by: { $0.key < $1.key }) {
            try await type.init().disconnect(WebSocket(context: socket.context, stream: name), code: code)
        }
    }
}
