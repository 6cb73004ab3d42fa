import ASGI
import CoreMetrics
import Foundation
import Logging

/// What a binding frame says happened to an instance.
public enum BindingAction: String, Sendable, Codable, CaseIterable {
    /// Created.
    case create
    /// Changed.
    case update
    /// Deleted.
    case delete
}

/// Why an inbound binding change was not made.
public struct BindingError: Error, Sendable, CustomStringConvertible {
    /// Why the change was not made.
    public enum Code: Sendable, Hashable {
        /// The model does not take this action from a socket (the default `create`, `update`,
        /// `delete`), or the application refused it.
        case refused
        /// The frame lacks what the action needs (`data`, `pk`).
        case incomplete
        /// No instance has that primary key.
        case notFound
    }

    /// Why.
    public let code: Code
    /// The reason, as told to the socket.
    public let description: String

    /// An error with `description`, told to the socket.
    public init(_ description: String, code: Code = .refused) {
        self.code = code
        self.description = description
    }
}

/// Channels 1.x's `WebsocketBinding`: a model's creates, updates and deletes go to groups as
///
///     {"stream": "<stream>", "payload": {"action": "update", "model": "<model>", "pk": …, "data": {…}}}
///
/// and a socket's frames of the same shape (`{"action", "pk"?, "data"?}` as the stream's
/// payload) create, update or delete instances, each after ``hasPermission(_:action:pk:)``
/// (which refuses by default). A refused or failed change is answered to that socket only, as
/// `{"stream", "payload": {"action", "pk", "error"}}`, logged and counted
/// (`channels_binding_changes_total{outcome}`); nobody else hears of it.
///
/// Outbound: call ``changed(_:_:on:)`` wherever the model is written (an HTTP handler, a job,
/// a consumer: Django's signals, made explicit). A group that keeps a history
/// (``GroupHistory/keep(_:size:ttl:)``) gets the change published, with an offset, so a socket
/// that reconnects recovers edits and deletes as well as new messages. Inbound: a binding is a
/// ``StreamConsumer``, so it serves a stream of a ``WebSocketDemultiplexer``, or a consumer hands
/// it a payload with `receive(_:payload:)`.
public protocol WebSocketBinding: StreamConsumer {
    /// The bound model, as sent in `data`.
    associatedtype Model: Encodable & Sendable
    /// The model's primary key, as sent in `pk`.
    associatedtype PrimaryKey: Codable & Sendable
    /// What an inbound create or update carries in `data` (the fields a client may set).
    associatedtype Changes: Decodable & Sendable

    /// The demultiplexer stream the binding's frames travel on.
    static var stream: String { get }
    /// The model's label in outbound frames (`"chat.message"`).
    static var model: String { get }
    /// The groups that hear of a change to `instance`.
    static func groupNames(_ instance: Model) -> [String]
    /// `instance`'s primary key.
    static func primaryKey(_ instance: Model) -> PrimaryKey

    /// Whether the socket's user may do `action` (on `pk`; nil for a create). Default: no.
    func hasPermission(_ socket: WebSocket, action: BindingAction, pk: PrimaryKey?) async throws -> Bool
    /// Creates an instance from a socket's `data`. Default: not supported.
    func create(_ socket: WebSocket, _ changes: Changes) async throws -> Model
    /// Updates the instance `pk`; nil when there is none. Default: not supported.
    func update(_ socket: WebSocket, pk: PrimaryKey, _ changes: Changes) async throws -> Model?
    /// Deletes the instance `pk` and returns what it was; nil when there was none. Default: not supported.
    func delete(_ socket: WebSocket, pk: PrimaryKey) async throws -> Model?
}

/// An inbound binding payload.
struct BindingInbound<PrimaryKey: Decodable, Changes: Decodable>: Decodable {
    var action: BindingAction
    var pk: PrimaryKey?
    var data: Changes?
}

enum BindingMetrics {
    static let changes = Dictionary(
        uniqueKeysWithValues: ["applied", "refused", "failed", "malformed"].map {
            ($0, Counter(label: "channels_binding_changes_total", dimensions: [("outcome", $0)]))
        })
}

