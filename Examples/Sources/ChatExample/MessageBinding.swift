import ASGI
import Channels
import Foundation
import Logging

/// Data binding of the chat's messages (Channels 1.x `WebsocketBinding`): an edit or a delete,
/// made through the HTTP API or from a socket, reaches every open page of the room as
/// `{"stream": "messages", "payload": {"action": "update"|"delete", "pk": id, "data": {…}}}`
/// (published to the room's history, so a page that reconnects gets it too). Only a
/// message's author, logged in, may change it; creating goes through the room's plain frames.
struct MessageBinding: WebSocketBinding {
    typealias Model = ChatMessage
    typealias PrimaryKey = Int64

    /// What a client may change: the text.
    struct Changes: Decodable, Sendable {
        var text: String
    }

    static let stream = "messages"
    static let model = "chat.message"
    static func groupNames(_ instance: ChatMessage) -> [String] { [ChatConsumers.roomGroup(instance.room).name] }
    static func primaryKey(_ instance: ChatMessage) -> Int64 { instance.id ?? 0 }

    init() {}

    func hasPermission(_ socket: WebSocket, action: BindingAction, pk: Int64?) async throws -> Bool {
        guard action != .create, let pk else { return false }
        return try await Self.mayChange(socket.user, pk: pk, room: socket.session["room"]?.stringValue)
    }

    func update(_ socket: WebSocket, pk: Int64, _ changes: Changes) async throws -> ChatMessage? {
        try await ChatDatabase.shared.updateText(id: pk, text: try Self.cleaned(changes.text))
    }

    func delete(_ socket: WebSocket, pk: Int64) async throws -> ChatMessage? {
        try await ChatDatabase.shared.deleteMessage(id: pk)
    }

    /// The author, logged in, in the message's room (when a room is given).
    static func mayChange(_ user: User, pk: Int64, room: String?) async throws -> Bool {
        guard user.isAuthenticated, user.username != ChatConsumers.guestName,
            let message = try await ChatDatabase.shared.message(id: pk), message.username != ChatConsumers.guestName
        else { return false }
        return message.username == user.username && (room == nil || room == message.room)
    }

    static func cleaned(_ text: String) throws -> String {
        let text = ChatConsumers.clipped(text)
        guard !text.isEmpty else { throw BindingError("a message needs text") }
        return text
    }

    /// `PATCH /api/rooms/<room>/messages/<id>/` (JSON `{"text"}`) and `DELETE` on the same path,
    /// with the session cookie and the CSRF token: the author changes a message; every open page
    /// of the room hears of it. 403 for anyone else, 404 for no such message in that room.
    @Sendable static func http(_ context: ConsumerContext) async throws {
        guard let id = Int64(context.parameters["id"] ?? ""), let room = context.parameters["room"] else { return }
        guard let existing = try await ChatDatabase.shared.message(id: id), existing.room == room else {
            return try await ChatConsumers.respondJSON(context, status: 404, ["error": "no such message"])
        }
        guard try await mayChange(context.user, pk: id, room: room) else {
            context.logger.info("a message change was refused", metadata: ["user": "\(context.user)", "id": "\(id)"])
            return try await ChatConsumers.respondJSON(context, status: 403, ["error": "only its author may change a message"])
        }
        let method = context.message["method"]?.stringValue?.uppercased()
        let changed: ChatMessage?
        let action: BindingAction
        if method == "DELETE" {
            changed = try await ChatDatabase.shared.deleteMessage(id: id)
            action = .delete
        } else {
            let body = try await context.requestBody()
            guard body.count <= 64 * 1024 else {
                return try await ChatConsumers.respondJSON(context, status: 413, ["error": "a message is at most 8,000 bytes"])
            }
            guard let changes = try? JSONDecoder().decode(Changes.self, from: Data(body)), let text = try? cleaned(changes.text) else {
                return try await ChatConsumers.respondJSON(context, status: 400, ["error": "expected {\"text\": \"…\"}"])
            }
            changed = try await ChatDatabase.shared.updateText(id: id, text: text)
            action = .update
        }
        guard let changed else { return try await ChatConsumers.respondJSON(context, status: 404, ["error": "no such message"]) }
        try await Self.changed(changed, action)
        try await ChatConsumers.respondJSON(context, changed.json)
    }
}
