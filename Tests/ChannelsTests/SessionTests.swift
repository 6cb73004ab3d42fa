import ASGI
import CPBKDF2
import ChannelsRedis
import ChannelsTesting
import Foundation
import Logging
import RedisChannelLayer
import TestSupport
import Testing

@testable import Channels

@Suite("sessions", .timeLimit(.minutes(2)))
struct SessionTests {
    func store(_ kind: StoreKind) throws -> any SessionStore {
        switch kind {
        case .memory: InMemorySessionStore()
        case .redis: try TestRedis.sessionStore(prefix: "t" + ChannelNames.randomLetters(8) + ":session:")
        }
    }

    @Test func channelSessionKeysNeedTheSecretAndAreNeverHTTPKeys() {
        let secret = DeploymentSecret(Array("deployment one".utf8))
        let key = Session.channelSessionKey(replyChannel: "daphne.response.abc!def", secret: secret)
        #expect(key.count == 64 && key.hasPrefix("chs"))
        #expect(!Session.isHTTPSessionKey(key), "a channel-session key can never be presented as an HTTP session")
        #expect(key != Session.channelSessionKey(replyChannel: "daphne.response.abc!deg", secret: secret))
        // Another deployment's secret gives another key; Channels 1.x's plain SHA-1 form is gone.
        #expect(key != Session.channelSessionKey(replyChannel: "daphne.response.abc!def", secret: DeploymentSecret(Array("two".utf8))))
        #expect(
            key
                == Session.channelSessionKey(
                    replyChannel: "daphne.response.abc!def", secret: DeploymentSecret(Array("deployment one".utf8))))
        // HMAC-SHA256(SHA-256("deployment one"), "channel-session\0daphne.response.abc!def"), computed with Python's hmac.
        #expect(key == "chs450fdb4218f061036cdffc7981195fa00af308829ad301317db81d74473e2")
        #expect(Session.isHTTPSessionKey(Session.newKey()))
        #expect(!Session.isHTTPSessionKey("chnc0e16001af45901d84efd1fb0df4e".uppercased()))
        #expect(!Session.isHTTPSessionKey("short"))
    }

    @Test(arguments: StoreKind.allCases)
    func channelSessionPersistsPerSocket(_ kind: StoreKind) async throws {
        let log = Log()
        let routing = [
            route(
                "websocket.connect",
                channelSession { context in
                    try context.channelSession["room"] = .string(String(context.path.dropFirst()))
                    try await context.accept()
                }),
            route(
                "websocket.receive",
                channelSession { context in
                    let room = try context.channelSession["room"]?.stringValue ?? "?"
                    let count = (try context.channelSession["count"]?.intValue ?? 0) + 1
                    try context.channelSession["count"] = .int(count)
                    try await context.reply(["text": .string("\(room):\(count)")])
                }),
            route(
                "websocket.disconnect",
                channelSession { context in
                    await log.add(
                        "left \(try context.channelSession["room"]?.stringValue ?? "?") after \(try context.channelSession["count"]?.intValue ?? 0)"
                    )
                }),
        ]
        let harness = try TestHarness(routing, environment: ConsumerEnvironment(sessionStore: try store(kind)))
        let a = WebSocketTestClient(harness, path: "/lobby")
        let b = WebSocketTestClient(harness, path: "/games")
        #expect(try await a.connect())
        #expect(try await b.connect())
        try await a.send(text: "x")
        #expect(try await a.receiveText() == "lobby:1")
        try await a.send(text: "x")
        #expect(try await a.receiveText() == "lobby:2")
        try await b.send(text: "x")
        #expect(try await b.receiveText() == "games:1")
        try await a.close()
        try await b.close()
        #expect(await log.entries == ["left lobby after 2", "left games after 1"])
    }

    @Test func channelSessionWithoutReplyChannelIsAClearError() async throws {
        let context = ConsumerContext(
            message: ["text": "x"], channel: "chat-messages", parameters: [:],
            layer: InMemoryChannelLayer(), logger: .init(label: "t"))
        await #expect(throws: SessionError.self) {
            try await channelSession { _ in }(context)
        }
        do {
            try await channelSession { _ in }(context)
        } catch {
            #expect("\(error)".contains("reply_channel"))
            #expect("\(error)".contains("chat-messages"))
        }
    }

    @Test(arguments: StoreKind.allCases)
    func httpSessionFromCookieAndQueryParameter(_ kind: StoreKind) async throws {
        let routing = [
            route(
                "http.request", path: "^/set/",
                httpSession { context in
                    try context.httpSession["color"] = "blue"
                    try await context.respond("set")
                }),
            route(
                "http.request", path: "^/get/",
                httpSession { context in
                    try await context.respond(try context.httpSession["color"]?.stringValue ?? "none")
                }),
            route(
                "websocket.connect",
                httpSession { context in
                    try await context.reply(["text": .string(try context.httpSession["color"]?.stringValue ?? "none")])
                }),
        ]
        let harness = try TestHarness(routing, environment: ConsumerEnvironment(sessionStore: try store(kind)))
        let browser = HTTPTestClient(harness)
        #expect(try await browser.get("/get/").text == "none", "no key means no session, not an error")
        #expect(browser.cookies.isEmpty, "reading an empty session creates nothing")
        let set = try await browser.get("/set/")
        let cookie = try #require(set.setCookies.first)
        #expect(cookie.hasPrefix("sessionid="))
        #expect(cookie.contains("HttpOnly"))
        let key = try #require(browser.cookies["sessionid"])
        #expect(key.count == 32)
        #expect(try await browser.get("/get/").text == "blue", "from the cookie")

        let stranger = HTTPTestClient(harness)
        #expect(try await stranger.get("/get/").text == "none")
        #expect(try await stranger.get("/get/", query: "session_key=\(key)").text == "blue", "from ?session_key=")
        #expect(try await stranger.get("/get/", query: "session_key=unknownunknownunknownunknownunkno").text == "none")

        let socket = WebSocketTestClient(harness, path: "/", query: "session_key=\(key)")
        #expect(try await socket.connect())
        #expect(try await socket.receive()?["text"]?.stringValue == "blue")
        let cookieSocket = WebSocketTestClient(harness, path: "/", cookies: browser.cookies)
        #expect(try await cookieSocket.connect())
        #expect(try await cookieSocket.receive()?["text"]?.stringValue == "blue")
    }

    @Test func aPlantedUnknownKeyIsNotAdopted() async throws {
        let store = InMemorySessionStore()
        let harness = try TestHarness(
            [
                route(
                    "http.request",
                    httpSession { context in
                        try context.httpSession["x"] = 1
                        try await context.respond("ok")
                    })
            ], environment: ConsumerEnvironment(sessionStore: store))
        let browser = HTTPTestClient(harness)
        browser.setCookie("sessionid", "attackerchosenkeyattackerchosenk")
        _ = try await browser.get("/")
        #expect(browser.cookies["sessionid"] != "attackerchosenkeyattackerchosenk")
        #expect(try await store.load(Session.storageKey("attackerchosenkeyattackerchosenk")) == nil)
    }

    static func authRouting(log: Log) -> [RoutingEntry] {
        [
            route(
                "http.request", path: "^/login/",
                httpSession { context in
                    let form = HTTPRequestInfo.formFields(try context.message.bytes("body"))
                    let users = ["alice": "1", "bob": "2"]
                    guard let id = users[form["username"] ?? ""] else { return try await context.respond(status: 403, "no") }
                    try await context.login(User(id: id, username: form["username"]!))
                    try await context.respond("welcome \(context.user)")
                }),
            route(
                "http.request", path: "^/logout/",
                httpSession { context in
                    try await context.logout()
                    try await context.respond("bye")
                }),
            route(
                "http.request", path: "^/whoami/",
                httpSessionUser { context in
                    try await context.respond("\(context.user)")
                }),
            route(
                "websocket.connect",
                channelSessionUserFromHTTP { context in
                    await log.add("connect \(context.user)")
                    try await context.accept()
                }),
            route(
                "websocket.receive",
                channelSessionUser { context in
                    await log.add("receive \(context.user)")
                    try await context.reply(["text": .string("\(context.user): \(try context.message.string("text"))")])
                }),
        ]
    }

    @Test(arguments: StoreKind.allCases)
    func userCarriedFromHTTPIntoTheSocket(_ kind: StoreKind) async throws {
        let log = Log()
        let harness = try TestHarness(
            Self.authRouting(log: log),
            environment: ConsumerEnvironment(sessionStore: try store(kind), users: TestUsers()))
        let browser = HTTPTestClient(harness)
        #expect(try await browser.get("/whoami/").text == "anonymous")
        let login = try await browser.post("/login/", form: [("username", "alice")])
        #expect(login.text == "welcome alice")
        #expect(try await browser.get("/whoami/").text == "alice")

        let socket = WebSocketTestClient(harness, path: "/chat/", cookies: browser.cookies)
        #expect(try await socket.connect())
        try await socket.send(text: "hi")
        #expect(try await socket.receiveText() == "alice: hi")

        let anonymous = WebSocketTestClient(harness, path: "/chat/")
        #expect(try await anonymous.connect())
        try await anonymous.send(text: "hey")
        #expect(try await anonymous.receiveText() == "anonymous: hey")
        #expect(await log.entries == ["connect alice", "receive alice", "connect anonymous", "receive anonymous"])

        _ = try await browser.get("/logout/")
        #expect(browser.cookies["sessionid"] == nil)
        #expect(try await browser.get("/whoami/").text == "anonymous")
    }

    @Test func loginRotatesTheKey() async throws {
        let store = InMemorySessionStore()
        let harness = try TestHarness(
            Self.authRouting(log: Log()) + [
                route(
                    "http.request", path: "^/visit/",
                    httpSession { context in
                        try context.httpSession["visited"] = true
                        try await context.respond("ok")
                    })
            ],
            environment: ConsumerEnvironment(sessionStore: store, users: TestUsers()))
        let browser = HTTPTestClient(harness)
        _ = try await browser.get("/visit/")
        let before = try #require(browser.cookies["sessionid"])
        _ = try await browser.post("/login/", form: [("username", "bob")])
        let after = try #require(browser.cookies["sessionid"])
        #expect(before != after, "login gives a new key")
        #expect(try await store.load(Session.storageKey(before)) == nil, "the pre-login key is gone")
        #expect(try await store.load(after) == nil, "a store holds no key a client could present")
        let data = try Session.decode(try #require(try await store.load(Session.storageKey(after))))
        #expect(data["visited"] == true, "data survives the rotation")
        #expect(data["_auth_user_id"] == "2")
        // The old key no longer logs anyone in.
        let attacker = HTTPTestClient(harness)
        attacker.setCookie("sessionid", before)
        #expect(try await attacker.get("/whoami/").text == "anonymous")
    }

    @Test(arguments: StoreKind.allCases)
    func concurrentFirstSavesKeepBothWrites(_ kind: StoreKind) async throws {
        let store = try store(kind)
        for round in 0..<20 {
            let key = "race\(round)" + ChannelNames.randomLetters(8)
            let sessions = try await withThrowingTaskGroup(of: Session.self) { group in
                for _ in 0..<4 {
                    group.addTask { try await Session.load(key: key, store: store, settings: .init()) }
                }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            try await withThrowingTaskGroup(of: Void.self) { group in
                for (index, session) in sessions.enumerated() {
                    session["writer\(index)"] = .int(Int64(index))
                    group.addTask { try await session.save() }
                }
                try await group.waitForAll()
            }
            let stored = try Session.decode(try #require(try await store.load(Session.storageKey(key))))
            #expect(stored == ["writer0": 0, "writer1": 1, "writer2": 2, "writer3": 3], "round \(round)")
        }
    }

    /// The socket list logout closes: sockets opened at once with one HTTP session each append
    /// their reply channel; every one must stay listed whoever saves first (a whole-list set
    /// re-applied after a lost race kept only the last writer's, and logout left the others open).
    /// A raise (the ordering gate's next order) survives a concurrent writer: the larger value
    /// wins whichever save comes last; a plain set re-applied on a lost race would move it back.
    @Test(arguments: StoreKind.allCases)
    func aRaiseKeepsTheLargerValueAcrossARace(_ kind: StoreKind) async throws {
        let store = try store(kind)
        let key = "raise" + ChannelNames.randomLetters(8)
        let first = Session(key: key, store: store, settings: .init())
        first["next"] = 3
        try await first.save()
        let slow = try await Session.load(key: key, store: store, settings: .init())
        let fast = try await Session.load(key: key, store: store, settings: .init())
        fast["next"] = 9
        fast["other"] = "kept"
        try await fast.save()
        slow.raise("next", to: 5)
        slow["moved"] = 1
        try await slow.save()
        var stored = try Session.decode(try #require(try await store.load(Session.storageKey(key))))
        #expect(stored["next"] == 9, "the larger value stays: \(stored["next"] ?? .null)")
        #expect(stored["other"] == "kept" && stored["moved"] == 1)
        slow.raise("next", to: 12)
        try await slow.save()
        stored = try Session.decode(try #require(try await store.load(Session.storageKey(key))))
        #expect(stored["next"] == 12)
        let fresh = Session(key: "raise" + ChannelNames.randomLetters(8), store: store, settings: .init())
        fresh.raise("next", to: 4)
        #expect(fresh["next"] == 4, "a missing key takes the value")
    }

    @Test(arguments: StoreKind.allCases)
    func concurrentAppendsKeepEveryItem(_ kind: StoreKind) async throws {
        let store = try store(kind)
        for round in 0..<10 {
            let key = "append\(round)" + ChannelNames.randomLetters(8)
            let first = Session(key: key, store: store, settings: .init())
            first["user"] = "alice"
            first.append("existing", to: "list")
            try await first.save()
            let sessions = try await withThrowingTaskGroup(of: Session.self) { group in
                // More writers than a save's usual 10 tries: each append still lands.
                for _ in 0..<16 {
                    group.addTask { try await Session.load(key: key, store: store, settings: .init()) }
                }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            try await withThrowingTaskGroup(of: Void.self) { group in
                for (index, session) in sessions.enumerated() {
                    session.append(.string("socket\(index)"), to: "list", keepingLast: 5)
                    group.addTask { try await session.save() }
                }
                try await group.waitForAll()
            }
            let stored = try Session.decode(try #require(try await store.load(Session.storageKey(key))))
            let list = stored["list"]?.arrayValue?.compactMap(\.stringValue) ?? []
            #expect(list.count == 5 && Set(list).isSubset(of: Set((0..<16).map { "socket\($0)" })), "round \(round): \(list)")
            #expect(stored["user"] == "alice", "the appends kept the other values")
        }
        // An append to a session deleted meanwhile does not bring it back.
        let key = "deleted" + ChannelNames.randomLetters(8)
        let owner = Session(key: key, store: store, settings: .init())
        owner["user"] = "alice"
        try await owner.save()
        let late = try await Session.load(key: key, store: store, settings: .init())
        try await owner.delete()
        late.append("socket", to: "list")
        try await late.save()
        #expect(try await store.load(Session.storageKey(key)) == nil, "a deleted session stays deleted")
        // cycleKey keeps an unsaved append once.
        let cycled = Session(key: nil, store: store, settings: .init())
        cycled.append("a", to: "list")
        cycled.cycleKey()
        try await cycled.save()
        let cycledKey = try #require(cycled.key)
        let read = try Session.decode(try #require(try await store.load(Session.storageKey(cycledKey))))
        #expect(read["list"] == .array(["a"]))
    }

    /// Logout's read-and-delete: an append that lands before it is in what it returns; one that
    /// comes after (or finds the deletion mark) is dropped and its save says so (false), so the
    /// socket knows it is not signed in.
    @Test(arguments: StoreKind.allCases)
    func deleteReturningDataSeesEveryAppendBeforeIt(_ kind: StoreKind) async throws {
        let store = try store(kind)
        let key = "logout" + ChannelNames.randomLetters(8)
        let owner = Session(key: key, store: store, settings: .init())
        owner["user"] = "alice"
        owner.append("a", to: "sockets")
        try await owner.save()
        let before = try await Session.load(key: key, store: store, settings: .init())
        let after = try await Session.load(key: key, store: store, settings: .init())
        let logout = try await Session.load(key: key, store: store, settings: .init())
        before.append("b", to: "sockets")
        #expect(try await before.save(), "an append before the logout lands")
        let final = try await logout.deleteReturningData()
        #expect(final["sockets"] == .array(["a", "b"]), "the logout reads the list as it was deleted: \(final)")
        after.append("c", to: "sockets")
        #expect(try await after.save() == false, "an append after the logout is dropped, and says so")
        #expect(try await store.load(Session.storageKey(key)) == nil, "nothing brought the session back")
        // A save that finds the deletion mark (the moment between the read and the delete).
        let marked = "marked" + ChannelNames.randomLetters(8)
        let plain = Session(key: marked, store: store, settings: .init())
        plain["user"] = "bob"
        try await plain.save()
        let late = try await Session.load(key: marked, store: store, settings: .init())
        let mark = Session.encode([Session.deletedMark: true])
        let raw = try #require(try await store.load(Session.storageKey(marked)))
        #expect(try await store.store(Session.storageKey(marked), data: mark, expected: raw, ttl: .seconds(60)))
        late.append("d", to: "sockets")
        #expect(try await late.save() == false, "the mark reads as deleted")
        #expect(try await store.load(Session.storageKey(marked)) == mark, "the append did not write over the mark")
    }

    @Test func redisSessionsLiveAsLongAsTheSessionAge() async throws {
        let client = try TestRedis.client()
        let prefix = "t" + ChannelNames.randomLetters(8) + ":session:"
        let store = RedisSessionStore(client: client, prefix: prefix)
        var settings = SessionConfiguration()
        settings.age = .seconds(5000)
        let session = Session(key: "agecheck", store: store, settings: settings)
        session["x"] = 1
        try await session.save()
        let ttl = try await client.command("TTL", .key(prefix, Session.storageKey("agecheck"))).integer ?? -1
        #expect(ttl > 4990 && ttl <= 5000, "TTL \(ttl)")
    }

    @Test func anExpiredInMemorySessionIsGone() async throws {
        let store = InMemorySessionStore()
        #expect(try await store.store("k", data: [0x80], expected: nil, ttl: .seconds(0)))
        #expect(try await store.load("k") == nil, "expired at once")
        #expect(try await store.store("k", data: [0x80], expected: nil, ttl: .seconds(60)), "an expired key can be created again")
    }

    @Test(arguments: StoreKind.allCases)
    func unreadableStoredDataIsReplacedNotFatal(_ kind: StoreKind) async throws {
        let store = try store(kind)
        let environment = ConsumerEnvironment(sessionStore: store)
        let key = Session.storageKey(
            Session.channelSessionKey(replyChannel: "test.reply?garbage", secret: environment.sessionConfiguration.secret))
        #expect(try await store.store(key, data: [0xc1, 0xff, 0x00], expected: nil, ttl: .seconds(60)))
        let harness = try TestHarness(
            [
                route(
                    "websocket.receive",
                    channelSession { context in
                        let before = try context.channelSession["n"]?.intValue ?? 0
                        try context.channelSession["n"] = .int(before + 1)
                        try await context.reply(["text": .string("\(before + 1)")])
                    })
            ], environment: environment)
        try await harness.send(["reply_channel": "test.reply?garbage", "order": 1, "text": "x"], to: "websocket.receive")
        #expect(try await harness.receive(from: "test.reply?garbage")?["text"] == "1", "read as empty, consumer ran")
        let stored = try Session.decode(try #require(try await store.load(key)))
        #expect(stored["n"] == 1 && stored.count == 2, "the garbage was replaced (n and the renewal time): \(stored)")
    }

    @Test func sessionIsSavedOnlyWhenModified() async throws {
        let store = CountingStore()
        let harness = try TestHarness(
            [
                route("websocket.connect", channelSession { context in try await context.accept() }),
                route(
                    "websocket.receive",
                    channelSession { context in
                        if try context.message.string("text") == "write" { try context.channelSession["n"] = 1 }
                    }),
            ], environment: ConsumerEnvironment(sessionStore: store))
        let socket = WebSocketTestClient(harness, path: "/")
        try await socket.connect()
        try await socket.send(text: "read")
        #expect(store.writes == 0)
        try await socket.send(text: "write")
        #expect(store.writes == 1)
    }

    @Test func passwordsAreHashedWithPBKDF2() throws {
        let hash = try PasswordHasher.hash("correct horse", iterations: 1000)
        #expect(hash.hasPrefix("pbkdf2_sha256$1000$"))
        #expect(!hash.contains("correct horse"))
        #expect(PasswordHasher.verify("correct horse", against: hash))
        #expect(!PasswordHasher.verify("correct horsf", against: hash))
        #expect(!PasswordHasher.verify("x", against: "garbage"))
        #expect(try PasswordHasher.hash("same", iterations: 1000) != PasswordHasher.hash("same", iterations: 1000), "salted")
        // Django's format, computed with Python: base64(hashlib.pbkdf2_hmac("sha256", b"password", b"seasalt", 1000)).
        #expect(PasswordHasher.verify("password", against: "pbkdf2_sha256$1000$seasalt$YIWkt6M1JFXrHg5s0jZjBSc7C2Cz6QvchSJ0h8Y+i7c="))
        #expect(!PasswordHasher.verify("password", against: "pbkdf2_sha256$1001$seasalt$YIWkt6M1JFXrHg5s0jZjBSc7C2Cz6QvchSJ0h8Y+i7c="))
    }

    /// The hasher computes PBKDF2 round by round (to yield between slices): the same bytes as
    /// Python's `hashlib.pbkdf2_hmac` (OpenSSL) at round counts around the slice boundary.
    @Test(arguments: [
        ("password", "seasalt", 1, "YQUqaoGGIdcjQtCPUVvu1oIcyb7WgPW9b7k/hvRudOk="),
        ("password", "seasalt", 2, "VK8lGaN3rA0AJM2lOHZsSnopZzlEZJCbJV6SQhDZP4o="),
        ("p\u{E4}ssword", "NaCl", 300, "vVXO0FU8KpWDchg6BhcTt8J4jXK8g+sjnUWeWIDDt5Y="),
        ("", "s", 301, "RK0BwlV/Ik6eVPC9CQeabumCAqFcgyRNjkcjl3rQlTU="),
        ("correct horse", "abc", 4097, "TK5mcOGtvzJXthFQirXfPsCDsvDC4NNrTI8LHYRPluE="),
    ])
    func pbkdf2MatchesOpenSSL(password: String, salt: String, rounds: Int, expected: String) throws {
        #expect(try PasswordHasher.derive(password, salt: salt, iterations: rounds) == Array(try #require(Data(base64Encoded: expected))))
    }

    /// The rounds with the CPU's SHA extensions (when it has them: the path the vectors above
    /// took here) and in portable C give the same words.
    @Test func pbkdf2RoundsAgreeOnEveryPath() {
        var generator = SystemRandomNumberGenerator()
        let inner = (0..<8).map { _ in UInt32.random(in: .min ... .max, using: &generator) }
        let outer = (0..<8).map { _ in UInt32.random(in: .min ... .max, using: &generator) }
        let start = (0..<8).map { _ in UInt32.random(in: .min ... .max, using: &generator) }
        var (u1, t1, u2, t2) = (start, start, start, start)
        cpbkdf2_sha256_rounds(inner, outer, &u1, &t1, 2_345)
        cpbkdf2_sha256_rounds_portable(inner, outer, &u2, &t2, 2_345)
        #expect(u1 == u2 && t1 == t2)
        #expect(t1 != start)
    }
}

/// A store that counts writes.
final class CountingStore: SessionStore, @unchecked Sendable {
    private let base = InMemorySessionStore()
    private let lock = NSLock()
    private var count = 0
    var writes: Int { lock.withLock { count } }
    func load(_ key: String) async throws -> [UInt8]? { try await base.load(key) }
    func store(_ key: String, data: [UInt8], expected: [UInt8]?, ttl: Duration) async throws -> Bool {
        lock.withLock { count += 1 }
        return try await base.store(key, data: data, expected: expected, ttl: ttl)
    }
    func delete(_ key: String) async throws { try await base.delete(key) }
}
