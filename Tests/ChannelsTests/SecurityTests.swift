import ASGI
import ChannelsRedis
import ChannelsTesting
import Crypto
import Foundation
import Logging
import RedisChannelLayer
import TestSupport
import Testing

@testable import Channels

/// The session, CSRF and rate-limit defences, attacked the way a client would: with keys read
/// from logs, foreign origins, replayed tokens.
@Suite("security", .timeLimit(.minutes(2)))
struct SecurityTests {
    func store(_ kind: StoreKind) throws -> any SessionStore {
        switch kind {
        case .memory: InMemorySessionStore()
        case .redis: try TestRedis.sessionStore(prefix: "t" + ChannelNames.randomLetters(8) + ":session:")
        }
    }

    @Test(arguments: StoreKind.allCases)
    func noChannelIdentifierOpensAnHTTPSession(_ kind: StoreKind) async throws {
        let environment = ConsumerEnvironment(sessionStore: try store(kind), users: TestUsers())
        let harness = try TestHarness(SessionTests.authRouting(log: Log()), environment: environment)
        let browser = HTTPTestClient(harness)
        _ = try await browser.post("/login/", form: [("username", "alice")])
        let socket = WebSocketTestClient(harness, path: "/chat/", cookies: browser.cookies)
        #expect(try await socket.connect())
        try await socket.send(text: "hi")
        #expect(try await socket.receiveText() == "alice: hi")
        let reply = try #require(socket.replyChannel)
        let secret = environment.sessionConfiguration.secret
        // Everything an attacker could read or compute from a log line, stats or Redis.
        let candidates = [
            reply, Session.channelSessionKey(replyChannel: reply, secret: secret),
            Session.storageKey(Session.channelSessionKey(replyChannel: reply, secret: secret)),
            Session.storageKey(try #require(browser.cookies["sessionid"])),
            secret.socketTag(reply), legacyChannelsKey(reply),
        ]
        for candidate in candidates {
            let attacker = HTTPTestClient(harness)
            attacker.setCookie("sessionid", candidate)
            #expect(try await attacker.get("/whoami/").text == "anonymous", "cookie \(candidate)")
            #expect(
                try await HTTPTestClient(harness).get("/whoami/", query: "session_key=" + candidate).text == "anonymous",
                "session_key \(candidate)")
        }
        // The positive control: the real cookie is alice.
        #expect(try await browser.get("/whoami/").text == "alice")
    }

    /// A secret remembers the keys it made (a worker makes a socket's channel-session key for
    /// each of its messages); what it remembers must be exactly what it computes: its own (not
    /// another secret's), per purpose, at every length, and still right past the bound.
    @Test func aSecretsRememberedKeysAreTheKeysItComputes() {
        let one = DeploymentSecret(Array("one".utf8))
        let other = DeploymentSecret(Array("other".utf8))
        for index in 0..<20_000 {
            let reply = "swift.response.abc!" + String(index)
            let key = one.hex("channel-session", reply)
            #expect(key == Hex.encode(one.mac("channel-session", reply)))
            if index % 997 == 0 {
                #expect(one.hex("channel-session", reply) == key, "asked again")
                #expect(one.hex("channel-session", reply, length: 12) == String(key.prefix(12)))
                #expect(one.hex("socket-tag", reply) != key, "another purpose gave the same key")
                #expect(other.hex("channel-session", reply) == Hex.encode(other.mac("channel-session", reply)))
                #expect(other.hex("channel-session", reply) != key, "another secret gave the same key")
            }
        }
        #expect(one.socketTag("x!y") == String(Hex.encode(one.mac("socket-tag", "x!y")).prefix(12)))
        // Equal as Swift strings, different bytes: each its own key.
        let composed = one.hex("csrf", "caf\u{e9}")
        let decomposed = one.hex("csrf", "cafe\u{301}")
        #expect(composed == Hex.encode(one.mac("csrf", "caf\u{e9}")))
        #expect(decomposed == Hex.encode(one.mac("csrf", "cafe\u{301}")))
        #expect(composed != decomposed)
    }

    /// Channels 1.x's key: "chn" and the first 29 hex digits of the reply channel's SHA-1.
    func legacyChannelsKey(_ reply: String) -> String {
        var hasher = Insecure.SHA1()
        hasher.update(data: Array(reply.utf8))
        return "chn" + String(Hex.encode(hasher.finalize()).prefix(29))
    }

