import ASGI
import ChannelsTesting
import Foundation
import RedisChannelLayer
import Synchronization
import TestSupport
import Testing

@testable import Channels

/// A session store that counts the loads of each key (alone, and with others in one call),
/// over another store (in memory by default).
final class LoadCountingStore: SessionStore {
    let base: any SessionStore
    private let loads = Mutex<[String: Int]>([:])
    private let manyLoads = Mutex<[String: Int]>([:])

    init(base: any SessionStore = InMemorySessionStore()) { self.base = base }

    func loadCount(_ key: String) -> Int { loads.withLock { $0[key] ?? 0 } }
    /// Loads of `key` together with other keys, in one call.
    func manyLoadCount(_ key: String) -> Int { manyLoads.withLock { $0[key] ?? 0 } }

    func load(_ key: String) async throws -> [UInt8]? {
        loads.withLock { $0[key, default: 0] += 1 }
        return try await base.load(key)
    }

    func load(many keys: [String]) async throws -> [[UInt8]?] {
        manyLoads.withLock { for key in keys { $0[key, default: 0] += 1 } }
        return try await base.load(many: keys)
    }

    func store(_ key: String, data: [UInt8], expected: [UInt8]?, ttl: Duration) async throws -> Bool {
        try await base.store(key, data: data, expected: expected, ttl: ttl)
    }

    func delete(_ key: String) async throws { try await base.delete(key) }
}

/// An in-memory layer that counts what is parked on, and taken from, wait channels.
final class WaitCountingLayer: ForwardingChannelLayer, @unchecked Sendable {
    let base: any ChannelLayer = InMemoryChannelLayer()
    private let counts = Mutex((parks: 0, takes: 0))

    var parks: Int { counts.withLock { $0.parks } }
    var takes: Int { counts.withLock { $0.takes } }

    func send(_ message: Message, to channel: String) async throws(ChannelLayerError) {
        if channel.hasPrefix(CapacityTable.waitChannelPrefix) { counts.withLock { $0.parks += 1 } }
        try await base.send(message, to: channel)
    }

    func receiveBatch(channels: [String], max: Int, timeout: Duration) async throws(ChannelLayerError) -> [ReceivedMessage] {
        if channels.contains(where: { $0.hasPrefix(CapacityTable.waitChannelPrefix) }) { counts.withLock { $0.takes += 1 } }
        return try await base.receiveBatch(channels: channels, max: max, timeout: timeout)
    }
}

