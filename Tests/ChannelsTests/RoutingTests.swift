import ASGI
import Logging
import RedisChannelLayer
import Synchronization
import TestSupport
import Testing

@testable import Channels

/// Records which consumer ran with which arguments.
actor Calls {
    var log: [(String, [String: String])] = []
    func add(_ name: String, _ parameters: [String: String]) { log.append((name, parameters)) }
}

@Suite("routing", .timeLimit(.minutes(2)))
struct RoutingTests {
    func consumer(_ name: String, _ calls: Calls) -> Consumer {
        { context in await calls.add(name, context.parameters) }
    }

    @Test func filtersKwargsIncludeAndOrder() async throws {
        let calls = Calls()
        let router = try Router([
            route("http.request", path: "^/hello/(?P<who>[a-z]+)/$", consumer("hello", calls)),
            route("http.request", path: "^/poll/$", method: "^POST$", consumer("poll", calls)),
            include(
                [
                    route("websocket.connect", path: "^(?P<room>[a-z]+)/$", consumer("room", calls)),
                    route("websocket.connect", consumer("anyroom", calls)),
                ], path: "^/chat/(?P<section>[a-z]+)/"),
            route("http.request", consumer("fallback", calls)),
        ])
        #expect(router.channels == ["http.request", "websocket.connect"])
        func run(_ channel: String, _ message: Message) async throws {
            let (consumer, parameters, _) = try #require(router.match(channel: channel, message: message))
            try await consumer(
                ConsumerContext(
                    message: message, channel: channel, parameters: parameters,
                    layer: InMemoryChannelLayer(), logger: .init(label: "t")))
        }
        try await run("http.request", ["path": "/hello/bob/", "method": "GET"])
        try await run("http.request", ["path": "/poll/", "method": "POST"])
        try await run("http.request", ["path": "/poll/", "method": "GET"])
        try await run("websocket.connect", ["path": "/chat/games/lobby/"])
        try await run("websocket.connect", ["path": "/chat/games/Lobby!/"])
        #expect(router.match(channel: "websocket.connect", message: ["path": "/other/"]) == nil)
        #expect(router.match(channel: "http.request", message: [:]) != nil, "a route without filters matches")
        #expect(router.match(channel: "websocket.receive", message: ["path": "/chat/games/lobby/"]) == nil)
        let log = await calls.log
        #expect(log.map(\.0) == ["hello", "poll", "fallback", "room", "anyroom"])
        #expect(log[0].1 == ["who": "bob"])
        #expect(log[3].1 == ["section": "games", "room": "lobby"], "include arguments merge with the inner route's")
        #expect(log[4].1 == ["section": "games"])
    }

    /// A match is remembered by channel and the values the channel's routes read: the same
    /// answer as matching afresh, whatever the values (missing, bytes, not a string), a repeat
    /// adds nothing, and more distinct values than the cache holds only start it over.
    @Test func rememberedMatchesGiveTheSameAnswers() throws {
        let router = try Router([
            route("http.request", path: "^/hello/(?P<who>[a-z]+)/$", { _ in }),
            route("http.request", path: "^/poll/$", method: "^POST$", { _ in }),
            include([route("websocket.receive", path: "^(?P<room>[a-z0-9]+)/$", { _ in })], path: "^/chat/"),
            route("websocket.receive", { _ in }),
            route("http.request", { _ in }),
        ])
        var messages: [(String, Message)] = [
            ("http.request", ["path": "/hello/bob/", "method": "GET"]),
            ("http.request", ["path": .bytes(Array("/hello/ann/".utf8)), "method": "GET"]),
            ("http.request", ["path": "/poll/", "method": "POST"]),
            ("http.request", ["path": "/poll/", "method": "GET"]),
            ("http.request", ["path": "/poll/"]),
            ("http.request", ["path": .int(7)]),
            ("http.request", [:]),
            ("websocket.receive", ["path": "/chat/lobby/"]),
            ("websocket.receive", ["path": "/chat/Lobby/"]),
            ("websocket.receive", [:]),
            ("websocket.connect", ["path": "/chat/lobby/"]),
        ]
        for i in 0..<(MatchCache.limit + 904) { messages.append(("websocket.receive", ["path": .string("/chat/r\(i)/")])) }
        func answer(_ m: (consumer: Consumer, parameters: [String: String], name: String)?) -> String? {
            m.map { "\($0.name) \($0.parameters.sorted { $0.key < $1.key })" }
        }
        for round in 0..<2 {
            for (channel, message) in messages {
                let fresh = router.firstMatch(channel: channel, listenName: channel, message: message)
                let expected = fresh.map { "\(router.routes[$0.index].name) \($0.parameters.sorted { $0.key < $1.key })" }
                #expect(answer(router.match(channel: channel, message: message)) == expected, "round \(round): \(channel) \(message)")
            }
            #expect(router.matches.count <= MatchCache.limit)
        }
        _ = router.match(channel: "websocket.receive", message: ["path": "/chat/r5000/"])
        let before = router.matches.count
        _ = router.match(channel: "websocket.receive", message: ["path": "/chat/r5000/"])
        #expect(router.matches.count == before, "a repeat is remembered, not added")
        #expect(answer(router.match(channel: "websocket.receive", message: ["path": "/chat/r5000/"])) != nil)
        // A long value is matched afresh and not kept.
        let long: Message = ["path": .string("/chat/" + String(repeating: "a", count: 300) + "/")]
        let kept = router.matches.count
        #expect(router.match(channel: "websocket.receive", message: long)?.parameters == ["room": String(repeating: "a", count: 300)])
        #expect(router.matches.count == kept, "a long value is not kept")
    }

