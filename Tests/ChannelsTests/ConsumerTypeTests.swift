import ASGI
import ChannelsTesting
import Foundation
import Testing

@testable import Channels

/// A room consumer type: groups from the path, echo to the group, a goodbye on disconnect.
struct RoomConsumer: WebSocketConsumer {
    static let options = WebSocketConsumerConfiguration(channelSession: true, ordering: .strict)

    func connectionGroups(_ socket: WebSocket) -> [String] { ["room-" + (socket.parameters["room"] ?? "none")] }

    func connect(_ socket: WebSocket) async throws {
        try socket.session["joined"] = true
        try await socket.accept()
    }

    func receive(_ socket: WebSocket, data: WebSocketData) async throws {
        let text = data.text
        if text == "close" { return try await socket.close(code: 4001) }
        let joined = try socket.session["joined"]?.boolValue == true
        try await socket.groupSend(
            "room-" + (socket.parameters["room"] ?? "none"), text: "\(joined ? "member" : "stranger"): \(text ?? "")")
    }
}

struct Move: Codable, Sendable, Equatable {
    var x: Int
    var y: Int
}

struct MoveConsumer: JSONWebSocketConsumer, StreamConsumer {
    func receive(_ socket: WebSocket, json move: Move) async throws {
        try await socket.send(json: Move(x: move.x * 2, y: move.y * 2))
    }
}

struct ChatStream: StreamConsumer {
    func connect(_ socket: WebSocket) async throws { try await socket.send(text: "chat ready") }
    func receive(_ socket: WebSocket, payload: Data) async throws {
        try await socket.send(text: "chat got " + String(decoding: payload, as: UTF8.self))
    }
}

struct GameDemultiplexer: WebSocketDemultiplexer {
    static let streams: [String: any StreamConsumer.Type] = ["moves": MoveConsumer.self, "chat": ChatStream.self]
}

struct GreetingConsumer: HTTPConsumer {
    func handle(_ request: HTTPRequest) async throws -> HTTPResponse? {
        guard request.method == "POST" else { return HTTPResponse(status: 405, "POST only") }
        return try .json(["hello": request.form["name"] ?? "?", "who": request.parameters["who"] ?? "?"])
    }
}

@Suite("consumer types", .timeLimit(.minutes(2)))
struct ConsumerTypeTests {
    @Test func webSocketConsumerJoinsGroupsKeepsSessionAndCloses() async throws {
        let harness = try TestHarness([route(RoomConsumer.self, path: "^/room/(?P<room>[a-z]+)/$")])
        let a = WebSocketTestClient(harness, path: "/room/red/")
        let b = WebSocketTestClient(harness, path: "/room/red/")
        let c = WebSocketTestClient(harness, path: "/room/blue/")
        for socket in [a, b, c] { #expect(try await socket.connect()) }
        #expect(try await harness.layer.groupChannels("room-red").count == 2)
        try await a.send(text: "hi")
        #expect(try await a.receiveText() == "member: hi")
        #expect(try await b.receiveText() == "member: hi")
        #expect(try await c.receive(timeout: .zero) == nil, "another room hears nothing")
        try await a.send(text: "close")
        #expect(try await a.receive() == ["close": 4001])
        try await a.close(code: 4001)
        #expect(try await harness.layer.groupChannels("room-red") == [b.replyChannel!], "left its groups on disconnect")
    }

    @Test func jsonConsumerDecodesAndDropsBadFrames() async throws {
        let harness = try TestHarness([route(MoveConsumer.self, path: "^/move/$")])
        let socket = WebSocketTestClient(harness, path: "/move/")
        #expect(try await socket.connect())
        try await socket.send(text: #"{"x": 1, "y": 2}"#)
        #expect(try await socket.receiveText() == #"{"x":2,"y":4}"#)
        try await socket.send(text: "not json")
        try await socket.send(text: #"{"x": "one"}"#)
        #expect(try await socket.receive(timeout: .zero) == nil, "bad frames are dropped, not answered")
        try await socket.send(text: #"{"x": 5, "y": 0}"#)
        #expect(try await socket.receiveText() == #"{"x":10,"y":0}"#, "and the consumer goes on")
    }

    @Test func demultiplexerRoutesStreamsAndWrapsReplies() async throws {
        let harness = try TestHarness([route(GameDemultiplexer.self, path: "^/game/$")])
        let socket = WebSocketTestClient(harness, path: "/game/")
        #expect(try await socket.connect())
        #expect(try await socket.receiveText() == #"{"stream":"chat","payload":{"text":"chat ready"}}"#)
        try await socket.send(text: #"{"stream": "moves", "payload": {"x": 3, "y": 4}}"#)
        #expect(try await socket.receiveText() == #"{"stream":"moves","payload":{"x":6,"y":8}}"#)
        try await socket.send(text: #"{"stream": "chat", "payload": "yo"}"#)
        #expect(try await socket.receiveText() == #"{"stream":"chat","payload":{"text":"chat got \"yo\""}}"#)
        try await socket.send(text: #"{"stream": "nope", "payload": 1}"#)
        try await socket.send(text: #"{"payload": 1}"#)
        #expect(try await socket.receive(timeout: .zero) == nil)
    }

    @Test func httpConsumerRequestInResponseOut() async throws {
        let harness = try TestHarness([route(GreetingConsumer.self, path: "^/greet/(?P<who>[a-z]+)/$")])
        let client = HTTPTestClient(harness)
        let response = try await client.post("/greet/bob/", form: [("name", "Ann Lee")])
        #expect(response.status == 200)
        #expect(response.header("content-type") == "application/json")
        #expect(response.text == #"{"hello":"Ann Lee","who":"bob"}"#)
        #expect(try await client.get("/greet/bob/").status == 405)
        #expect(try await client.get("/elsewhere/").status == 404, "unrouted HTTP gets 404")
    }
}
