import ASGI
import Channels
import Synchronization

/// A response an ``HTTPTestClient`` got.
public struct TestResponse: Sendable {
    public var status: Int
    public var headers: [(name: String, value: String)]
    public var body: [UInt8]

    public var text: String { String(decoding: body, as: UTF8.self) }

    /// The first header of this name (case-insensitive).
    public func header(_ name: String) -> String? {
        headers.first { $0.name.lowercased() == name.lowercased() }?.value
    }

    /// Every `Set-Cookie` header.
    public var setCookies: [String] { headers.filter { $0.name.lowercased() == "set-cookie" }.map(\.value) }
}

/// Sends `http.request` messages to the consumers, as the interface server would, and
/// assembles the response (streamed chunks included). Keeps cookies, like a browser.
public final class HTTPTestClient: Sendable {
    public let harness: TestHarness
    private let jar = Mutex<[String: String]>([:])

    public init(_ harness: TestHarness) { self.harness = harness }

    /// The cookies held now.
    public var cookies: [String: String] { jar.withLock { $0 } }

    public func setCookie(_ name: String, _ value: String) { jar.withLock { $0[name] = value } }

    public func get(_ path: String, query: String = "", headers: [(String, String)] = []) async throws -> TestResponse {
        try await request("GET", path, query: query, headers: headers)
    }

    public func post(_ path: String, form: [(String, String)], headers: [(String, String)] = []) async throws -> TestResponse {
        let body = form.map { "\(Self.formEscape($0.0))=\(Self.formEscape($0.1))" }.joined(separator: "&")
        return try await request("POST", path, headers: headers + [("content-type", "application/x-www-form-urlencoded")],
                                 body: Array(body.utf8))
    }

    public func request(_ method: String, _ path: String, query: String = "", headers: [(String, String)] = [],
                        body: [UInt8] = [], timeout: Duration = .seconds(5)) async throws -> TestResponse {
        let reply = try await harness.newReplyChannel()
        var headerList: [ASGIValue] = [[.utf8Bytes("host"), .utf8Bytes("testserver")]]
        for (name, value) in headers { headerList.append([.utf8Bytes(name.lowercased()), .utf8Bytes(value)]) }
        let cookieHeader = cookies.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: "; ")
        if !cookieHeader.isEmpty { headerList.append([.utf8Bytes("cookie"), .utf8Bytes(cookieHeader)]) }
        let message: Message = [
            "reply_channel": .string(reply), "http_version": "1.1", "method": .string(method.uppercased()),
            "scheme": "http", "path": .string(path), "query_string": .utf8Bytes(query), "root_path": "",
            "headers": .array(headerList), "body": .bytes(body), "client": ["127.0.0.1", 50000],
            "server": ["127.0.0.1", 80],
        ]
        try await harness.send(message, to: "http.request")
        guard let start = try await harness.receive(from: reply, timeout: timeout) else {
            throw ChannelLayerError(.backendError, "no response to \(method) \(path)")
        }
        let status = Int(try start.int("status"))
        var responseHeaders: [(name: String, value: String)] = []
        for header in start["headers"]?.arrayValue ?? [] {
            guard let pair = header.arrayValue, pair.count == 2 else { continue }
            responseHeaders.append((String(decoding: pair[0].bytesValue ?? [], as: UTF8.self),
                                    String(decoding: pair[1].bytesValue ?? [], as: UTF8.self)))
        }
        var content = start["content"]?.bytesValue ?? []
        var more = start["more_content"]?.boolValue ?? false
        while more {
            guard let chunk = try await harness.receive(from: reply, timeout: timeout) else {
                throw ChannelLayerError(.backendError, "a streamed response to \(method) \(path) stopped without its last chunk")
            }
            content += chunk["content"]?.bytesValue ?? []
            more = chunk["more_content"]?.boolValue ?? false
        }
        let response = TestResponse(status: status, headers: responseHeaders, body: content)
        for cookie in response.setCookies { absorb(cookie) }
        return response
    }

    private func absorb(_ setCookie: String) {
        let first = setCookie.split(separator: ";", maxSplits: 1).first.map(String.init) ?? ""
        guard let eq = first.firstIndex(of: "=") else { return }
        let name = String(first[..<eq]).trimmingCharacters(in: .whitespaces)
        let value = String(first[first.index(after: eq)...])
        let expired = setCookie.lowercased().contains("max-age=0")
        jar.withLock { $0[name] = expired || value.isEmpty ? nil : value }
    }

    static func formEscape(_ text: String) -> String {
        var out = ""
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "_"), UInt8(ascii: "."), UInt8(ascii: "~"):
                out.append(Character(UnicodeScalar(byte)))
            case UInt8(ascii: " "): out.append("+")
            default: out += "%" + (byte < 16 ? "0" : "") + String(byte, radix: 16, uppercase: true)
            }
        }
        return out
    }
}

