import ASGI
import Channels
import CoreMetrics
import Foundation
import Logging

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

    /// `GET /download/<n>/`: n MiB of generated text (n up to 64), made a chunk at a time as
    /// the client takes it (with its `content-length`): a client that stops reading holds this
    /// consumer's next chunk, not the whole body, and the worker's slot serves others meanwhile.
    @Sendable static func download(_ context: ConsumerContext) async throws {
        let total = min(64, Int(context.parameters["mib"] ?? "1") ?? 1) << 20
        let chunkSize = context.responseChunkSize
        // Lines of 129 bytes, repeated: a chunk is a slice of this, starting where its offset
        // falls in a line.
        let line = Array(
            "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/\n"
                .utf8)
        var lines: [UInt8] = []
        lines.reserveCapacity(chunkSize + line.count)
        while lines.count < chunkSize + line.count { lines += line }
        func chunk(at offset: Int) -> [UInt8] {
            let start = offset % line.count
            return Array(lines[start..<start + min(chunkSize, total - offset)])
        }
        try await context.respondStart(contentType: "text/plain", headers: [("content-length", String(total))], firstChunk: chunk(at: 0))
        var offset = min(chunkSize, total)
        while true {
            let next = offset < total ? chunk(at: offset) : []
            offset += next.count
            try await context.respondChunk(next, last: offset >= total)
            if offset >= total { break }
        }
    }

    /// `GET /events/?n=<count>`: server-sent events, one a second (3 by default, up to an
    /// hour's): each reaches the browser when sent. A stream outlives `--http-timeout` (a time to
    /// first byte), and stops when the client leaves (the sleep below is cancelled).
    @Sendable static func events(_ context: ConsumerContext) async throws {
        let count = min(3600, max(1, (try? HTTPRequestMessage(context.message))?.query("n").flatMap { Int($0) } ?? 3))
        try await context.respondStart(contentType: "text/event-stream", firstChunk: Array("data: event 0\n\n".utf8))
        for i in 1...count {
            try await Task.sleep(for: .seconds(1))
            try await context.respondChunk(Array("data: event \(i)\n\n".utf8))
        }
        try await context.respondChunk([], last: true)
    }

    @Sendable static func page(_ context: ConsumerContext) async throws {
        try await context.respond(contentType: "text/html; charset=utf-8", ChatPage.html)
    }

    static func json(_ object: [String: Any]) -> String {
        String(
            decoding: (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8),
            as: UTF8.self)
    }

    static func respondJSON(_ context: ConsumerContext, status: Int = 200, _ object: [String: Any]) async throws {
        try await context.respond(status: status, contentType: "application/json", json(object))
    }

    // MARK: Accounts

    static let usernamePattern = try! NSRegularExpression(pattern: "^[A-Za-z0-9_.-]{1,30}$")
    /// The author name of a guest's messages.
    static let guestName = "anonymous"

    /// A chat text as stored: trimmed, at most 2,000 characters and 8,000 bytes (a character may
    /// carry any number of combining marks: a character limit alone bounds nothing).
    static func clipped(_ text: String) -> String {
        var scalars = String.UnicodeScalarView()
        var bytes = 0
        for scalar in text.trimmingCharacters(in: .whitespacesAndNewlines).unicodeScalars {
            bytes += UTF8.width(scalar)
            if bytes > 8000 { break }
            scalars.append(scalar)
        }
        return String(String(scalars).prefix(2000))
    }

    /// Login limits: attempts per user name and per client address within one
    /// window (seconds). The counters live in the layer's Redis when there is one.
    static let attemptsPerName = environmentInt("CHAT_LOGIN_ATTEMPTS_PER_NAME", 5)
    static let attemptsPerAddress = environmentInt("CHAT_LOGIN_ATTEMPTS_PER_ADDRESS", 30)
    static let loginWindow = environmentInt("CHAT_LOGIN_WINDOW", 60)
    /// PBKDF2 rounds for new passwords (Django 5.1's count; lower only in tests).
    static let passwordIterations = environmentInt("CHAT_PASSWORD_ITERATIONS", PasswordHasher.defaultIterations)

    static func environmentInt(_ name: String, _ fallback: Int) -> Int {
        ProcessInfo.processInfo.environment[name].flatMap { Int($0) }.flatMap { $0 > 0 ? $0 : nil } ?? fallback
    }

    /// The one answer for an unknown name and a wrong password: neither says the name exists.
    static let refusal = "invalid user name or password"

    /// The user name and password of a login or registration form, or the 400 to answer.
    static func credentials(_ context: ConsumerContext) async throws -> (String, String)? {
        let form = HTTPRequestInfo.formFields(try await context.requestBody())
        let username = (form["username"] ?? "").trimmingCharacters(in: .whitespaces)
        let password = form["password"] ?? ""
        guard usernamePattern.firstMatch(in: username, range: NSRange(username.startIndex..., in: username)) != nil else {
            try await respondJSON(context, status: 400, ["error": "a user name is 1 to 30 letters, digits, '.', '_' or '-'"])
            return nil
        }
        // The name guests' messages are stored under (and a guest's presence prefix): nobody's account.
        guard username.lowercased() != guestName, !username.lowercased().hasPrefix("guest-") else {
            try await respondJSON(context, status: 400, ["error": "that user name is reserved"])
            return nil
        }
        guard password.count >= 4, password.count <= 1024 else {
            try await respondJSON(context, status: 400, ["error": "a password has 4 to 1024 characters"])
            return nil
        }
        return (username, password)
    }

    /// Counts an attempt from this client address; answers 429 (with `Retry-After`) and
    /// returns false past the limit.
    static func allowAttempt(_ context: ConsumerContext, name: String? = nil) async throws -> Bool {
        let limiter = context.environment.rateLimiter
        let address = context.message["client"]?.arrayValue?.first?.stringValue ?? "unknown"
        let perAddress = try await limiter.hit("login:addr:" + address, window: loginWindow)
        var retryAfter = perAddress.count > attemptsPerAddress ? perAddress.resetIn : nil
        if retryAfter == nil, let name {
            // Counted before the password is checked, in one step: parallel guesses cannot slip
            // between a check and a count. Names are case-sensitive, so is their count.
            let perName = try await limiter.hit("login:name:" + name, window: loginWindow)
            if perName.count > attemptsPerName { retryAfter = perName.resetIn }
        }
        guard let retryAfter else { return true }
        context.logger.warning("login rate limited", metadata: ["user": "\(name ?? "")"])
        try await context.respond(
            status: 429, contentType: "application/json", headers: [("Retry-After", String(max(1, retryAfter)))],
            json(["error": "too many attempts; try again in \(max(1, retryAfter)) s"]))
        return false
    }

    /// The password checked on the hashing pool; nil (and 503 answered) when the pool is saturated.
    static func verifyPassword(_ context: ConsumerContext, _ password: String, against hash: String?) async throws -> Bool? {
        do {
            return try await PasswordHasher.verify(password, against: hash, iterations: passwordIterations)
        } catch let refusal as PasswordHasher.Busy {
            try await busy(context, retryAfter: refusal.retryAfter)
            return nil
        }
    }

    /// 503 with the hashing pool's `Retry-After` (spread at random, so refused clients do not
    /// all come back at once).
    static func busy(_ context: ConsumerContext, retryAfter: Int) async throws {
        try await context.respond(
            status: 503, contentType: "application/json", headers: [("Retry-After", String(retryAfter))],
            json(["error": "busy; try again in \(retryAfter) s"]))
    }

    /// `GET /api/csrf/`: a CSRF token for the page's POSTs (also set as the `csrftoken` cookie).
    @Sendable static func csrf(_ context: ConsumerContext) async throws {
        try await respondJSON(context, ["csrf_token": context.csrfToken()])
    }

    /// `POST /api/login/` with `username` and `password` (a form) and the CSRF token: logs in.
    /// It never creates an account (that is `/api/register/`), answers an unknown name exactly as
    /// a wrong password, and limits failures per name and attempts per address.
    @Sendable static func login(_ context: ConsumerContext) async throws {
        guard let (username, password) = try await credentials(context) else { return }
        guard try await allowAttempt(context, name: username) else { return }
        let account = try await ChatDatabase.shared.account(named: username)
        // Hashed on the hashing pool, also for an unknown name (same time either way).
        guard let valid = try await verifyPassword(context, password, against: account?.passwordHash) else { return }
        guard valid, let account, let id = account.id else {
            context.logger.info("login refused", metadata: ["user": "\(username)"])
            return try await respondJSON(context, status: 403, ["error": refusal])
        }
        try await context.login(User(id: String(id), username: account.username))
        context.logger.info("login", metadata: ["user": "\(account.username)"])
        try await respondJSON(context, ["user": account.username, "csrf_token": context.csrfToken()])
    }

    /// `POST /api/register/` with `username` and `password` and the CSRF token: creates the
    /// account and logs in; 409 when the name is taken.
    @Sendable static func register(_ context: ConsumerContext) async throws {
        guard let (username, password) = try await credentials(context) else { return }
        guard try await allowAttempt(context) else { return }
        let hash: String
        do {
            hash = try await PasswordHasher.hash(password, iterations: passwordIterations)
        } catch let refusal as PasswordHasher.Busy {
            return try await busy(context, retryAfter: refusal.retryAfter)
        }
        guard let account = try await ChatDatabase.shared.createAccount(username: username, passwordHash: hash), let id = account.id
        else {
            return try await respondJSON(context, status: 409, ["error": "that name is taken"])
        }
        try await context.login(User(id: String(id), username: account.username))
        context.logger.info("registered", metadata: ["user": "\(account.username)"])
        try await respondJSON(context, ["user": account.username, "csrf_token": context.csrfToken()])
    }

    /// `POST /api/token/` with `username` and `password`: a signed token (JWT, an hour) for a
    /// client without cookies, the same limits as a login. Use it as `Authorization: Bearer`,
    /// `?token=` or a WebSocket subprotocol on `/mobile/`.
    @Sendable static func token(_ context: ConsumerContext) async throws {
        guard let (username, password) = try await credentials(context) else { return }
        guard try await allowAttempt(context, name: username) else { return }
        let account = try await ChatDatabase.shared.account(named: username)
        guard let valid = try await verifyPassword(context, password, against: account?.passwordHash) else { return }
        guard valid, let account, let id = account.id, let tokens = context.environment.tokens else {
            return try await respondJSON(context, status: 403, ["error": refusal])
        }
        let token = try await tokens.issue(for: User(id: String(id), username: account.username), lifetime: .seconds(3600))
        try await respondJSON(context, ["token": token, "token_type": "Bearer", "expires_in": 3600])
    }

    /// `ws /mobile/`: a socket for token holders (403 without a valid token); the user is kept in
    /// the channel session for the socket's later messages, which are echoed with the name.
    @Sendable static func mobileConnect(_ context: ConsumerContext) async throws {
        try context.channelSession["_auth_user_id"] = .string(context.user.id)
        try await context.accept()
        try await context.sendText(json(["type": "welcome", "user": context.user.username]))
    }

    @Sendable static func mobileEcho(_ context: ConsumerContext) async throws {
        let text = try context.message(as: WebSocketReceiveMessage.self).data.text ?? ""
        try await context.sendText("\(context.user.username): \(text)")
    }

    @Sendable static func logout(_ context: ConsumerContext) async throws {
        try await context.logout()
        try await respondJSON(context, ["user": NSNull(), "csrf_token": context.csrfToken()])
    }

    @Sendable static func me(_ context: ConsumerContext) async throws {
        try await respondJSON(context, ["user": context.user.isAuthenticated ? context.user.username : NSNull()])
    }

    @Sendable static func historyJSON(_ context: ConsumerContext) async throws {
        let messages = try await ChatDatabase.shared.history(room: context.parameters["room"] ?? "lobby")
        try await respondJSON(context, ["messages": messages.map(\.json)])
    }

    // MARK: Sockets

    @Sendable static func accept(_ context: ConsumerContext) async throws {
        try await context.accept()
    }

    @Sendable static func echo(_ context: ConsumerContext) async throws {
        let frame = try context.message(as: WebSocketReceiveMessage.self)
        try await context.reply(WebSocketSendMessage(data: frame.data))
    }

    @Sendable static func privateConnect(_ context: ConsumerContext) async throws {
        guard context.user.isAuthenticated else { throw ConsumerError.denyConnection }
        try await context.accept()
        try await context.sendText(json(["type": "welcome", "user": context.user.username]))
    }

    static func roomGroup(_ room: String) -> Group { Group("chat-" + room) }
    static func userGroup(_ user: User) -> Group { Group("user-" + user.username) }

    /// Joins the room of the path: remembers it in the channel session, follows its group (a
    /// socket that comes back with `?offset=&epoch=` first gets what it missed), is tracked in
    /// the room's presence, joins the user's own group, accepts, and sends the room's recent
    /// history (not when recovering: the page has it).
    @Sendable static func joinRoom(_ context: ConsumerContext) async throws {
        guard let reply = context.replyChannel else { return }
        let room = context.parameters["room"] ?? "lobby"
        try context.channelSession["room"] = .string(room)
        if context.user.isAuthenticated {
            try await userGroup(context.user).add(reply)
            // Remembered: after a logout the socket is anonymous, and still leaves the user's group.
            try context.channelSession["user_group"] = .string(userGroup(context.user).name)
        }
        let position = context.streamPosition
        try await context.follow(roomGroup(room), after: position)
        try await roomGroup(room).presence.track(user: presenceName(context, reply))
        if position != nil {
            try await context.accept()
            context.logger.info("rejoined", metadata: ["room": "\(room)", "user": "\(context.user)"])
            return
        }
        let history = try await ChatDatabase.shared.history(room: room)
        // The first frame; the server's position and presence frames follow it.
        try await context.accept(
            text: ChatEvent.text(
                HistoryFrame(
                    messages: history.map { $0.event() }, room: room,
                    user: context.user.isAuthenticated ? context.user.username : nil)))
        context.logger.info("joined", metadata: ["room": "\(room)", "user": "\(context.user)"])
    }

    /// A frame from a member goes through the `chat-messages` channel, whose consumer stores
    /// and broadcasts it (the seed's "Models" step). The room comes from the channel session.
    @Sendable static func postToRoom(_ context: ConsumerContext) async throws {
        guard var text = try context.message(as: WebSocketReceiveMessage.self).data.text else { return }
        if let data = text.data(using: .utf8), let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] {
            // `{"stream": "messages", "payload": {"action", "pk", "data"}}`: an edit or a delete (data binding).
            if object["stream"] as? String == MessageBinding.stream, let payload = object["payload"] {
                let payloadData = try JSONSerialization.data(withJSONObject: payload, options: [.fragmentsAllowed])
                return try await MessageBinding().receive(WebSocket(context: context, stream: MessageBinding.stream), payload: payloadData)
            }
            if let inner = object["text"] as? String { text = inner }
        }
        text = clipped(text)
        guard !text.isEmpty else { return }
        let room = try context.channelSession["room"]?.stringValue ?? context.parameters["room"] ?? "lobby"
        // "/later N text" posts the text N seconds from now, through the delay server.
        var delay: Int?
        let words = text.split(separator: " ", maxSplits: 2)
        if words.count == 3, words[0] == "/later", let seconds = Int(words[1]), (1...3600).contains(seconds) {
            delay = seconds
            text = String(words[2])
        }
        var message: Message = [
            "room": .string(room),
            "user": .string(context.user.isAuthenticated ? context.user.username : guestName),
            "text": .string(text),
        ]
        // Where to say that the message could not be saved.
        if let reply = context.replyChannel { message["reply"] = .string(reply.name) }
        if let delay {
            try await Channel("chat-messages").send(message, delay: .seconds(delay))
        } else if let reply = context.replyChannel {
            // Numbered per socket: the chat-messages stage broadcasts one socket's messages in
            // the order they were sent, however many workers run it.
            try await Channel("chat-messages").send(message, orderedBy: reply.name)
        } else {
            try await Channel("chat-messages").send(message)
        }
    }

    /// The name a socket is present under: the user's, or for an anonymous socket `guest-` and
    /// a short digest of its reply channel (which itself stays secret).
    static func presenceName(_ context: ConsumerContext, _ reply: Channel) -> String {
        if context.user.isAuthenticated { return context.user.username }
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in reply.name.utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
        return "guest-" + String(hash % 0xFF_FFFF, radix: 16)
    }

    @Sendable static func leaveRoom(_ context: ConsumerContext) async throws {
        guard let reply = context.replyChannel else { return }
        let room = try context.channelSession["room"]?.stringValue ?? context.parameters["room"] ?? "lobby"
        try await roomGroup(room).discard(reply)
        if let group = try context.channelSession["user_group"]?.stringValue { try await Group(group).discard(reply) }
    }

    /// Messages whose write failed (`chat_messages_failed_total`).
    static let failedWrites = Counter(label: "chat_messages_failed_total")

    static let mentionPattern = try! NSRegularExpression(pattern: "@([A-Za-z0-9_.-]{1,30})")

    /// Stores the message, broadcasts it to the room, and notifies every user it mentions
    /// (`@name`) on all of that user's sockets, through the user's group.
    @Sendable static func saveAndBroadcast(_ context: ConsumerContext) async throws {
        // A message without its fields fails the consumer (logged and counted by the worker).
        let message = ChatMessage(
            id: nil, room: try context.message.string("room"), username: try context.message.string("user"),
            text: try context.message.string("text"), createdAt: Date().timeIntervalSince1970)
        let saved: ChatMessage
        do {
            saved = try await ChatDatabase.shared.save(message)
        } catch {
            // A full disk, a locked or broken file: the sender is told, the failure counted.
            failedWrites.increment()
            context.logger.error("a message could not be saved; its sender is told", metadata: ["error": "\(error)"])
            if let reply = context.message["reply"]?.stringValue {
                let frame = json([
                    "type": "error", "error": "your message could not be saved; try again",
                    "text": context.message["text"]?.stringValue ?? "",
                ])
                try await Channel(reply).send(WebSocketSendMessage.text(frame).message)
            }
            return
        }
        // With the room history's offset and epoch: a page that reconnects gets what it missed.
        try await roomGroup(saved.room).publish(ChatEvent.text(saved.event("message")))
        let text = saved.text
        var mentioned = Set<String>()
        for match in mentionPattern.matches(in: text, range: NSRange(text.startIndex..., in: text)) {
            if let range = Range(match.range(at: 1), in: text) { mentioned.insert(String(text[range])) }
        }
        for name in mentioned.sorted() where name != saved.username {
            try await Group("user-" + name).send(WebSocketSendMessage.text(ChatEvent.text(saved.event("mention"))))
        }
    }
}
