import ASGI
import Channels
import Foundation

enum ChatConsumers {
    @Sendable static func hello(_ context: ConsumerContext) async throws {
        try await context.respond("Hello world! You asked for \(context.path)")
    }

    @Sendable static func poll(_ context: ConsumerContext) async throws {
        let body = try await context.requestBody()
        try await context.respond(contentType: "application/json", "{\"received\": \(body.count)}")
    }

    /// A streamed response: chunks go out as they are sent (chunked transfer encoding).
    @Sendable static func stream(_ context: ConsumerContext) async throws {
        try await context.respondStart(firstChunk: Array("chunk 0\n".utf8))
        for i in 1...3 { try await context.respondChunk(Array("chunk \(i)\n".utf8)) }
        try await context.respondChunk([], last: true)
    }

    @Sendable static func page(_ context: ConsumerContext) async throws {
        try await context.respond(contentType: "text/html; charset=utf-8", ChatPage.html)
    }

    @Sendable static func accept(_ context: ConsumerContext) async throws {
        try await context.accept()
    }

    @Sendable static func echo(_ context: ConsumerContext) async throws {
        if let text = context.message["text"]?.stringValue {
            try await context.reply(["text": .string(text)])
        } else if let bytes = context.message["bytes"]?.bytesValue {
            try await context.reply(["bytes": .bytes(bytes)])
        }
    }

    static func group(_ context: ConsumerContext) -> Group {
        Group("chat-" + (context.kwargs["room"] ?? "lobby"))
    }

    @Sendable static func joinRoom(_ context: ConsumerContext) async throws {
        guard let reply = context.replyChannel else { return }
        try await group(context).add(reply)
        try await context.accept()
    }

    /// A frame from a member goes through the `chat-messages` channel, whose consumer
    /// broadcasts it (and is where it would be stored), as in the seed's "Models" step.
    @Sendable static func postToRoom(_ context: ConsumerContext) async throws {
        guard let text = context.message["text"]?.stringValue else { return }
        try await Channel("chat-messages").send([
            "room": .string(context.kwargs["room"] ?? "lobby"),
            "user": "anonymous",
            "text": .string(text),
        ])
    }

    @Sendable static func leaveRoom(_ context: ConsumerContext) async throws {
        guard let reply = context.replyChannel else { return }
        try await group(context).discard(reply)
    }

    @Sendable static func broadcast(_ context: ConsumerContext) async throws {
        let room = try context.message.string("room")
        let payload: [String: String] = [
            "room": room,
            "user": try context.message.string("user"),
            "text": try context.message.string("text"),
        ]
        let json = String(decoding: try JSONSerialization.data(withJSONObject: payload, options: [.sortedKeys]), as: UTF8.self)
        try await Group("chat-" + room).send(["text": .string(json)])
    }
}