/// One socket's (or one ordered hand-off's) messages taken together by a worker run one after
/// another, each turn starting from what the turn before it saved: not read back from the
/// store, not parked, not looked for among the parked ones.
@Suite("ordered turns in one worker", .timeLimit(.minutes(2)))
struct OrderedTurnsTests {
    /// Waits (bounded) until `log` holds `count` entries.
    func waitFor(_ log: Log, count: Int) async throws {
        let deadline = ContinuousClock.now + .seconds(20)
        while await log.entries.count < count, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(20)) }
    }

    /// Queues a socket's connect and `count` receives on `layer` (one take's worth for the
    /// worker), then runs `worker` until `log` holds `count` entries (bounded) and stops it.
    func runBurst(_ worker: Worker, on layer: any ChannelLayer, reply: String, count: Int, log: Log) async throws {
        try await layer.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        for order in 1...count {
            try await layer.send(["reply_channel": .string(reply), "path": "/", "order": .int(Int64(order))], to: "websocket.receive")
        }
        let task = Task { await worker.run() }
        try await waitFor(log, count: count)
        worker.stop()
        await task.value
    }

    /// 90 receives of one socket (within a channel's capacity), queued before the worker starts: each turn sees what the one
    /// before it wrote to the channel session, the order holds, and the session is read from the
    /// store once (it was read once per message before), nothing is parked or looked for.
    @Test func aBurstOfOneSocketReadsItsSessionOnce() async throws {
        let store = LoadCountingStore()
        let layer = WaitCountingLayer()
        let log = Log()
        let stale = Log()
        let settings = SessionConfiguration()
        let worker = Worker(
            router: try Router([
                route(
                    "websocket.connect",
                    enforceOrdering { context in
                        try context.channelSession["last"] = .int(0)
                        try await context.accept()
                    }),
                route(
                    "websocket.receive",
                    enforceOrdering { context in
                        let order = try context.message.int("order")
                        let last = try context.channelSession["last"]?.intValue
                        if last != order - 1 { await stale.add("\(order) saw \(last.map(String.init) ?? "nothing")") }
                        try context.channelSession["last"] = .int(order)
                        await log.add("\(order)")
                    }),
            ]), layer: layer, concurrency: 8,
            environment: ConsumerEnvironment(sessionStore: store, sessionConfiguration: settings))
        let reply = "test.reply?turns" + ChannelNames.randomLetters(6)
        try await runBurst(worker, on: layer, reply: reply, count: 90, log: log)
        #expect(await log.entries == (1...90).map(String.init), "in order, each once")
        let staleTurns = await stale.entries
        #expect(staleTurns.isEmpty, "each turn saw the one before it: \(staleTurns.prefix(5))")
        let key = Session.storageKey(Session.channelSessionKey(replyChannel: reply, secret: settings.secret))
        // The connect and the receives come in (at most) two takes; each take's first message
        // reads the session, the rest start from what was saved. Before: 91 reads.
        #expect(store.loadCount(key) <= 4, "session reads: \(store.loadCount(key))")
        #expect(layer.parks == 0, "parked: \(layer.parks)")
        #expect(layer.takes <= 4, "wait-channel takes: \(layer.takes)")
        let stored = try await Session.load(
            key: Session.channelSessionKey(replyChannel: reply, secret: settings.secret), store: store, settings: settings)
        #expect(stored["last"]?.intValue == 90 && stored[OrderingGate.nextOrderKey]?.intValue == 91)
    }

    /// Another process writes the socket's session between two turns (after the turn before
    /// saved, before the next one reads): the turn that saves next loses its race, re-reads and
    /// keeps both writes, and the turns after it see the other writer's key. In memory, and on
    /// a real Redis (its layer and its session store's compare-and-set).
    @Test(arguments: [false, true])
    func aWriteFromElsewhereBetweenTurnsIsKeptAndSeen(onRedis: Bool) async throws {
        let prefix = "t" + ChannelNames.randomLetters(8)
        let store: any SessionStore = onRedis ? try TestRedis.sessionStore(prefix: prefix + "-session:") : LoadCountingStore()
        let layer: any ChannelLayer = onRedis ? try TestRedis.layer(prefix: prefix + ":") : InMemoryChannelLayer()
        let log = Log()
        let settings = SessionConfiguration()
        let reply = "test.reply?other" + ChannelNames.randomLetters(6)
        let socketKey = Session.channelSessionKey(replyChannel: reply, secret: settings.secret)
        let worker = try socketWorker(store: store, layer: layer, settings: settings) { context, order in
            if order == 50 {
                // Another process's consumer writes the session now.
                let other = try await Session.load(key: socketKey, store: store, settings: settings)
                other["elsewhere"] = .string("kept")
                try await other.save()
            }
            let seen = try context.channelSession["elsewhere"]?.stringValue
            await log.add("\(order) \(seen ?? "-")")
            try context.channelSession["count"] = .int(order)
        }
        try await runBurst(worker, on: layer, reply: reply, count: 99, log: log)
        let entries = await log.entries
        #expect(entries.map { $0.split(separator: " ")[0] } == (1...99).map { Substring(String($0)) })
        // Turn 50 read its session before the write; every turn after it sees the write.
        #expect(entries.dropFirst(50).allSatisfy { $0.hasSuffix(" kept") }, "\(entries.dropFirst(48).prefix(6))")
        let stored = try await Session.load(key: socketKey, store: store, settings: settings)
        #expect(stored["elsewhere"]?.stringValue == "kept" && stored["count"]?.intValue == 99)
        #expect(stored[OrderingGate.nextOrderKey]?.intValue == 100)
        if let redis = layer as? RedisChannelLayer { await redis.close() }
    }

    /// A worker whose socket consumers (ordered) hand each frame on to `stage`, numbered by
    /// `reply`, after `before(order)`; it logs each order handed on.
    func handOffWorker(
        store: any SessionStore, layer: any ChannelLayer, settings: SessionConfiguration, reply: String, log: Log,
        before: @escaping @Sendable (Int64) async throws -> Void = { _ in }
    ) throws -> Worker {
        try socketWorker(store: store, layer: layer, settings: settings) { _, order in
            try await before(order)
            try await Channel("stage").send(["n": .int(order)], orderedBy: reply)
            await log.add("\(order)")
        }
    }

    /// A worker whose sockets' connects are accepted and whose frames (ordered) run `receive`
    /// with their order.
    func socketWorker(
        store: any SessionStore, layer: any ChannelLayer, settings: SessionConfiguration,
        receive: @escaping @Sendable (ConsumerContext, Int64) async throws -> Void
    ) throws -> Worker {
        Worker(
            router: try Router([
                route("websocket.connect", enforceOrdering { context in try await context.accept() }),
                route("websocket.receive", enforceOrdering { context in try await receive(context, try context.message.int("order")) }),
            ]), layer: layer, concurrency: 8,
            environment: ConsumerEnvironment(sessionStore: store, sessionConfiguration: settings))
    }

    /// The order numbers of what waits on `stage`, taken.
    func handedOnNumbers(_ layer: any ChannelLayer) async throws -> [Int64] {
        var numbers: [Int64] = []
        while let one = try await layer.receive(channels: ["stage"], timeout: .zero) {
            numbers.append(try #require(one.message[OrderedHandoff.orderField]?.intValue))
        }
        return numbers
    }

    /// A socket's messages one at a time (each its own turn, nothing handed on), each handing
    /// one message on in order: from the second on, the channel session and the hand-off's
    /// counter are read together in one call (one `MGET` on Redis), the counter never alone;
    /// the numbers stay consecutive and unique, also when another sender takes a number between
    /// the read ahead and the send (the save's compare catches it, and the number is read anew).
    @Test(arguments: [false, true])
    func aSocketsHandOffCounterIsReadWithItsSession(onRedis: Bool) async throws {
        let prefix = "t" + ChannelNames.randomLetters(8)
        let store = LoadCountingStore(base: onRedis ? try TestRedis.sessionStore(prefix: prefix + "-session:") : InMemorySessionStore())
        let layer: any ChannelLayer = onRedis ? try TestRedis.layer(prefix: prefix + ":") : InMemoryChannelLayer()
        let log = Log()
        let settings = SessionConfiguration()
        let reply = "test.reply?ahead" + ChannelNames.randomLetters(6)
        let counterKey = OrderedHandoff.sessionKey("sent", channel: "stage", key: reply, secret: settings.secret)
        let worker = try handOffWorker(store: store, layer: layer, settings: settings, reply: reply, log: log) { order in
            guard order == 5 else { return }
            // Another sender takes a number after this turn read the counter ahead.
            let other = try await Session.load(key: counterKey, store: store, settings: settings)
            other[OrderedHandoff.sentField] = .int((other[OrderedHandoff.sentField]?.intValue ?? 0) + 1)
            try await other.save()
        }
        let task = Task { await worker.run() }
        try await layer.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        let socketKey = Session.channelSessionKey(replyChannel: reply, secret: settings.secret)
        for order in 1...8 {
            try await layer.send(["reply_channel": .string(reply), "path": "/", "order": .int(Int64(order))], to: "websocket.receive")
            try await waitFor(log, count: order)
            // Until the turn saved the socket's order: the next message is a turn of its own,
            // not one run after it with the sessions handed on.
            let deadline = ContinuousClock.now + .seconds(20)
            while ContinuousClock.now < deadline {
                let stored = try await Session.load(key: socketKey, store: store.base, settings: settings)
                if stored[OrderingGate.nextOrderKey]?.intValue == Int64(order + 1) { break }
                try await Task.sleep(for: .milliseconds(5))
            }
        }
        worker.stop()
        await task.value
        let numbers = try await handedOnNumbers(layer)
        // Eight sends, and the other sender's number (5) between the fourth and the fifth.
        #expect(numbers == [0, 1, 2, 3, 5, 6, 7, 8], "\(numbers)")
        let counter = Session.storageKey(counterKey)
        let socket = Session.storageKey(socketKey)
        // Turn 1 read the counter alone (nothing was known of it); turns 2 to 8 read it with the
        // session (on a loaded machine a turn may still start right behind the one before and
        // take both as that one saved them: no read at all), and turn 5 once more alone, after
        // its save lost to the other sender (whose own read is the third alone).
        #expect(
            store.manyLoadCount(counter) >= 5 && store.manyLoadCount(socket) == store.manyLoadCount(counter),
            "\(store.manyLoadCount(counter))")
        #expect(store.loadCount(counter) == 3, "counter read alone: \(store.loadCount(counter))")
        if let redis = layer as? RedisChannelLayer { await redis.close() }
    }

    /// A session store whose answer to one save of `key` is lost after the save ran: the
    /// client tries the same compare-and-set again, which the store refuses (the value is no
    /// longer the expected one: it is this save's), as a Redis SIGKILLed between its AOF write
    /// and its reply does to `RedisClient`'s retry.
    final class LostReplyStore: SessionStore {
        let base: any SessionStore
        let key: String
        private let saves = Mutex(0)
        let losing: Int

        init(base: any SessionStore, key: String, losing: Int) {
            self.base = base
            self.key = key
            self.losing = losing
        }

        func load(_ key: String) async throws -> [UInt8]? { try await base.load(key) }
        func load(many keys: [String]) async throws -> [[UInt8]?] { try await base.load(many: keys) }
        func delete(_ key: String) async throws { try await base.delete(key) }
        func store(_ key: String, data: [UInt8], expected: [UInt8]?, ttl: Duration) async throws -> Bool {
            let stored = try await base.store(key, data: data, expected: expected, ttl: ttl)
            guard key == self.key, stored else { return stored }
            let count = saves.withLock { count in
                count += 1
                return count
            }
            guard count == losing else { return true }
            // The reply was lost; the retry of the same command is refused.
            return try await base.store(key, data: data, expected: expected, ttl: ttl)
        }
    }

    /// An ordered hand-off's counter save that ran but whose reply was lost (the store's retry
    /// then refused as a conflict with that very write) keeps its number: the numbers the
    /// receiver gets stay consecutive (before, the send numbered anew and skipped one, and the
    /// receiver waited out the gap timeout, 10 s, for it). In memory and on a real Redis.
    @Test(arguments: [false, true])
    func aCounterSaveWhoseReplyWasLostKeepsItsNumber(onRedis: Bool) async throws {
        let prefix = "t" + ChannelNames.randomLetters(8)
        let settings = SessionConfiguration()
        let reply = "test.reply?lost" + ChannelNames.randomLetters(6)
        let counterKey = Session.storageKey(OrderedHandoff.sessionKey("sent", channel: "stage", key: reply, secret: settings.secret))
        let store = LostReplyStore(
            base: onRedis ? try TestRedis.sessionStore(prefix: prefix + "-session:") : InMemorySessionStore(), key: counterKey, losing: 3)
        let layer: any ChannelLayer = onRedis ? try TestRedis.layer(prefix: prefix + ":") : InMemoryChannelLayer()
        let log = Log()
        let worker = try handOffWorker(store: store, layer: layer, settings: settings, reply: reply, log: log)
        let task = Task { await worker.run() }
        try await layer.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        for order in 1...5 {
            try await layer.send(["reply_channel": .string(reply), "path": "/", "order": .int(Int64(order))], to: "websocket.receive")
        }
        try await waitFor(log, count: 5)
        worker.stop()
        await task.value
        let numbers = try await handedOnNumbers(layer)
        #expect(numbers == [0, 1, 2, 3, 4], "\(numbers)")
        if let redis = layer as? RedisChannelLayer { await redis.close() }
    }

    /// 100 messages of one ordered hand-off, taken by one worker of concurrency 8: they run one
    /// after another (before, each ran at once and all but the due one were parked and taken
    /// back), in order, numbered once each.
    @Test func oneHandOffsMessagesRunInOrderWithoutParking() async throws {
        let layer = WaitCountingLayer()
        let log = Log()
        let worker = Worker(
            router: try Router([
                route("post") { context in
                    try await Channel("stage").send(["text": context.message["text"] ?? .null], orderedBy: "room-9")
                },
                route(
                    "stage",
                    inSendOrder { context in
                        await log.add("\(context.message[OrderedHandoff.orderField]?.intValue ?? -1)")
                    }),
            ]), layer: layer, concurrency: 8, environment: ConsumerEnvironment())
        let task = Task { await worker.run() }
        for index in 0..<100 { try await layer.send(["text": .string("m\(index)")], to: "post") }
        try await waitFor(log, count: 100)
        worker.stop()
        await task.value
        #expect(await log.entries == (0..<100).map(String.init), "each number once, in order")
        #expect(layer.parks < 10, "parked: \(layer.parks) of 100")
    }

    /// A worker's copy of a socket's session, handed on from its last turn, that another
    /// worker's turns have passed since: the socket's next message here is judged early on it
    /// and parked, the store says it is due, so it drains itself; the messages that drain runs
    /// inline are judged on the store, not on the copy (on the copy, each was parked again and
    /// left behind by the drain until the gap watch's look, 10 s later: seen in 2 of 25 chat
    /// bursts through two workers).
    @Test func aCopyOtherWorkersPassedDoesNotStrandADrain() async throws {
        let log = Log()
        let harness = try TestHarness(OrderingTests.routing(log: log))
        let reply = try await harness.newReplyChannel()
        let ordering = OrderingTests()
        let scope = SessionHandOn(maxAge: .seconds(5))
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        // This worker's turn 1: its save is handed on.
        try await SessionHandOn.$current.withValue(scope) {
            try await harness.send(ordering.message(reply, order: 1), to: "websocket.receive")
        }
        // Another worker's turns 2 and 3, and 5 parked there (it came early).
        try await harness.send(ordering.message(reply, order: 2), to: "websocket.receive")
        try await harness.send(ordering.message(reply, order: 3), to: "websocket.receive")
        try await ordering.parkAsADeadWorker(harness, reply: reply, orders: [5])
        // This worker's next message, 4, first judged on its copy (the order at 2).
        try await SessionHandOn.$current.withValue(scope) {
            try await harness.send(ordering.message(reply, order: 4), to: "websocket.receive", runPending: false)
        }
        #expect(await log.entries == ["0", "1", "2", "3", "4", "5"])
    }

    /// An ordered hand-off's end, sent from a task that holds a copy of the hand-off's counter
    /// from an earlier send that other workers' sends have passed since: the end takes the
    /// number after the last one stored (it deletes the counter without a compare, so a number
    /// read from the copy went out twice, and the receiver dropped one of the two as late).
    @Test func anEndAfterOtherWorkersSendsTakesTheNextNumber() async throws {
        let harness = try TestHarness([
            route("post") { context in
                try await Channel("stage").send(["text": context.message["text"] ?? .null], orderedBy: "room-3")
            },
            route("end") { context in try await context.endOrderedSequence(to: "stage", orderedBy: "room-3") },
        ])
        let scope = SessionHandOn(maxAge: .seconds(5))
        // This worker's send (its counter's copy handed on), then two of another worker.
        try await SessionHandOn.$current.withValue(scope) {
            try await harness.send(["text": "a"], to: "post", runPending: false)
        }
        try await harness.send(["text": "b"], to: "post", runPending: false)
        try await harness.send(["text": "c"], to: "post", runPending: false)
        try await SessionHandOn.$current.withValue(scope) {
            try await harness.send([:], to: "end", runPending: false)
        }
        var numbers: [String] = []
        while let message = try await harness.receive(from: "stage") {
            let stamp = try #require(OrderStamp(message))
            numbers.append(stamp.end ? "end \(stamp.order)" : "\(stamp.order)")
        }
        #expect(numbers == ["0", "1", "2", "end 3"])
    }
}
