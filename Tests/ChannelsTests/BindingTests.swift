import ASGI
import ChannelsTesting
import Foundation
import OrderedCollections
import Synchronization
import Testing

@testable import Channels

struct Note: Codable, Sendable, Equatable {
    var id: Int
    var owner: String
    var text: String
}

/// The notes the binding changes (one store per test run: the tests use their own ids).
let noteStore = Mutex<[Int: Note]>([:])

/// A binding whose permission is "the note's owner" (the socket's `who` path argument).
struct NoteBinding: WebSocketBinding {
    typealias Model = Note
    typealias PrimaryKey = Int
    struct Changes: Decodable, Sendable { var text: String }

    static let stream = "notes"
    static let model = "tests.note"
    static func groupNames(_ instance: Note) -> [String] { ["notes-\(instance.id / 100)"] }
    static func primaryKey(_ instance: Note) -> Int { instance.id }

    func hasPermission(_ socket: WebSocket, action: BindingAction, pk: Int?) async throws -> Bool {
        guard let who = socket.parameters["who"] else { return false }
        guard let pk else { return who == "ann" }
        return noteStore.withLock { $0[pk]?.owner } == who
    }

    func update(_ socket: WebSocket, pk: Int, _ changes: Changes) async throws -> Note? {
        noteStore.withLock { store in
            store[pk]?.text = changes.text
            return store[pk]
        }
    }

    func delete(_ socket: WebSocket, pk: Int) async throws -> Note? {
        noteStore.withLock { $0.removeValue(forKey: pk) }
    }
}

struct NotesSocket: WebSocketDemultiplexer {
    static let streams: [String: any StreamConsumer.Type] = ["notes": NoteBinding.self]
    func connectionGroups(_ socket: WebSocket) -> [String] { ["notes-\(socket.parameters["block"] ?? "0")"] }
}

@Suite("data binding", .timeLimit(.minutes(1)))
struct BindingTests {
    private func payload(_ text: String?) throws -> [String: Any]? {
        guard let text, let object = try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any] else { return nil }
        #expect(object["stream"] as? String == "notes")
        return object["payload"] as? [String: Any]
    }

    @Test func changesGoBothWaysAndARefusalIsToldToItsSocketAlone() async throws {
        noteStore.withLock { $0[101] = Note(id: 101, owner: "ann", text: "first") }
        let harness = try TestHarness([route(NotesSocket.self, path: "^/notes/(?P<block>[0-9]+)/(?P<who>[a-z]+)/$")])
        let ann = WebSocketTestClient(harness, path: "/notes/1/ann/")
        let bob = WebSocketTestClient(harness, path: "/notes/1/bob/")
        let elsewhere = WebSocketTestClient(harness, path: "/notes/2/ann/")
        for socket in [ann, bob, elsewhere] { #expect(try await socket.connect()) }

        // Bob may not change ann's note: he is told, nobody else hears of it, nothing changes.
        try await bob.send(text: #"{"stream":"notes","payload":{"action":"update","pk":101,"data":{"text":"bob's"}}}"#)
        let refusal = try #require(try payload(try await bob.receiveText()))
        #expect(
            refusal["error"] as? String == "permission denied" && refusal["pk"] as? Int == 101 && refusal["action"] as? String == "update")
        #expect(try await ann.receive(timeout: .zero) == nil)
        #expect(noteStore.withLock { $0[101]?.text } == "first")
        // Creating is not supported by this binding, even for ann (the permission lets her).
        try await ann.send(text: #"{"stream":"notes","payload":{"action":"create","data":{"text":"new"}}}"#)
        #expect(try payload(try await ann.receiveText())?["error"] as? String == "tests.note cannot be created from a socket")
        // A payload that is not a change is answered as malformed.
        try await bob.send(text: #"{"stream":"notes","payload":{"action":"explode"}}"#)
        #expect((try payload(try await bob.receiveText())?["error"] as? String)?.hasPrefix("malformed") == true)

        // Ann updates: every member of the note's group hears of it; another group does not.
        try await ann.send(text: #"{"stream":"notes","payload":{"action":"update","pk":101,"data":{"text":"second"}}}"#)
        let expected =
            #"{"stream":"notes","payload":{"action":"update","model":"tests.note","pk":101,"data":{"id":101,"owner":"ann","text":"second"}}}"#
        #expect(try await ann.receiveText() == expected)
        #expect(try await bob.receiveText() == expected)
        #expect(try await elsewhere.receive(timeout: .zero) == nil)
        #expect(noteStore.withLock { $0[101]?.text } == "second")

        // Outbound from outside any consumer (an HTTP handler of another framework, a job).
        let gone = try #require(noteStore.withLock { $0.removeValue(forKey: 101) })
        try await NoteBinding.changed(gone, .delete, on: harness.layer)
        for socket in [ann, bob] {
            let change = try #require(try payload(try await socket.receiveText()))
            #expect(change["action"] as? String == "delete" && change["pk"] as? Int == 101)
        }
        // Deleting what is gone: answered, not broadcast.
        try await ann.send(text: #"{"stream":"notes","payload":{"action":"delete","pk":101}}"#)
        #expect(try payload(try await ann.receiveText())?["error"] as? String == "permission denied")
        #expect(try await bob.receive(timeout: .zero) == nil)
    }

    @Test func aGroupWithHistoryGetsTheChangePublishedWithAnOffset() async throws {
        GroupHistory.keep("notes-7")
        let harness = try TestHarness([route(NotesSocket.self, path: "^/notes/(?P<block>[0-9]+)/(?P<who>[a-z]+)/$")])
        let member = WebSocketTestClient(harness, path: "/notes/7/ann/")
        #expect(try await member.connect())
        try await NoteBinding.changed(Note(id: 700, owner: "ann", text: "kept"), .update, on: harness.layer)
        let frame = try #require(try await member.receive())
        let text = try #require(frame["text"]?.stringValue)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
        #expect(object["offset"] as? Int == 1 && object["epoch"] as? String != nil, "\(text)")
        #expect(frame["publication"]?.mapValue?["group"]?.stringValue == "notes-7")
        let history: any ChannelLayerHistory = harness.layer
        let kept = try await history.historyRead(
            "notes-7", after: StreamPosition(offset: 0, epoch: object["epoch"] as! String), retention: .init(size: 10, ttl: .seconds(60)))
        #expect(kept.entries.count == 1)
    }
}
