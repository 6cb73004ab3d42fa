import ASGI
import Channels
import Synchronization

/// A response an ``HTTPTestClient`` got.
public struct TestResponse: Sendable {
    /// The status code.
    public var status: Int
    /// The response headers, names lower-cased.
    public var headers: ASGIHeaders
    /// The whole body (streamed chunks joined).
    public var body: [UInt8]

    /// The body as UTF-8 text.
    public var text: String { String(decoding: body, as: UTF8.self) }

    /// The first header of this name (case-insensitive).
    public func header(_ name: String) -> String? { headers.first(name) }

    /// Every `Set-Cookie` header.
    public var setCookies: [String] { headers.values("set-cookie") }
}

/// Sends `http.request` messages to the consumers, as the interface server would, and
/// assembles the response (streamed chunks included). Keeps cookies, like a browser.
public final class HTTPTestClient: Sendable {
    /// The harness whose consumers answer.
    public let harness: TestHarness
    private let jar = Mutex<[String: String]>([:])

    /// A client with an empty cookie jar.
    public init(_ harness: TestHarness) { self.harness = harness }

    /// The cookies held now.
    public var cookies: [String: String] { jar.withLock { $0 } }

    /// Puts a cookie in the jar, as if a response had set it.
    public func setCookie(_ name: String, _ value: String) { jar.withLock { $0[name] = value } }

    /// Logs `user` in without a login form (Django's `force_login`): a new session in the
    /// harness's store, its cookie kept by this client (and given to sockets made with
    /// `cookies:`). The harness's `users` must know the user for consumers to see it.
    public func forceLogin(_ user: User) async throws {
        let key = try await Session.loggedIn(user, environment: harness.environment)
        setCookie(harness.environment.sessionConfiguration.cookieName, key)
    }

    /// Logs in with credentials (Django's `client.login`): the harness's `users` must be a
    /// `UserAuthenticator`; true when it accepted them (the client then holds the session
    /// cookie, as after ``forceLogin(_:)``), false when they are wrong.
    @discardableResult
    public func login(username: String, password: String) async throws -> Bool {
        guard let authenticator = harness.environment.users as? any UserAuthenticator else {
            throw TestClientError(
                .notSupported, "login(username:password:) needs the harness's users to be a UserAuthenticator; use forceLogin(_:)")
        }
        guard let user = try await authenticator.authenticate(username: username, password: password) else { return false }
        try await forceLogin(user)
        return true
    }

    /// Forgets the session cookie (the client is anonymous again).
    public func logout() {
        let name = harness.environment.sessionConfiguration.cookieName
        _ = jar.withLock { $0.removeValue(forKey: name) }
    }

    /// Sends a GET and returns the response.
    public func get(_ path: String, query: String = "", headers: [(String, String)] = []) async throws -> TestResponse {
        try await request("GET", path, query: query, headers: headers)
    }

    /// Sends a POST with a form-encoded body and returns the response.
    public func post(_ path: String, form: [(String, String)], headers: [(String, String)] = []) async throws -> TestResponse {
        let body = PercentCoding.formEncode(form)
        return try await request(
            "POST", path, headers: headers + [("content-type", "application/x-www-form-urlencoded")],
            body: Array(body.utf8))
    }

    /// Sends any request and returns the response; cookies from the jar go with it and `Set-Cookie`
    /// updates it.
    public func request(
        _ method: String, _ path: String, query: String = "", headers: [(String, String)] = [],
        body: [UInt8] = [], scheme: String = "http", timeout: Duration = .seconds(5)
    ) async throws -> TestResponse {
        let reply = try await harness.newReplyChannel()
        var headerList: ASGIHeaders = [("host", "testserver")]
        for (name, value) in headers { headerList.add(name: name, value: value) }
        let cookieHeader = cookies.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: "; ")
        if !cookieHeader.isEmpty { headerList.add(name: "cookie", value: cookieHeader) }
        let message = HTTPRequestMessage(
            replyChannel: ReplyChannelName(trusted: reply), method: method.uppercased(), scheme: scheme, path: path,
            queryString: Array(query.utf8),
            headers: headerList,
            body: body, client: ASGIAddress(host: "127.0.0.1", port: 50000), server: ASGIAddress(host: "127.0.0.1", port: 80))
        try await harness.send(message.message, to: ASGIChannel.httpRequest)
        guard let first = try await harness.receive(from: reply, timeout: timeout) else {
            throw TestClientError(.noResponse, "no response to \(method) \(path)")
        }
        let start = try HTTPResponseStart(first)
        var content = start.content
        var more = start.moreContent
        while more {
            guard let next = try await harness.receive(from: reply, timeout: timeout) else {
                throw TestClientError(.responseCut, "a streamed response to \(method) \(path) stopped without its last chunk")
            }
            let chunk = try HTTPResponseChunk(next)
            content += chunk.content
            more = chunk.moreContent
        }
        let response = TestResponse(status: start.status, headers: start.headers, body: content)
        for cookie in response.setCookies { absorb(cookie) }
        return response
    }

    private func absorb(_ setCookie: String) {
        let first = setCookie.split(separator: ";", maxSplits: 1).first.map(String.init) ?? ""
        guard let eq = first.firstIndex(of: "=") else { return }
        let name = String(first[..<eq].drop { $0 == " " })
        let value = String(first[first.index(after: eq)...])
        let expired = setCookie.lowercased().contains("max-age=0")
        jar.withLock { $0[name] = expired || value.isEmpty ? nil : value }
    }
}