    @Test func missingKeyMeansNoMatch() throws {
        let router = try Router([route("http.request", path: "^/x", { _ in })])
        #expect(router.match(channel: "http.request", message: ["method": "GET"]) == nil)
    }

    @Test func badRoutingFailsAtStartWithTheRouteNamed() {
        #expect {
            try Router([route("http.request", path: "^/(unclosed", name: "broken-route", { _ in })])
        } throws: { error in
            "\(error)".contains("broken-route") && "\(error)".contains("not a valid regex")
                && (error as? RoutingError)?.code == .invalidPattern
        }
        #expect {
            try Router([route("http.request", path: "^/([0-9]+)/$", name: "positional", { _ in })])
        } throws: { error in
            "\(error)".contains("positional") && "\(error)".contains("positional capture group")
                && (error as? RoutingError)?.code == .unnamedGroup
        }
        let badChannel = #expect(throws: RoutingError.self) { try Router([route("bad channel!x", { _ in })]) }
        #expect(badChannel?.code == .invalidChannel)
    }
}

@Suite("worker", .timeLimit(.minutes(2)))
struct WorkerTests {
    func worker(_ entries: [RoutingEntry], layer: InMemoryChannelLayer, only: [String] = [], exclude: [String] = []) throws -> Worker {
        Worker(router: try Router(entries), layer: layer, only: only, exclude: exclude)
    }

    @Test func bufferedSendsGoOutInOrderAfterTheConsumerAlsoWhenItThrows() async throws {
        let layer = InMemoryChannelLayer()
        struct Boom: Error {}
        let worker = try worker(
            [
                route(
                    "work",
                    { context in
                        try await Channel("out").send(["n": 1])
                        try await Channel("out").send(["n": 2])
                        // Buffered: not visible yet while the consumer runs.
                        #expect(try await context.layer.receive(channels: ["out"]) == nil)
                        try await Channel("now").send(["n": 0], immediately: true)
                        #expect(try await context.layer.receive(channels: ["now"]) != nil)
                        throw Boom()
                    })
            ], layer: layer)
        await worker.dispatch(ReceivedMessage(channel: "work", message: [:]))
        #expect(try await layer.receive(channels: ["out"])?.message == ["n": 1])
        #expect(try await layer.receive(channels: ["out"])?.message == ["n": 2])
    }

    @Test func aConsumersLoggerSaysWhichMessageItHandles() async throws {
        let layer = InMemoryChannelLayer()
        let seen = Mutex<[Logger.Metadata]>([])
        let worker = try worker(
            [
                route(
                    "websocket.receive", name: "echo",
                    { context in
                        seen.withLock { $0.append(context.logger[metadataKey: "channel"].map { ["channel": $0] } ?? [:]) }
                        seen.withLock {
                            $0[$0.count - 1]["reply_channel"] = context.logger[metadataKey: "reply_channel"]
                            $0[$0.count - 1]["socket"] = context.logger[metadataKey: "socket"]
                            $0[$0.count - 1]["consumer"] = context.logger[metadataKey: "consumer"]
                        }
                    })
            ], layer: layer)
        await worker.dispatch(ReceivedMessage(channel: "websocket.receive", message: ["reply_channel": "daphne.response.ab!cd"]))
        // The socket is named by a keyed tag, never by its reply channel (from which nothing may be derived).
        let tag = worker.environment.sessionConfiguration.secret.socketTag("daphne.response.ab!cd")
        #expect(tag.count == 12 && !tag.contains("ab!cd"))
        #expect(seen.withLock { $0 } == [["channel": "websocket.receive", "socket": .string(tag), "consumer": "echo"]])
        // Outside a worker the logger is the one given, without per-message metadata.
        let plain = ConsumerContext(
            message: ["reply_channel": "x!y"], channel: "websocket.receive", parameters: [:], layer: layer,
            logger: Logger(label: "t"))
        #expect(plain.logger[metadataKey: "consumer"] == nil)
    }