    @Test func disconnectDeletesTheChannelSessionAndTheOrderedHandoffs() async throws {
        let store = InMemorySessionStore()
        let log = Log()
        let harness = try TestHarness(
            [
                route("websocket.connect", enforceOrdering { context in try await context.accept() }),
                route(
                    "websocket.receive",
                    enforceOrdering { context in
                        try context.channelSession["seen"] = true
                        try await Channel("stage").send(["text": context.message["text"] ?? .null], orderedBy: context.replyChannel!.name)
                    }),
                route("websocket.disconnect", enforceOrdering { _ in await log.add("disconnect") }),
                route("stage", inSendOrder { context in await log.add(try context.message.string("text")) }),
            ], environment: ConsumerEnvironment(sessionStore: store))
        for round in 0..<20 {
            let socket = WebSocketTestClient(harness, path: "/")
            #expect(try await socket.connect())
            try await socket.send(text: "a\(round)")
            try await socket.send(text: "b\(round)")
            #expect(store.count > 0, "a live socket has its session and its sequence's state")
            try await socket.close()
            try await harness.runPending()
        }
        #expect(store.count == 0, "nothing left after the sockets went: \(store.count) sessions")
        let entries = await log.entries
        #expect(entries.filter { $0 == "disconnect" }.count == 20)
        #expect(entries.filter { $0 != "disconnect" } == (0..<20).flatMap { ["a\($0)", "b\($0)"] }, "every staged message ran, in order")
    }

    @Test func refusedConnectsStoreNothingAndUnroutedDisconnectsStillEndTheSession() async throws {
        let store = InMemorySessionStore()
        let harness = try TestHarness(
            [
                route(
                    "websocket.connect", path: "^/private/",
                    channelSessionUserFromHTTP { context in
                        guard context.user.isAuthenticated else { throw ConsumerError.denyConnection }
                        try await context.accept()
                    }),
                route(
                    "websocket.connect", path: "^/open/",
                    channelSession { context in
                        try context.channelSession["x"] = 1; try await context.accept()
                    }),
            ], environment: ConsumerEnvironment(sessionStore: store, users: TestUsers()))
        for _ in 0..<50 {
            #expect(try await WebSocketTestClient(harness, path: "/private/", query: "session_key=" + Session.newKey()).connect() == false)
        }
        #expect(store.count == 0, "50 refused knocks left \(store.count) sessions")
        // No route handles /open/'s disconnect: the worker still ends its channel session.
        let socket = WebSocketTestClient(harness, path: "/open/")
        #expect(try await socket.connect())
        #expect(store.count == 1)
        try await socket.close()
        try await harness.runPending()
        #expect(store.count == 0, "the closed socket's session is gone")
    }