extension WebSocketBinding {
    /// Refuses: a binding says who may change what.
    public func hasPermission(_ socket: WebSocket, action: BindingAction, pk: PrimaryKey?) async throws -> Bool { false }
    /// Not supported.
    public func create(_ socket: WebSocket, _ changes: Changes) async throws -> Model {
        throw BindingError("\(Self.model) cannot be created from a socket")
    }
    /// Not supported.
    public func update(_ socket: WebSocket, pk: PrimaryKey, _ changes: Changes) async throws -> Model? {
        throw BindingError("\(Self.model) cannot be updated from a socket")
    }
    /// Not supported.
    public func delete(_ socket: WebSocket, pk: PrimaryKey) async throws -> Model? {
        throw BindingError("\(Self.model) cannot be deleted from a socket")
    }

    /// The frame text of a change.
    public static func frameText(_ instance: Model, _ action: BindingAction) throws -> String {
        let encoder = JSONEncoder.channels
        let pk = String(decoding: try encoder.encode(primaryKey(instance)), as: UTF8.self)
        let data = String(decoding: try encoder.encode(instance), as: UTF8.self)
        let payload = "{\"action\":\"\(action.rawValue)\",\"model\":\(JSONText.quote(model)),\"pk\":\(pk),\"data\":\(data)}"
        return StreamFrame(stream: stream, payload: payload).text
    }

    /// Tells every group of `instance` that it was created, updated or deleted: published (with
    /// an offset) to a group that keeps a history, sent to one that does not. Inside a consumer
    /// the sends go out with its others; outside one, on `layer` or ``ChannelLayers/default``.
    public static func changed(_ instance: Model, _ action: BindingAction, on layer: (any ChannelLayer)? = nil) async throws {
        let text = try frameText(instance, action)
        for group in groupNames(instance) {
            if GroupHistory.retention(for: group) != nil {
                try await Group(group).publish(text, on: layer)
            } else if let layer {
                try await Group(group).send(WebSocketSendMessage.text(text).message, on: layer)
            } else {
                try await Group(group).send(WebSocketSendMessage.text(text).message)
            }
        }
    }

    /// An inbound change: `{"action", "pk"?, "data"?}`. Checked, made, then told to the groups;
    /// otherwise answered to this socket with the reason.
    public func receive(_ socket: WebSocket, payload: Data) async throws {
        let inbound: BindingInbound<PrimaryKey, Changes>
        do {
            inbound = try JSONDecoder().decode(BindingInbound<PrimaryKey, Changes>.self, from: payload)
        } catch {
            BindingMetrics.changes["malformed"]?.increment()
            socket.context.logger.info("a binding frame was malformed", metadata: ["stream": "\(Self.stream)"])
            try await answer(socket, action: nil, pk: nil, error: "malformed: expected {\"action\", \"pk\", \"data\"}")
            return
        }
        let logger = socket.context.logger
        do {
            guard try await hasPermission(socket, action: inbound.action, pk: inbound.pk) else {
                BindingMetrics.changes["refused"]?.increment()
                logger.info(
                    "a binding change was refused",
                    metadata: ["stream": "\(Self.stream)", "action": "\(inbound.action.rawValue)", "user": "\(socket.user)"])
                try await answer(socket, action: inbound.action, pk: inbound.pk, error: "permission denied")
                return
            }
            let changed: Model?
            switch inbound.action {
            case .create:
                guard let data = inbound.data else { throw BindingError("a create needs data", code: .incomplete) }
                changed = try await create(socket, data)
            case .update:
                guard let pk = inbound.pk, let data = inbound.data else {
                    throw BindingError("an update needs pk and data", code: .incomplete)
                }
                changed = try await update(socket, pk: pk, data)
            case .delete:
                guard let pk = inbound.pk else { throw BindingError("a delete needs pk", code: .incomplete) }
                changed = try await delete(socket, pk: pk)
            }
            guard let changed else { throw BindingError("no such \(Self.model)", code: .notFound) }
            try await Self.changed(changed, inbound.action)
            BindingMetrics.changes["applied"]?.increment()
        } catch let error as BindingError {
            BindingMetrics.changes["failed"]?.increment()
            try await answer(socket, action: inbound.action, pk: inbound.pk, error: error.description)
        }
    }

    private func answer(_ socket: WebSocket, action: BindingAction?, pk: PrimaryKey?, error: String) async throws {
        var payload = "{\"error\":\(JSONText.quote(error))"
        if let action { payload += ",\"action\":\"\(action.rawValue)\"" }
        if let pk { payload += ",\"pk\":" + String(decoding: try JSONEncoder.channels.encode(pk), as: UTF8.self) }
        payload += "}"
        try await socket.context.reply(
            WebSocketSendMessage.text(StreamFrame(stream: Self.stream, payload: payload).text), immediately: true)
    }
}