    @Test func denyAndCloseAndDefaults() async throws {
        let layer = InMemoryChannelLayer()
        let worker = try worker(
            [
                route("websocket.connect", path: "^/deny/", { _ in throw ConsumerError.denyConnection }),
                route("websocket.receive", { _ in throw ConsumerError.close(code: 4001) }),
            ], layer: layer)
        await worker.dispatch(ReceivedMessage(channel: "websocket.connect", message: ["path": "/deny/", "reply_channel": "r!1"]))
        #expect(try await layer.receive(channels: ["r!"])?.message == ["accept": false])
        await worker.dispatch(ReceivedMessage(channel: "websocket.receive", message: ["path": "/x", "reply_channel": "r!2"]))
        #expect(try await layer.receive(channels: ["r!"])?.message == ["close": 4001])
        // Unrouted: connect accepted, HTTP 404.
        await worker.dispatch(ReceivedMessage(channel: "websocket.connect", message: ["path": "/other/", "reply_channel": "r!3"]))
        #expect(try await layer.receive(channels: ["r!"])?.message == ["accept": true])
        await worker.dispatch(ReceivedMessage(channel: "http.request", message: ["path": "/", "reply_channel": "r!4"]))
        #expect(try await layer.receive(channels: ["r!"])?.message["status"] == 404)
    }

    @Test func onlyAndExcludeChannels() throws {
        let layer = InMemoryChannelLayer()
        let entries = [route("chat-messages", { _ in }), route("websocket.receive", { _ in })]
        // The WebSocket channels are always drained (Channels 1.x), routed or not.
        let socketChannels = ["websocket.connect", "websocket.receive", "websocket.disconnect"]
        #expect(try worker(entries, layer: layer).channels == ["chat-messages", "http.request"] + socketChannels)
        #expect(try worker(entries, layer: layer, only: ["websocket.*"]).channels == socketChannels)
        #expect(try worker(entries, layer: layer, exclude: ["http.*", "chat-*"]).channels == socketChannels)
        #expect(
            try worker(entries, layer: layer, exclude: ["websocket.receive"]).channels
                == ["chat-messages", "http.request", "websocket.connect", "websocket.disconnect"])
    }

    @Test func aWorkerLoopServesAndStops() async throws {
        let layer = InMemoryChannelLayer()
        let worker = try worker([route("ping", { try await $0.reply(["pong": true]) })], layer: layer)
        let task = Task { await worker.run() }
        try await layer.send(["reply_channel": "back!x"], to: "ping")
        let got = try await layer.receive(channels: ["back!"], timeout: .seconds(10))
        #expect(got?.message == ["pong": true])
        worker.stop()
        await task.value
        #expect(worker.messagesProcessed == 1)
    }
}

@Suite("worker concurrency on Redis", .timeLimit(.minutes(2)))
struct WorkerConcurrencyTests {
    @Test("at most `concurrency` consumers run at once, and every queued message is consumed")
    func slotsBoundConsumers() async throws {
        let layer = try TestRedis.layer()
        let counts = Mutex((running: 0, most: 0))
        // Consumers hold their slot until the test opens the gate: the first three fill the
        // slots whatever the machine's speed, and a fourth could only start past the bound.
        let gate = Gate()
        let (started, startedSink) = AsyncStream<Int>.makeStream()
        let (done, finished) = AsyncStream<Int>.makeStream()
        for n in 0..<12 { try await layer.send(["n": .int(Int64(n))], to: "slow") }
        let worker = Worker(
            router: try Router([
                route(
                    "slow",
                    { context in
                        counts.withLock {
                            $0.running += 1; $0.most = max($0.most, $0.running)
                        }
                        startedSink.yield(Int(try context.message.int("n")))
                        await gate.wait()
                        counts.withLock { $0.running -= 1 }
                        finished.yield(Int(try context.message.int("n")))
                    })
            ]), layer: layer, concurrency: 3)
        let running = Task { await worker.run() }
        var startedIterator = started.makeAsyncIterator()
        for _ in 0..<3 { _ = await startedIterator.next() }
        #expect(counts.withLock { $0.most } == 3, "three slots: three consumers side by side")
        // Give a fourth consumer every chance to start while the three hold their slots.
        try await Task.sleep(for: .milliseconds(300))
        #expect(counts.withLock { $0.most } == 3, "never more than three")
        gate.open()
        var seen: [Int] = []
        for await n in done {
            seen.append(n)
            if seen.count == 12 { break }
        }
        worker.stop()
        await running.value
        #expect(seen.sorted() == Array(0..<12))
        #expect(counts.withLock { $0.most } == 3, "three slots: three consumers side by side, never more")
        #expect(worker.messagesProcessed == 12)
        try await layer.flush()
        await layer.close()
    }
}

/// Waiters park until `open()`; after it, `wait()` returns at once.
final class Gate: Sendable {
    private let state = Mutex<(open: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))

    func wait() async {
        await withCheckedContinuation { continuation in
            let resumeNow = state.withLock { state -> Bool in
                if state.open { return true }
                state.waiters.append(continuation)
                return false
            }
            if resumeNow { continuation.resume() }
        }
    }

    func open() {
        let waiters = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            state.open = true
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume() }
    }
}