extension String {
    fileprivate func trimmingCharacters(in _: Whitespace) -> String {
        var s = Substring(self)
        while s.first == " " { s = s.dropFirst() }
        while s.last == " " { s = s.dropLast() }
        return String(s)
    }

    fileprivate enum Whitespace { case whitespaces }
}

/// A WebSocket as the consumers see it, without a server: `connect`, `send`, `receive` and
/// `close` produce the `websocket.*` messages with `order` numbers filled in.
public final class WebSocketTestClient: Sendable {
    public let harness: TestHarness
    public let path: String
    private let headers: [(String, String)]
    private let query: String
    private struct State {
        var reply: String?
        var order: Int64 = 0
        var early: [Message] = []
    }

    private let state = Mutex(State())

    /// - Parameter cookies: sent as the `Cookie` header of the connect (an ``HTTPTestClient``'s jar, say).
    public init(_ harness: TestHarness, path: String, query: String = "", headers: [(String, String)] = [],
                cookies: [String: String] = [:]) {
        self.harness = harness
        self.path = path
        self.query = query
        var all = headers
        if !cookies.isEmpty {
            all.append(("cookie", cookies.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: "; ")))
        }
        self.headers = all
    }

    /// The socket's reply channel (after `connect`).
    public var replyChannel: String? { state.withLock { $0.reply } }

    private func base(_ reply: String) -> Message {
        var headerList: [ASGIValue] = [[.utf8Bytes("host"), .utf8Bytes("testserver")]]
        for (name, value) in headers { headerList.append([.utf8Bytes(name.lowercased()), .utf8Bytes(value)]) }
        return ["reply_channel": .string(reply), "path": .string(path), "query_string": .utf8Bytes(query),
                "headers": .array(headerList), "client": ["127.0.0.1", 50001], "server": ["127.0.0.1", 80]]
    }

    /// Sends `websocket.connect` (order 0) and returns whether the application accepted:
    /// `accept: true`, or a first `text`/`bytes` (an implicit accept, kept for `receive`).
    @discardableResult
    public func connect(timeout: Duration = .seconds(5)) async throws -> Bool {
        let reply = try await harness.newReplyChannel()
        state.withLock { $0.reply = reply; $0.order = 0 }
        var message = base(reply)
        message.fields["order"] = 0
        message.fields["scheme"] = "ws"
        try await harness.send(message, to: "websocket.connect")
        guard let answer = try await harness.receive(from: reply, timeout: timeout) else { return false }
        if answer["accept"]?.boolValue == true { return true }
        if answer["text"] != nil || answer["bytes"] != nil {
            state.withLock { $0.early.append(answer) }
            return true
        }
        return false
    }

    private func nextOrder() throws -> (String, Int64) {
        try state.withLock { state in
            guard let reply = state.reply else { throw ChannelLayerError(.invalidMessage, "connect the test WebSocket first") }
            state.order += 1
            return (reply, state.order)
        }
    }

    public func send(text: String) async throws { try await send(["text": .string(text)]) }
    public func send(bytes: [UInt8]) async throws { try await send(["bytes": .bytes(bytes)]) }

    private func send(_ payload: Message) async throws {
        let (reply, order) = try nextOrder()
        var message: Message = ["reply_channel": .string(reply), "path": .string(path), "order": .int(order)]
        for (key, value) in payload.fields { message.fields[key] = value }
        try await harness.send(message, to: "websocket.receive")
    }

    /// Sends `websocket.receive` with an explicit order (to test ordering) without running it.
    public func enqueue(text: String, order: Int64) async throws {
        guard let reply = replyChannel else { throw ChannelLayerError(.invalidMessage, "connect the test WebSocket first") }
        try await harness.layer.base.send(["reply_channel": .string(reply), "path": .string(path), "order": .int(order),
                                           "text": .string(text)], to: "websocket.receive")
    }

    /// The next message the application sent to this socket, or nil after `timeout`.
    public func receive(timeout: Duration = .seconds(1)) async throws -> Message? {
        if let early = state.withLock({ $0.early.isEmpty ? nil : $0.early.removeFirst() }) { return early }
        guard let reply = replyChannel else { return nil }
        return try await harness.receive(from: reply, timeout: timeout)
    }

    /// The text of the next message, if it is a text frame.
    public func receiveText(timeout: Duration = .seconds(1)) async throws -> String? {
        try await receive(timeout: timeout)?["text"]?.stringValue
    }

    /// Sends `websocket.disconnect` with `code`.
    public func close(code: Int = 1000) async throws {
        let (reply, order) = try nextOrder()
        try await harness.send(["reply_channel": .string(reply), "path": .string(path), "order": .int(order),
                                "code": .int(Int64(code))], to: "websocket.disconnect")
    }
}