/// A WebSocket as the consumers see it, without a server: `connect`, `send`, `receive` and
/// `close` produce the `websocket.*` messages with `order` numbers filled in.
public final class WebSocketTestClient: Sendable {
    /// The harness whose consumers answer.
    public let harness: TestHarness
    /// The socket's path.
    public let path: String
    private let headers: [(String, String)]
    private let query: String
    private struct State {
        var reply: String?
        var order: Int64 = 0
        var early: [Message] = []
    }

    private let state = Mutex(State())

    /// A WebSocket client of `harness` for `path`; it connects when told to.
    ///
    /// - Parameters:
    ///   - harness: the harness whose consumers it talks to.
    ///   - path: the socket's path (routing matches it).
    ///   - query: the query string, without `?`.
    ///   - headers: more headers of the connect.
    ///   - cookies: sent as the `Cookie` header of the connect (an ``HTTPTestClient``'s jar, say).
    public init(
        _ harness: TestHarness, path: String, query: String = "", headers: [(String, String)] = [],
        cookies: [String: String] = [:]
    ) {
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

    /// Sends `websocket.connect` (order 0) and returns whether the application accepted:
    /// `accept: true`, or a first `text`/`bytes` (an implicit accept, kept for `receive`).
    @discardableResult
    public func connect(timeout: Duration = .seconds(5)) async throws -> Bool {
        let reply = try await harness.newReplyChannel()
        state.withLock {
            $0.reply = reply; $0.order = 0
        }
        var headerList: ASGIHeaders = [("host", "testserver")]
        for (name, value) in headers { headerList.add(name: name, value: value) }
        let message = WebSocketConnectMessage(
            replyChannel: ReplyChannelName(trusted: reply), path: path, queryString: Array(query.utf8), headers: headerList,
            client: ASGIAddress(host: "127.0.0.1", port: 50001), server: ASGIAddress(host: "127.0.0.1", port: 80))
        try await harness.send(message.message, to: ASGIChannel.websocketConnect)
        guard let answer = try await harness.receive(from: reply, timeout: timeout) else { return false }
        let send = try WebSocketSendMessage(answer)
        if send.accept == true { return true }
        if send.data != nil {
            state.withLock { $0.early.append(answer) }
            return true
        }
        return false
    }

    private func nextOrder() throws -> (String, Int64) {
        try state.withLock { state in
            guard let reply = state.reply else { throw TestClientError(.notConnected, "connect the test WebSocket first") }
            state.order += 1
            return (reply, state.order)
        }
    }

    /// Sends a text frame as `websocket.receive`.
    public func send(text: String) async throws { try await send(.text(text)) }
    /// Sends a binary frame as `websocket.receive`.
    public func send(bytes: [UInt8]) async throws { try await send(.bytes(bytes)) }

    private func send(_ data: WebSocketData) async throws {
        let (reply, order) = try nextOrder()
        let message = WebSocketReceiveMessage(replyChannel: ReplyChannelName(trusted: reply), path: path, order: order, data: data)
        try await harness.send(message.message, to: ASGIChannel.websocketReceive)
    }

    /// Sends `websocket.receive` with an explicit order (to test ordering) without running it.
    public func enqueue(text: String, order: Int64) async throws {
        guard let reply = replyChannel else { throw TestClientError(.notConnected, "connect the test WebSocket first") }
        let message = WebSocketReceiveMessage(replyChannel: ReplyChannelName(trusted: reply), path: path, order: order, data: .text(text))
        try await harness.layer.base.send(message.message, to: ASGIChannel.websocketReceive)
    }

    /// The next message the application sent to this socket, or nil after `timeout`.
    public func receive(timeout: Duration = .seconds(1)) async throws -> Message? {
        if let early = state.withLock({ $0.early.isEmpty ? nil : $0.early.removeFirst() }) { return early }
        guard let reply = replyChannel else { return nil }
        return try await harness.receive(from: reply, timeout: timeout)
    }

    /// The text of the next message, if it is a text frame.
    public func receiveText(timeout: Duration = .seconds(1)) async throws -> String? {
        guard let message = try await receive(timeout: timeout) else { return nil }
        return try WebSocketSendMessage(message).data?.text
    }

    /// Sends `websocket.disconnect` with `code`.
    public func close(code: Int = 1000) async throws {
        let (reply, order) = try nextOrder()
        let message = WebSocketDisconnectMessage(replyChannel: ReplyChannelName(trusted: reply), code: code, path: path, order: order)
        try await harness.send(message.message, to: ASGIChannel.websocketDisconnect)
    }
}