    @Test func channelSessionsLiveADayRenewedNotTwoWeeks() async throws {
        let client = try TestRedis.client()
        let prefix = "t" + ChannelNames.randomLetters(8) + ":session:"
        let environment = ConsumerEnvironment(sessionStore: RedisSessionStore(client: client, prefix: prefix))
        let harness = try TestHarness(
            [
                route(
                    "websocket.connect",
                    channelSession { context in
                        try context.channelSession["x"] = 1; try await context.accept()
                    })
            ],
            environment: environment)
        let socket = WebSocketTestClient(harness, path: "/")
        #expect(try await socket.connect())
        let key = Session.storageKey(
            Session.channelSessionKey(replyChannel: try #require(socket.replyChannel), secret: environment.sessionConfiguration.secret))
        let ttl = try await client.command("TTL", .key(prefix, key)).integer ?? -1
        #expect(ttl > 24 * 3600 - 10 && ttl <= 24 * 3600, "TTL \(ttl)")
    }

    @Test func logoutSignsTheUsersSocketsOutAndClosesThem() async throws {
        let store = InMemorySessionStore()
        let environment = ConsumerEnvironment(sessionStore: store, users: TestUsers())
        let harness = try TestHarness(SessionTests.authRouting(log: Log()), environment: environment)
        let browser = HTTPTestClient(harness)
        _ = try await browser.post("/login/", form: [("username", "alice")])
        let first = WebSocketTestClient(harness, path: "/chat/", cookies: browser.cookies)
        let second = WebSocketTestClient(harness, path: "/chat/", cookies: browser.cookies)
        #expect(try await first.connect())
        #expect(try await second.connect())
        _ = try await browser.get("/logout/")
        for socket in [first, second] {
            #expect(try await socket.receive() == ["close": 1008], "the server closes the user's sockets")
            // Until the close lands, the socket is anonymous.
            try await socket.send(text: "still me?")
            #expect(try await socket.receiveText() == "anonymous: still me?")
        }
    }

    func csrfHarness() throws -> (TestHarness, HTTPTestClient) {
        let harness = try TestHarness(
            [
                route("http.request", path: "^/token/$", httpSession { context in try await context.respond(context.csrfToken()) }),
                route(
                    "http.request", path: "^/login/$",
                    csrfProtect { context in
                        try await context.login(User(id: "1", username: "alice"))
                        try await context.respond(context.csrfToken())
                    }),
                route("http.request", path: "^/action/$", csrfProtect { context in try await context.respond("done") }),
            ], environment: ConsumerEnvironment(users: TestUsers()))
        return (harness, HTTPTestClient(harness))
    }

    @Test func csrfRefusesForeignAndTokenlessPostsAndTokensOfOtherSessions() async throws {
        let (harness, browser) = try csrfHarness()
        let token = try await browser.get("/token/").text
        #expect(browser.cookies[CSRF.cookieName] == token)
        // A cross-site form: no token.
        #expect(try await browser.post("/action/", form: [], headers: [("origin", "https://evil.example")]).status == 403)
        #expect(try await browser.post("/action/", form: [], headers: []).status == 403)
        // The right token from a foreign page is still refused (Origin).
        #expect(
            try await browser.post("/action/", form: [], headers: [("origin", "https://evil.example"), ("x-csrftoken", token)]).status
                == 403)
        // The page's own POST.
        #expect(
            try await browser.post("/action/", form: [], headers: [("origin", "http://testserver"), ("x-csrftoken", token)]).text == "done")
        #expect(try await browser.post("/action/", form: [(CSRF.formField, token)], headers: []).text == "done")
        // A forged pair: cookie and header agree but the signature is not ours.
        let forged = String(repeating: "a", count: 48)
        let attacker = HTTPTestClient(harness)
        attacker.setCookie(CSRF.cookieName, forged)
        #expect(try await attacker.post("/action/", form: [], headers: [("x-csrftoken", forged)]).status == 403)
        // Login changes the session: the old token no longer works, the new one does.
        let fresh = try await browser.post("/login/", form: [], headers: [("x-csrftoken", token)]).text
        let stale = HTTPTestClient(harness)
        stale.setCookie("sessionid", try #require(browser.cookies["sessionid"]))
        stale.setCookie(CSRF.cookieName, token)
        #expect(try await stale.post("/action/", form: [], headers: [("x-csrftoken", token)]).status == 403)
        #expect(try await browser.post("/action/", form: [], headers: [("x-csrftoken", fresh)]).text == "done")
        // Safe methods pass without a token.
        #expect(try await HTTPTestClient(harness).get("/action/").text == "done")
    }

    @Test func cookiesAreSecureOverTLSAndSameSiteIsTyped() async throws {
        var settings = SessionConfiguration()
        settings.cookieSameSite = .strict
        let harness = try TestHarness(
            [
                route(
                    "http.request",
                    httpSession { context in
                        try context.httpSession["x"] = 1; try await context.respond("ok")
                    })
            ],
            environment: ConsumerEnvironment(sessionConfiguration: settings))
        let plain = try await HTTPTestClient(harness).get("/")
        let plainCookie = try #require(plain.setCookies.first { $0.hasPrefix("sessionid=") })
        #expect(plainCookie.contains("SameSite=Strict") && !plainCookie.contains("Secure"))
        let secure = try await HTTPTestClient(harness).request("GET", "/", scheme: "https")
        #expect(try #require(secure.setCookies.first { $0.hasPrefix("sessionid=") }).contains("; Secure"))
    }

    @Test func originValidatorRefusesOtherOriginsOnItsRoute() async throws {
        let harness = try TestHarness([
            route("websocket.connect", originValidator(["https://partner.example", ".trusted.example"]) { try await $0.accept() })
        ])
        for (origin, accepted) in [
            ("https://partner.example", true), ("https://a.trusted.example", true), ("https://other.example", false),
            ("null", false), ("https://partner.example.evil.org", false),
        ] {
            let socket = WebSocketTestClient(harness, path: "/", headers: [("origin", origin)])
            #expect(try await socket.connect() == accepted, "\(origin)")
        }
        #expect(try await WebSocketTestClient(harness, path: "/").connect() == false, "no Origin: refused on a validated route")
    }

    @Test func sessionsAreStoredEncryptedWithTheLayersKeys() async throws {
        let client = try TestRedis.client()
        let prefix = "t" + ChannelNames.randomLetters(8) + ":session:"
        var settings = SessionConfiguration()
        settings.cipher = StorageEncryption(keys: ["key one"])
        let store = RedisSessionStore(client: client, prefix: prefix)
        let session = Session(key: Session.newKey(), store: store, settings: settings)
        session["user"] = "alice-the-secret-name"
        try await session.save()
        let raw = try #require(try await client.command("GET", .key(prefix, Session.storageKey(session.key!))).bytes)
        #expect(!String(decoding: raw, as: UTF8.self).contains("alice-the-secret-name"))
        #expect(try await Session.load(key: session.key, store: store, settings: settings)["user"] == "alice-the-secret-name")
        // Without the key the data is unreadable (read as an empty session, never as someone else's).
        #expect(try await Session.load(key: session.key, store: store, settings: SessionConfiguration()).isEmpty)
    }

    @Test func theInMemoryStoreSweepsExpiredSessions() async throws {
        let store = InMemorySessionStore(sweepInterval: .milliseconds(50))
        for index in 0..<1000 { _ = try await store.store("k\(index)", data: [0x80], expected: nil, ttl: .seconds(0)) }
        try await Task.sleep(for: .milliseconds(80))
        _ = try await store.store("live", data: [0x80], expected: nil, ttl: .seconds(60))
        #expect(store.count == 1, "expired entries are swept without being read again")
    }

    @Test(arguments: [false, true])
    func rateLimitsCountPerWindow(_ redis: Bool) async throws {
        let limiter: any RateLimiter =
            redis
            ? RedisRateLimiter(client: try TestRedis.client(), prefix: "t" + ChannelNames.randomLetters(8) + ":rl:")
            : InMemoryRateLimiter()
        for expected in 1...3 { #expect(try await limiter.hit("a", window: 30).count == expected) }
        #expect(try await limiter.peek("a").count == 3)
        let (count, reset) = try await limiter.hit("a", window: 30)
        #expect(count == 4 && reset > 0 && reset <= 30)
        #expect(try await limiter.hit("b", window: 30).count == 1, "keys are counted apart")
        #expect(try await limiter.peek("c").count == 0)
    }

    @Test func aLayerPrefixMustEndWithASeparator() throws {
        // 'app' and 'app2' would share keys ('app2x' is both): refused with a clear error.
        #expect(throws: ChannelLayerError.self) {
            try RedisChannelLayerConfiguration(urls: ["redis://127.0.0.1:6379/0?prefix=app"])
        }
        #expect(try RedisChannelLayerConfiguration(urls: ["redis://127.0.0.1:6379/0?prefix=app:"]).prefix == "app:")
    }

    @Test func theHashingPoolShedsLoadInsteadOfQueueingWithoutBound() async throws {
        // More hashes at once than threads + maxWaiting: the surplus is refused at once (Busy), the rest finish.
        let total = PasswordHasher.threads + PasswordHasher.maxWaiting + 6
        let results = await withTaskGroup(of: Bool?.self) { group in
            for _ in 0..<total {
                group.addTask {
                    do { return try await PasswordHasher.verify("pw", against: nil, iterations: 200_000) } catch let refusal
                        as PasswordHasher.Busy
                    {
                        return refusal.retryAfter >= 1 ? nil : false
                    } catch { return false }
                }
            }
            return await group.reduce(into: []) { $0.append($1) }
        }
        let busy = results.filter { $0 == nil }.count
        #expect(busy >= 6 && busy < total, "\(busy) of \(total) refused as busy")
        #expect(results.allSatisfy { $0 != true }, "an unknown user never verifies")
    }

    @Test func aRefusalsRetryAfterCoversTheQueueAndIsSpreadAtRandom() {
        // 8 hashes queued at 500 ms each: the pool needs 4 s / threads to drain them; the client
        // is told that much, plus up to as much again at random, so a refused burst comes back spread.
        let drain = 8 * 0.5 / Double(PasswordHasher.threads)
        #expect(PasswordHasher.retryAfter(queued: 8, averageMicroseconds: 500_000, random: 0) == Int(drain.rounded(.up)))
        #expect(PasswordHasher.retryAfter(queued: 8, averageMicroseconds: 500_000, random: 0.99) == Int((drain * 1.99).rounded(.up)))
        // Before any hash was timed (a cold server's first herd), an assumed cost, still spread.
        let assumed = 8 * Double(PasswordHasher.assumedHashMicroseconds) / 1_000_000 / Double(PasswordHasher.threads)
        #expect(PasswordHasher.retryAfter(queued: 8, averageMicroseconds: 0, random: 0) == Int(assumed.rounded(.up)))
        #expect(PasswordHasher.retryAfter(queued: 8, averageMicroseconds: 0, random: 0.99) == Int((assumed * 1.99).rounded(.up)))
        // Never less than a second, never more than the cap (a starved pool's wall-clock average).
        #expect(PasswordHasher.retryAfter(queued: 0, averageMicroseconds: 200_000, random: 0.5) == 1)
        #expect(PasswordHasher.retryAfter(queued: 9, averageMicroseconds: 20_000_000, random: 0.9) == PasswordHasher.maxRetryAfter)
    }

    @Test func csrfOverHTTPSRefusesInsecureOrigins() async throws {
        let harness = try TestHarness(
            [
                route("http.request", path: "^/token/$", httpSession { context in try await context.respond(context.csrfToken()) }),
                route("http.request", path: "^/action/$", csrfProtect { context in try await context.respond("done") }),
            ])
        let browser = HTTPTestClient(harness)
        let token = try await browser.get("/token/").text
        func post(_ headers: [(String, String)]) async throws -> Int {
            try await browser.request("POST", "/action/", headers: [("x-csrftoken", token)] + headers, scheme: "https").status
        }
        #expect(try await post([("origin", "https://testserver")]) == 200)
        #expect(try await post([("origin", "http://testserver")]) == 403, "an http:// page on an https request")
        #expect(try await post([("referer", "https://testserver/page")]) == 200)
        #expect(try await post([("referer", "http://testserver/page")]) == 403)
        #expect(try await post([]) == 403, "no Origin and no Referer over https")
    }

    @Test func hostsAndOriginsMatchLikeDjango() {
        let hosts = AllowedHosts(["chat.example.com", ".example.org", "127.0.0.1", "::1"], origins: ["https://partner.example"])
        for host in ["chat.example.com", "CHAT.example.com:443", "example.org", "a.b.example.org.", "127.0.0.1:8000", "[::1]:80"] {
            #expect(hosts.allows(host: host), "\(host)")
        }
        for host in ["example.com", "evilchat.example.com", "example.org.evil.com", "evilexample.org", "", "a b", "host:port", "[::2]"] {
            #expect(!hosts.allows(host: host), "\(host)")
        }
        #expect(hosts.allows(origin: "https://chat.example.com") && hosts.allows(origin: "http://x.example.org:8080"))
        #expect(hosts.allows(origin: "https://partner.example"))
        for origin in ["null", "https://evil.example", "file://", "https://user@chat.example.com", "javascript://chat.example.com"] {
            #expect(!hosts.allows(origin: origin), "\(origin)")
        }
        #expect(AllowedHosts(["*"]).allows(host: "anything.example"))
        #expect(!AllowedHosts([]).allows(host: "localhost"))
    }

    @Test func redactionTakesEverySecretOut() {
        let cases: [(String, [String])] = [
            ("redis://:pw1@127.0.0.1:6379/0", ["pw1"]),
            ("redis://user:pw2@host/0?symmetric_encryption_keys=k1,k2&capacity=5", ["pw2", "k1", "k2"]),
            ("redis://host/0?password=pw3", ["pw3"]),
            ("redis+sentinel://:pw4@h1:26379,h2:26379/svc?sentinel_password=pw5&password=pw6", ["pw4", "pw5", "pw6"]),
            ("rediss://h/0?symmetric_encryption_keys=k3,redis://:pw7@h2/0", ["k3", "pw7"]),
            ("/api/me/?session_key=sk1&x=1&token=tk1", ["sk1", "tk1"]),
            ("unix:///tmp/r.sock?db=1&password=pw8", ["pw8"]),
        ]
        for (text, secrets) in cases {
            let redacted = Redaction.redact(text)
            for secret in secrets { #expect(!redacted.contains(secret), "\(redacted)") }
            #expect(redacted.contains("***"))
        }
        // A password with unescaped '/', '?' or '@' (people write them) and percent-encoded names.
        for (text, secret) in [
            ("redis://:S3cr3t/pa?ss@127.0.0.1:6379/0", "pa?ss"), ("redis://:abc@def/ghi@host/0", "def/ghi"),
            ("/x?to%6Ben=tk9", "tk9"), ("/x?session%5Fkey=sk9", "sk9"),
        ] {
            #expect(!Redaction.redact(text).contains(secret), "\(Redaction.redact(text))")
        }
        // A parser's error that quotes a piece of the password does not print it.
        let url = "redis://:S3cr3t/pa?ss@127.0.0.1:6379/0"
        #expect(Redaction.scrub("database 'pa' is not a number", of: url) == "database '***' is not a number")
        #expect(Redaction.scrub("port 'x' is not a port number", of: "redis://h:x/0") == "port 'x' is not a port number")
        #expect(Redaction.redact("redis://name@host:6379/0") == "redis://name@host:6379/0", "a user name is not a secret")
        #expect(Redaction.redact("/hello/world?q=1") == "/hello/world?q=1")
    }
}
