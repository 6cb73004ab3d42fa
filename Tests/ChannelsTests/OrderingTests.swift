import ASGI
import ChannelsTesting
import Foundation
import Logging
import RedisChannelLayer
import Synchronization
import TestSupport
import Testing

@testable import Channels

@Suite("ordering", .timeLimit(.minutes(2)))
struct OrderingTests {
    static func routing(log: Log, slight: Bool = false) -> [RoutingEntry] {
        [
            route(
                "websocket.connect",
                enforceOrdering(slight: slight) { context in
                    await log.add("0")
                    try await context.accept()
                }),
            route(
                "websocket.receive",
                enforceOrdering(slight: slight) { context in
                    let order = try context.message.int("order")
                    await log.add("\(order)")
                    try await context.reply(["text": .string("\(order)")])
                }),
            route(
                "websocket.disconnect",
                enforceOrdering(slight: slight) { context in
                    await log.add("disconnect \(try context.message.int("order"))")
                }),
        ]
    }

    func message(_ reply: String, order: Int64) -> Message {
        ["reply_channel": .string(reply), "path": "/", "order": .int(order), "text": .string("\(order)")]
    }

    /// Parks receives of `orders` on the socket's wait channels, as a worker that died since
    /// did; returns the socket's shared wait channel.
    @discardableResult
    func parkAsADeadWorker(_ harness: TestHarness, reply: String, orders: [Int64]) async throws -> String {
        let shared = Self.sharedWaitChannel(harness, reply: reply)
        for order in orders {
            let parked = ParkedMessage(channel: "websocket.receive", content: message(reply, order: order), order: order)
            try await harness.layer.send(parked.message, to: shared + ".\(order)")
        }
        return shared
    }

    /// Under maxmemory eviction (or expiry) a sender's counter can vanish while its receiver's
    /// state stays: the next send is numbered 0 again. Before the epoch, the receiver dropped it
    /// and everything after as "older than the next order" (the e2e eviction test caught it).
    @Test func aSequenceWhoseSenderCounterWasLostBeginsAgainInsteadOfBeingDropped() async throws {
        let store = InMemorySessionStore()
        let log = Log()
        let harness = try TestHarness(
            [
                route("post") { context in
                    try await Channel("stage").send(["text": context.message["text"] ?? .null], orderedBy: "room-7")
                },
                route("stage", inSendOrder { context in await log.add(try context.message.string("text")) }),
            ], environment: ConsumerEnvironment(sessionStore: store))
        func post(_ text: String) async throws { try await harness.send(["text": .string(text)], to: "post") }
        try await post("a")
        try await post("b")
        let secret = harness.environment.sessionConfiguration.secret
        let sent = Session.storageKey(OrderedHandoff.sessionKey("sent", channel: "stage", key: "room-7", secret: secret))
        #expect(try await store.load(sent) != nil)
        // What an eviction does: the sender's counter is gone, the receiver's next order (2) stays.
        try await store.delete(sent)
        try await post("c")
        try await post("d")
        // A straggler of the old sequence (stamped before the loss) still runs, unordered.
        let receiver = try await Session.load(
            key: OrderedHandoff.sessionKey("next", channel: "stage", key: "room-7", secret: secret), store: store,
            settings: harness.environment.sessionConfiguration, ttl: .seconds(3600), log: .none)
        let old = receiver[OrderedHandoff.oldEpochsKey]?.arrayValue?.first?.stringValue
        #expect(old != nil, "the receiver remembers the sequence it left")
        let late = OrderStamp(key: "room-7", order: 2, epoch: old ?? "").stamped(["text": "late"])
        #expect(OrderStamp(late) == OrderStamp(key: "room-7", order: 2, epoch: old ?? ""), "the stamp reads back")
        try await harness.send(late, to: "stage")
        #expect(await log.entries == ["a", "b", "c", "d", "late"])
    }

    @Test func earlyMessagesWaitForTheirTurnInMemory() async throws {
        let log = Log()
        let harness = try TestHarness(Self.routing(log: log))
        let reply = try await harness.newReplyChannel()
        try await harness.send(message(reply, order: 2), to: "websocket.receive")
        try await harness.send(message(reply, order: 3), to: "websocket.receive")
        #expect(await log.entries.isEmpty, "2 and 3 wait for the connect and 1")
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        #expect(await log.entries == ["0"])
        try await harness.send(message(reply, order: 1), to: "websocket.receive")
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 4, "code": 1000], to: "websocket.disconnect")
        #expect(await log.entries == ["0", "1", "2", "3", "disconnect 4"])
        var replies: [Message] = []
        while let next = try await harness.receive(from: reply) { replies.append(next) }
        #expect(replies == [["accept": true], ["text": "1"], ["text": "2"], ["text": "3"]])
    }

    /// An early message waits once, on its own order's channel, and is taken only when its
    /// turn comes: a turn that ends while later messages still wait for an earlier one leaves
    /// them where they are (the shared wait channel took them all and put them back each time:
    /// with two workers on a burst, most of the layer's traffic).
    @Test func anEarlyMessageIsParkedOnceAndTakenOnItsTurn() async throws {
        let log = Log()
        let harness = try TestHarness(Self.routing(log: log))
        let reply = try await harness.newReplyChannel()
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        try await harness.send(message(reply, order: 3), to: "websocket.receive")
        try await harness.send(message(reply, order: 4), to: "websocket.receive")
        try await harness.send(message(reply, order: 1), to: "websocket.receive")
        #expect(await log.entries == ["0", "1"], "3 and 4 wait for 2")
        try await harness.send(message(reply, order: 2), to: "websocket.receive")
        #expect(await log.entries == ["0", "1", "2", "3", "4"])
        let parks = harness.layer.sent.filter {
            if case .channel(let name) = $0.to { return name.hasPrefix(CapacityTable.waitChannelPrefix) }
            return false
        }
        #expect(parks.count == 2, "3 and 4 parked once each, never taken and put back: \(parks.count) sends to wait channels")
    }

    /// A message that never arrives (order 1 lost): once the order has stood still for the gap
    /// timeout, the messages waiting after it run, in order, and the skip is counted.
    @Test func aLostMessageIsSkippedAfterTheGapTimeout() async throws {
        let log = Log()
        let harness = try TestHarness(
            Self.routing(log: log), environment: ConsumerEnvironment(orderingGapTimeout: .milliseconds(300)))
        let reply = try await harness.newReplyChannel()
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        try await harness.send(message(reply, order: 3), to: "websocket.receive")
        try await harness.send(message(reply, order: 2), to: "websocket.receive")
        #expect(await log.entries == ["0"])
        let deadline = ContinuousClock.now + .seconds(20)
        while await log.entries.count < 3, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(50)) }
        #expect(await log.entries == ["0", "2", "3"], "2 and 3 ran in order after the gap timeout")
        #expect(harness.environment.orderingGaps.skipped == 1)
        try await harness.send(message(reply, order: 4), to: "websocket.receive")
        #expect(await log.entries == ["0", "2", "3", "4"])
    }

    @Test func slightOnlyWaitsForTheConnect() async throws {
        let log = Log()
        let harness = try TestHarness(Self.routing(log: log, slight: true))
        let reply = try await harness.newReplyChannel()
        try await harness.send(message(reply, order: 2), to: "websocket.receive")
        #expect(await log.entries.isEmpty, "nothing before the connect")
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        #expect(await log.entries == ["0", "2"])
        try await harness.send(message(reply, order: 4), to: "websocket.receive")
        try await harness.send(message(reply, order: 3), to: "websocket.receive")
        #expect(await log.entries == ["0", "2", "4", "3"], "after the connect, messages run as they come")
    }

    /// A session written by a worker whose clock is a minute behind (or this one a minute
    /// ahead): the order seems to have stood still for a minute. An early message still waits
    /// for the one before it (the gap's age is this process's own, from when it first saw it),
    /// and both run in order; nothing is skipped or dropped as stale.
    @Test func anotherWorkersClockDoesNotAgeAGap() async throws {
        let log = Log()
        let harness = try TestHarness(Self.routing(log: log))
        let reply = try await harness.newReplyChannel()
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        let settings = harness.environment.sessionConfiguration
        let session = try await Session.load(
            key: Session.channelSessionKey(replyChannel: reply, secret: settings.secret), store: harness.environment.sessionStore,
            settings: settings, ttl: settings.channelSessionAge)
        session[OrderingGate.movedAtKey] = .int(OrderingGate.nowMillis() - 60_000)
        try await session.save()
        try await harness.send(message(reply, order: 2), to: "websocket.receive")
        #expect(await log.entries == ["0"], "2 waits for 1")
        try await harness.send(message(reply, order: 1), to: "websocket.receive")
        #expect(await log.entries == ["0", "1", "2"])
        #expect(harness.environment.orderingGaps.skipped == 0)
    }

    @Test func aFullWaitChannelClosesTheSocketWith1013() async throws {
        let log = Log()
        let layer = InMemoryChannelLayer(configuration: .init(channelCapacities: [("__wait__.*", 2)]))
        let harness = try TestHarness(Self.routing(log: log), layer: layer)
        let socket = WebSocketTestClient(harness, path: "/")
        #expect(try await socket.connect())
        for order: Int64 in [5, 6, 7] { try await socket.enqueue(text: "x", order: order) }
        try await harness.runPending()
        #expect(try await socket.receive() == ["close": 1013])
        #expect(await log.entries == ["0"])
    }

    /// A socket that floods past the wait channels' capacity is closed (1013), but its
    /// disconnect is never refused: it waits (on the shared channel, where the gap watch looks
    /// first) and runs once the gap timeout passed, so the socket's cleanup (its groups, its
    /// session) is not lost with the refused frames.
    @Test func aFloodingSocketsDisconnectStillRuns() async throws {
        let log = Log()
        let layer = InMemoryChannelLayer(configuration: .init(channelCapacities: [("__wait__.*", 2)]))
        let harness = try TestHarness(
            Self.routing(log: log), layer: layer, environment: ConsumerEnvironment(orderingGapTimeout: .milliseconds(300)))
        let socket = WebSocketTestClient(harness, path: "/")
        #expect(try await socket.connect())
        try await socket.enqueue(text: "x", order: 5)
        try await harness.runPending()
        #expect(try await socket.receive() == ["close": 1013])
        try await harness.send(
            ["reply_channel": .string(socket.replyChannel ?? ""), "path": "/", "order": 6, "code": 1013], to: "websocket.disconnect")
        let deadline = ContinuousClock.now + .seconds(20)
        while await log.entries.count < 2, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(50)) }
        #expect(await log.entries == ["0", "disconnect 6"], "the disconnect ran after the gap timeout")
    }

    /// The socket's one shared wait channel (where a disconnect too far ahead waits, and where
    /// earlier versions parked every message).
    static func sharedWaitChannel(_ harness: TestHarness, reply: String) -> String {
        let key = Session.channelSessionKey(replyChannel: reply, secret: harness.environment.sessionConfiguration.secret)
        return CapacityTable.waitChannelPrefix + Session.storageKey("wait:" + key).prefix(40)
    }

    /// Two workers of one deployment (one session store and secret, a 300 ms gap timeout): the
    /// first on `layer` itself, the second through `parkingThrough` (a wrapper of it).
    static func twoWorkers(log: Log, on layer: any ChannelLayer, parkingThrough wrapper: any ChannelLayer) throws -> (
        TestHarness, TestHarness
    ) {
        let (store, settings) = (InMemorySessionStore(), SessionConfiguration())
        func environment() -> ConsumerEnvironment {
            ConsumerEnvironment(sessionStore: store, sessionConfiguration: settings, orderingGapTimeout: .milliseconds(300))
        }
        return (
            try TestHarness(routing(log: log), layer: layer, environment: environment()),
            try TestHarness(routing(log: log), layer: wrapper, environment: environment())
        )
    }

    /// Waits (bounded) until `log` holds `count` entries.
    static func waitFor(_ log: Log, count: Int) async throws {
        let deadline = ContinuousClock.now + .seconds(20)
        while await log.entries.count < count, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(50)) }
    }

    /// An order no socket reaches (`Int64.max`, from a broken or forged message) is dropped and
    /// counted: a receive is not refused with 1013, and a disconnect, which waits on the shared
    /// channel, is not skipped to by the gap watch, which would move the order past every later
    /// message (and overflowed computing the one after it: the worker trapped).
    @Test func anOrderPastEveryOtherIsDroppedAndTheSocketGoesOn() async throws {
        let log = Log()
        let harness = try TestHarness(
            Self.routing(log: log), environment: ConsumerEnvironment(orderingGapTimeout: .milliseconds(300)))
        let reply = try await harness.newReplyChannel()
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        try await harness.send(message(reply, order: .max), to: "websocket.receive")
        try await harness.send(
            ["reply_channel": .string(reply), "path": "/", "order": .int(.max), "code": 1000], to: "websocket.disconnect")
        // Parked before this change (as a disconnect too far ahead): the gap watch finds it there.
        let parked = ParkedMessage(
            channel: "websocket.disconnect", content: ["reply_channel": .string(reply), "path": "/", "order": .int(.max)], order: .max)
        try await harness.layer.send(parked.message, to: Self.sharedWaitChannel(harness, reply: reply))
        try await harness.send(message(reply, order: 2), to: "websocket.receive")
        try await harness.send(message(reply, order: 1), to: "websocket.receive")
        // Three gap timeouts: time for the watch to look twice and skip, if it would.
        try await Task.sleep(for: .milliseconds(1200))
        try await harness.send(message(reply, order: 3), to: "websocket.receive")
        #expect(await log.entries == ["0", "1", "2", "3"])
        var replies: [Message] = []
        while let next = try await harness.receive(from: reply) { replies.append(next) }
        #expect(replies == [["accept": true], ["text": "1"], ["text": "2"], ["text": "3"]], "no 1013")
        #expect(harness.environment.orderingGaps.skipped == 0)
    }

    /// A parked message whose turn has passed (on the shared channel, left by an earlier version,
    /// or taken back after another worker skipped past it) is dropped when the gap skip takes it:
    /// neither run a second time nor put back to wait until it expires.
    @Test func aParkedMessageWhoseTurnPassedIsDroppedByTheSkip() async throws {
        let log = Log()
        let harness = try TestHarness(
            Self.routing(log: log), environment: ConsumerEnvironment(orderingGapTimeout: .milliseconds(300)))
        let reply = try await harness.newReplyChannel()
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        try await harness.send(message(reply, order: 1), to: "websocket.receive")
        let shared = Self.sharedWaitChannel(harness, reply: reply)
        let stale = ParkedMessage(channel: "websocket.receive", content: message(reply, order: 1), order: 1)
        try await harness.layer.send(stale.message, to: shared)
        // 2 and 3 lost: 4 waits, then runs after the gap timeout; the stale 1 goes with the skip.
        try await harness.send(message(reply, order: 4), to: "websocket.receive")
        try await Self.waitFor(log, count: 3)
        #expect(await log.entries == ["0", "1", "4"], "4 ran after the gap, 1 not again")
        #expect(harness.environment.orderingGaps.skipped == 2)
        let left = try await harness.layer.receive(channels: [shared, shared + ".1"], timeout: .zero)
        #expect(left == nil, "the stale message is not put back: \(left?.channel ?? "")")
    }

    /// `slight` ordering whose connect was lost (a worker killed while holding it): the
    /// receives wait one gap timeout, then run; the skip is counted.
    @Test func slightOrderingSkipsALostConnect() async throws {
        let log = Log()
        let harness = try TestHarness(
            Self.routing(log: log, slight: true), environment: ConsumerEnvironment(orderingGapTimeout: .milliseconds(300)))
        let reply = try await harness.newReplyChannel()
        try await harness.send(message(reply, order: 2), to: "websocket.receive")
        try await harness.send(message(reply, order: 1), to: "websocket.receive")
        #expect(await log.entries.isEmpty, "the connect first")
        try await Self.waitFor(log, count: 2)
        #expect(Set(await log.entries) == ["1", "2"], "both ran after the gap timeout")
        #expect(harness.environment.orderingGaps.skipped == 1)
        try await harness.send(message(reply, order: 3), to: "websocket.receive")
        #expect(await log.entries.last == "3", "later messages run as they come")
        let shared = Self.sharedWaitChannel(harness, reply: reply)
        #expect(try await harness.layer.receive(channels: [shared], timeout: .zero) == nil, "nothing left waiting")
    }

    /// A worker that dies holding several of a socket's messages leaves several gaps. The
    /// first waits its gap timeout; a later one whose following message was parked before that
    /// stand began is lost on the same evidence and skipped after an eighth of the timeout
    /// (one gap timeout each made a burst wait a minute and more after a worker was killed).
    @Test func aGapProvenLostByTheOneBeforeItIsSkippedAfterItsGrace() async throws {
        let log = Log()
        let timeout = Duration.seconds(4)
        let harness = try TestHarness(Self.routing(log: log), environment: ConsumerEnvironment(orderingGapTimeout: timeout))
        let reply = try await harness.newReplyChannel()
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        // 1 and 3 lost; 4 parks first (the stand at 1 begins when it is seen), then 2.
        try await harness.send(message(reply, order: 4), to: "websocket.receive")
        try await harness.send(message(reply, order: 2), to: "websocket.receive")
        #expect(await log.entries == ["0"])
        try await Self.waitFor(log, count: 2)
        let afterFirstSkip = ContinuousClock.now
        // Its grace is half a second; a gap timeout of its own would be more than four.
        while await log.entries.count < 3, ContinuousClock.now - afterFirstSkip < timeout * 5 / 8 {
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(await log.entries == ["0", "2", "4"], "4 ran a grace after 2, not a gap timeout later")
        #expect(harness.environment.orderingGaps.skipped == 2)
        try await harness.send(message(reply, order: 5), to: "websocket.receive")
        #expect(await log.entries == ["0", "2", "4", "5"])
    }

    /// Even a gap the one before it proves lost is skipped only once the order has stood
    /// there for its grace (an eighth of the gap timeout) as this process saw it: a message
    /// on its way, or just taken by another turn, that comes within the grace runs, in order.
    @Test func aGapWhoseMessageComesWithinItsGraceIsNotSkipped() async throws {
        let log = Log()
        let harness = try TestHarness(
            Self.routing(log: log), environment: ConsumerEnvironment(orderingGapTimeout: .milliseconds(500)))
        let reply = try await harness.newReplyChannel()
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        // 1 lost; 2 and 4 park (4 waiting proves 3 lost once 1 is); 3 comes, within the grace.
        try await harness.send(message(reply, order: 2), to: "websocket.receive")
        try await harness.send(message(reply, order: 4), to: "websocket.receive")
        try await Self.waitFor(log, count: 2)
        #expect(await log.entries == ["0", "2"], "3 is waited for")
        try await harness.send(message(reply, order: 3), to: "websocket.receive")
        #expect(await log.entries == ["0", "2", "3", "4"], "3 arrived within its grace and ran, in order")
        #expect(harness.environment.orderingGaps.skipped == 1)
    }

    /// A gap found lost by its age is skipped alone: the orders between it and the first one
    /// waiting may still be on their way (sent an instant before it), and get their grace. The
    /// skip jumped to the first one waiting, and a message that came just after was dropped as
    /// late (the second red team, with a killed worker and a paused one).
    @Test func aGapFoundLostByItsAgeIsSkippedAlone() async throws {
        let log = Log()
        let timeout = Duration.milliseconds(1600)
        let harness = try TestHarness(Self.routing(log: log), environment: ConsumerEnvironment(orderingGapTimeout: timeout))
        let reply = try await harness.newReplyChannel()
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        // 1 lost; 3 waits; 2 comes just after 1 is given up.
        try await harness.send(message(reply, order: 3), to: "websocket.receive")
        let deadline = ContinuousClock.now + .seconds(20)
        while harness.environment.orderingGaps.skipped == 0, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(5))
        }
        try await harness.send(message(reply, order: 2), to: "websocket.receive")
        try await Self.waitFor(log, count: 3)
        #expect(await log.entries == ["0", "2", "3"], "2 came within its grace and ran before 3")
        #expect(harness.environment.orderingGaps.skipped == 1)
    }

    /// Messages parked by a worker that died since (nothing of them recorded here) still run:
    /// the gap watch goes on while anything waits, not only while this process's own parks do
    /// (it stopped once its own had run, and the dead worker's waited for the socket's next
    /// frame).
    @Test func theWatchGoesOnForMessagesAnotherWorkerParked() async throws {
        let log = Log()
        let harness = try TestHarness(
            Self.routing(log: log), environment: ConsumerEnvironment(orderingGapTimeout: .milliseconds(300)))
        let reply = try await harness.newReplyChannel()
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        // Parked by a worker that died (1 and 3 lost with it).
        try await parkAsADeadWorker(harness, reply: reply, orders: [4, 5])
        try await harness.send(message(reply, order: 2), to: "websocket.receive")
        try await Self.waitFor(log, count: 4)
        #expect(await log.entries == ["0", "2", "4", "5"])
        #expect(harness.environment.orderingGaps.skipped == 2)
    }

    /// Every worker that saw this socket died at once: 1 was lost with them, 2 and 3 wait
    /// parked, and nothing of the socket comes again to bring a gate back. The dead watch's
    /// lease lapses; a sweeper claims it and sends 2 back on `websocket.receive`; the gate that
    /// meets it parks it, watches the gap, skips 1 and runs 2 and 3, and the watch gives its
    /// lease up once nothing waits. Before, 2 and 3 waited for the socket's next frame.
    @Test func aSocketWhoseWatchersAllDiedIsResumedByASweeper() async throws {
        let log = Log()
        let harness = try TestHarness(
            Self.routing(log: log), environment: ConsumerEnvironment(orderingGapTimeout: .milliseconds(300)))
        let reply = try await harness.newReplyChannel()
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        let shared = try await parkAsADeadWorker(harness, reply: reply, orders: [2, 3])
        let leases = try #require(harness.layer.leases)
        try await leases.holdLease(shared, in: OrderingSweeper.pool, note: "1", for: .milliseconds(1))
        // Another lapsed lease whose messages all ran: released, nothing sent.
        try await leases.holdLease(shared + "0", in: OrderingSweeper.pool, note: "4", for: .milliseconds(1))
        try await Task.sleep(for: .milliseconds(20))
        let sweeper = OrderingSweeper(layer: harness.layer, environment: harness.environment, logger: Logger(label: "test"))
        #expect(await sweeper.sweep() == 1, "one socket resumed")
        #expect(await log.entries == ["0"], "the sweeper runs nothing itself")
        #expect(try await harness.runPending() == 1, "the message sent back")
        try await Self.waitFor(log, count: 3)
        #expect(await log.entries == ["0", "2", "3"])
        #expect(harness.environment.orderingGaps.skipped == 1)
        // The watch released the lease when nothing waited: a claim long after finds none.
        let deadline = ContinuousClock.now + .seconds(10)
        while harness.environment.orderingGaps.isWatched(shared), ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(20))
        }
        try await leases.holdLease("__wait__.probe", in: OrderingSweeper.pool, note: "", for: .milliseconds(1))
        try await Task.sleep(for: .seconds(3))
        #expect(try await leases.claimLapsedLeases(in: OrderingSweeper.pool, max: 10, for: .seconds(1)).map(\.name) == ["__wait__.probe"])
    }

    /// A mass orphaning (every worker of many sockets gone at once: a lost host under load), on
    /// Redis: one sweep claims the lapsed leases in batches of 64 while they come full and resumes
    /// every socket, 16 at a time; each socket's parked messages then run, in order.
    @Test func manySocketsOrphanedAtOnceOnRedisAreAllResumed() async throws {
        let log = Log()
        // Room for every socket's sent-back message; the wait channels at their usual size.
        let layer = try TestRedis.layer(channelCapacities: [("websocket.receive", 1000)])
        let harness = try TestHarness(
            [
                route("websocket.connect", enforceOrdering { context in try await context.accept() }),
                route(
                    "websocket.receive",
                    enforceOrdering { context in
                        await log.add(try context.message.string("reply_channel") + " " + String(try context.message.int("order")))
                    }),
            ], layer: layer, environment: ConsumerEnvironment(orderingGapTimeout: .milliseconds(300)))
        let leases = try #require(harness.layer.leases)
        let count = 200
        var replies: [String] = []
        for _ in 0..<count {
            let reply = try await harness.newReplyChannel()
            replies.append(reply)
            try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
            // 1 died with the workers; 2 and 3 wait parked under the dead watch's lease.
            let shared = try await parkAsADeadWorker(harness, reply: reply, orders: [2, 3])
            try await leases.holdLease(
                shared, in: OrderingSweeper.pool, note: OrderingSweeper.note(next: 1, holder: "dead"), for: .milliseconds(1))
        }
        try await Task.sleep(for: .milliseconds(20))
        let sweeper = OrderingSweeper(layer: harness.layer, environment: harness.environment, logger: Logger(label: "test"))
        let first = await sweeper.sweep()
        #expect(first > OrderingSweeper.claimBatch, "one sweep claims again while its batches come full: \(first)")
        var resumed = first
        for _ in 0..<10 where resumed < count { resumed += await sweeper.sweep() }
        #expect(resumed == count, "every orphaned socket resumed once: \(resumed) of \(count)")
        #expect(try await harness.runPending() == count, "one message sent back per socket")
        let deadline = ContinuousClock.now + .seconds(30)
        while await log.entries.count < 2 * count, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(50)) }
        var bySocket: [String: [String]] = [:]
        for entry in await log.entries {
            let parts = entry.split(separator: " ")
            bySocket[String(parts[0]), default: []].append(String(parts[1]))
        }
        #expect(bySocket.count == count, "every socket's parked messages ran: \(bySocket.count) of \(count)")
        #expect(bySocket.values.allSatisfy { $0 == ["2", "3"] }, "in order, once each")
        #expect(harness.environment.orderingGaps.skipped == count, "the lost 1 of each socket skipped, counted")
        // The watches end once nothing waits (bounded); then the layer closes.
        let watched = replies.map { Self.sharedWaitChannel(harness, reply: $0) }
        let quiet = ContinuousClock.now + .seconds(30)
        while watched.contains(where: harness.environment.orderingGaps.isWatched), ContinuousClock.now < quiet {
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(!watched.contains(where: harness.environment.orderingGaps.isWatched), "every watch ended once nothing waited")
        await layer.close()
    }

    /// A worker that dies between its park and its watch's first renewal (here: frozen for good
    /// right after the park) leaves a lease behind: once it lapses, another worker's sweeper
    /// resumes the socket, and what waits runs. Before, the lease was first taken by the watch,
    /// so that parked message waited for the socket's next frame (or expired unseen).
    @Test(arguments: [false, true])
    func aWorkerThatDiesRightAfterItsParkLeavesALeaseForTheSweepers(onRedis: Bool) async throws {
        let log = Log()
        let layer: any ChannelLayer = onRedis ? try TestRedis.layer() : InMemoryChannelLayer()
        let freezing = FreezeAfterParkLayer(base: layer)
        let (live, dying) = try Self.twoWorkers(log: log, on: layer, parkingThrough: freezing)
        let reply = try await live.newReplyChannel()
        let shared = Self.sharedWaitChannel(live, reply: reply)
        try await live.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        // 1 is lost; 2 comes to the dying worker, which parks it and is gone.
        let frozen = Task { try await dying.send(message(reply, order: 2), to: "websocket.receive", runPending: false) }
        defer { frozen.cancel() }
        let parkedBy = ContinuousClock.now + .seconds(10)
        while !freezing.froze.withLock({ $0 }), ContinuousClock.now < parkedBy { try await Task.sleep(for: .milliseconds(10)) }
        #expect(try await layer.messagesPending(in: [shared + ".2"]) == [1], "2 waits parked")
        // The lease lapses (2.6 s for this gap timeout); the live worker's sweeper takes it.
        let sweeper = OrderingSweeper(layer: live.layer, environment: live.environment, logger: Logger(label: "test"))
        var resumed = 0
        let lapsedBy = ContinuousClock.now + .seconds(10)
        while resumed == 0, ContinuousClock.now < lapsedBy {
            try await Task.sleep(for: .milliseconds(200))
            resumed = await sweeper.sweep()
        }
        #expect(resumed == 1, "the socket the dead worker parked for was resumed")
        #expect(try await live.runPending() == 1, "2 sent back")
        try await Self.waitFor(log, count: 2)
        #expect(await log.entries == ["0", "2"])
        #expect(live.environment.orderingGaps.skipped == 1)
        frozen.cancel()
        await layer.close()
    }

    /// The lease a park takes is one nobody holds, and it goes once the park's turn is done
    /// (here the order moved past the parked message while it parked: another worker ran the
    /// gap and then the message itself). With another process's watch holding the socket's
    /// lease, the park leaves that lease as it is (taken over and released, that watch was left
    /// without one until its next renewal: the first red team of this change); with none, the
    /// park's own lease is not left behind for a sweeper to find.
    @Test(arguments: [false, true], [true, false])
    func aParksLeaseIsOnlyAFreeOneAndGoesWithItsTurn(onRedis: Bool, anotherWatchHoldsIt: Bool) async throws {
        let log = Log()
        let layer: any ChannelLayer = onRedis ? try TestRedis.layer() : InMemoryChannelLayer()
        let otherHarness = Mutex<TestHarness?>(nil)
        let replyChannel = Mutex("")
        // Right after this worker parks 2, the other worker runs 1 (and then 2, which it finds parked).
        let parking = FreezeAfterParkLayer(base: layer) {
            guard let other = otherHarness.withLock({ $0 }) else { return }
            _ = try? await other.send(self.message(replyChannel.withLock { $0 }, order: 1), to: "websocket.receive", runPending: false)
        }
        let (other, worker) = try Self.twoWorkers(log: log, on: layer, parkingThrough: parking)
        otherHarness.withLock { $0 = other }
        let reply = try await other.newReplyChannel()
        replyChannel.withLock { $0 = reply }
        let shared = Self.sharedWaitChannel(other, reply: reply)
        let leases = try #require(layer.leases)
        try await other.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        let elsewhere = OrderingSweeper.note(next: 1, holder: "a-watch-elsewhere")
        if anotherWatchHoldsIt {
            try await leases.holdLease(shared, in: OrderingSweeper.pool, note: elsewhere, for: .milliseconds(1500))
        }
        try await worker.send(message(reply, order: 2), to: "websocket.receive", runPending: false)
        try await Self.waitFor(log, count: 3)
        #expect(await log.entries == ["0", "1", "2"])
        #expect(!worker.environment.orderingGaps.isWatched(shared), "no watch: nothing waited")
        // Past the park's lease (2.6 s for this gap timeout) and the other's (1.5 s).
        try await Task.sleep(for: .milliseconds(2900))
        let lapsed = try await leases.claimLapsedLeases(in: OrderingSweeper.pool, max: 10, for: .seconds(1))
        if anotherWatchHoldsIt {
            #expect(lapsed.map(\.name) == [shared] && lapsed.first?.note == elsewhere, "the other watch's lease is left: \(lapsed)")
        } else {
            #expect(lapsed.isEmpty, "the park's lease went with its turn: \(lapsed)")
        }
        await layer.close()
    }

    /// A watch that found nothing waiting ends, unless this process parked since that look
    /// began: a message parked meanwhile saw the watch and started none, so the watch looks
    /// once more and goes on. Here 4 parks (3 lost) inside the watch's last look, after the
    /// layer counted nothing: it still runs once 3 is skipped. Without the second look, 4 waited
    /// with no watch and no lease until the socket sent again.
    @Test func aParkDuringAWatchsLastLookKeepsTheWatchGoing() async throws {
        let log = Log()
        let layer = LookHookLayer()
        let harness = try TestHarness(
            Self.routing(log: log), layer: layer, environment: ConsumerEnvironment(orderingGapTimeout: .milliseconds(300)))
        let reply = try await harness.newReplyChannel()
        let shared = Self.sharedWaitChannel(harness, reply: reply)
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        let parked = Mutex(false)
        layer.arm(shared) {
            // Inside the look that found nothing: the message parks, and the watch, still on,
            // is the one that must see it.
            _ = try? await harness.send(self.message(reply, order: 4), to: "websocket.receive", runPending: false)
            parked.withLock { $0 = true }
        }
        // 1 lost: 2 parks, the watch skips 1 and runs 2, then looks at what waits after 3.
        try await harness.send(message(reply, order: 2), to: "websocket.receive")
        try await Self.waitFor(log, count: 3)
        #expect(parked.withLock { $0 }, "the hook ran inside the watch's look")
        #expect(await log.entries == ["0", "2", "4"], "4, parked during the watch's last look, ran")
        #expect(harness.environment.orderingGaps.skipped == 2)
    }

    /// A watch that ends releases its lease only if the note is still its own: another watch
    /// of the socket (in another process) that took the lease just before leaves with it, so
    /// a sweeper still finds it if that process dies. Without the mark, the ending watch
    /// removed the other's lease.
    @Test func anEndingWatchLeavesALeaseAnotherWatchTook() async throws {
        let log = Log()
        let layer = LookHookLayer()
        let timeout = Duration.seconds(2)
        let harness = try TestHarness(Self.routing(log: log), layer: layer, environment: ConsumerEnvironment(orderingGapTimeout: timeout))
        let leases = try #require(harness.layer.leases)
        let reply = try await harness.newReplyChannel()
        let shared = Self.sharedWaitChannel(harness, reply: reply)
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        let other = OrderingSweeper.note(next: 3, holder: "another-process")
        layer.arm(shared) {
            // Another process's watch takes the lease as this one finds nothing waiting.
            try? await leases.holdLease(shared, in: OrderingSweeper.pool, note: other, for: .milliseconds(1500))
        }
        try await harness.send(message(reply, order: 2), to: "websocket.receive")
        try await Self.waitFor(log, count: 2)
        #expect(await log.entries == ["0", "2"])
        // The watch ends (bounded), then the other's lease lapses and a sweep finds it.
        let ended = ContinuousClock.now + .seconds(20)
        while harness.environment.orderingGaps.isWatched(shared), ContinuousClock.now < ended {
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(!harness.environment.orderingGaps.isWatched(shared))
        try await Task.sleep(for: .milliseconds(1700))
        let lapsed = try await leases.claimLapsedLeases(in: OrderingSweeper.pool, max: 10, for: .seconds(1))
        #expect(lapsed.map(\.name) == [shared] && lapsed.first?.note == other, "the other watch's lease was left: \(lapsed)")
    }

    /// A parked message of a process channel (`!`) is not sent back: that process may be the
    /// one that died, and a live one would get it outside the routing it came through. It waits
    /// where it was parked, and the sweeper keeps the lease claimed (looked at again later).
    @Test func aParkedMessageOfAProcessChannelIsNotSentBack() async throws {
        let harness = try TestHarness(
            Self.routing(log: Log()), environment: ConsumerEnvironment(orderingGapTimeout: .milliseconds(300)))
        let reply = try await harness.newReplyChannel()
        let shared = Self.sharedWaitChannel(harness, reply: reply)
        let parked = ParkedMessage(channel: "worker.proc!abc", content: message(reply, order: 2), order: 2)
        try await harness.layer.send(parked.message, to: shared + ".2")
        let leases = try #require(harness.layer.leases)
        try await leases.holdLease(
            shared, in: OrderingSweeper.pool, note: OrderingSweeper.note(next: 1, holder: "dead"), for: .milliseconds(1))
        try await Task.sleep(for: .milliseconds(20))
        let sweeper = OrderingSweeper(layer: harness.layer, environment: harness.environment, logger: Logger(label: "test"))
        #expect(await sweeper.sweep() == 0, "nothing resumed")
        #expect(try await harness.layer.messagesPending(in: [shared + ".2"]) == [1], "it waits where it was parked")
        #expect(try await harness.layer.receive(channels: ["worker.proc!"], timeout: .zero) == nil, "nothing sent to the process channel")
        #expect(
            try await leases.claimLapsedLeases(in: OrderingSweeper.pool, max: 10, for: .seconds(1)).isEmpty, "the sweeper holds the claim")
    }

    /// A watch whose look runs a long consumer (drains run them inline) keeps its lease: it is
    /// renewed on a beat of its own, not only at each look, so no sweeper takes the socket over
    /// (and a message out from under the live watch) while it runs.
    @Test func aWatchBusyWithALongConsumerKeepsItsLease() async throws {
        let log = Log()
        let harness = try TestHarness(
            [
                route(
                    "websocket.receive",
                    enforceOrdering { context in
                        let order = try context.message.int("order")
                        if order == 2 { try await Task.sleep(for: .milliseconds(3_500)) }
                        await log.add("\(order)")
                    })
            ], environment: ConsumerEnvironment(orderingGapTimeout: .milliseconds(300)))
        let reply = try await harness.newReplyChannel()
        let shared = Self.sharedWaitChannel(harness, reply: reply)
        let leases = try #require(harness.layer.leases)
        // 0 and 1 lost: 2 parks, its watch skips the gap after 300 ms and runs it (3.5 s).
        try await harness.send(message(reply, order: 2), to: "websocket.receive")
        let start = ContinuousClock.now
        // Past the lease's 2.6 s from the look that began the long run.
        try await Task.sleep(until: start + .milliseconds(3_100))
        #expect(await log.entries.isEmpty, "still running")
        let lapsed = try await leases.claimLapsedLeases(in: OrderingSweeper.pool, max: 10, for: .seconds(60))
        #expect(!lapsed.contains { $0.name == shared }, "the live watch's lease lapsed")
        try await Self.waitFor(log, count: 1)
        #expect(await log.entries == ["2"])
    }

    /// The gap watch's look fails (the session store is unreachable: a Redis failing over, this
    /// process frozen): it looks again after the pause instead of ending, so the message parked
    /// behind the gap still runs once the store answers. When the watch ended on a failed read,
    /// the parked message waited for the socket's next frame.
    @Test func aGapWatchWhoseLookFailsLooksAgain() async throws {
        let log = Log()
        let store = RefusingSessionStore()
        let harness = try TestHarness(
            Self.routing(log: log), environment: ConsumerEnvironment(sessionStore: store, orderingGapTimeout: .milliseconds(300)))
        let reply = try await harness.newReplyChannel()
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        // 1 lost; 2 parks and its watch looks after 400 ms, while the store refuses.
        try await harness.send(message(reply, order: 2), to: "websocket.receive")
        store.refusing.store(true, ordering: .relaxed)
        // Until the watch has looked (and been refused); bounded, as a loaded machine runs late.
        let deadline = ContinuousClock.now + .seconds(20)
        while store.refused.load(ordering: .relaxed) == 0, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(store.refused.load(ordering: .relaxed) > 0, "the watch looked while the store refused")
        store.refusing.store(false, ordering: .relaxed)
        try await Self.waitFor(log, count: 2)
        #expect(await log.entries == ["0", "2"])
        #expect(harness.environment.orderingGaps.skipped == 1)
    }

    /// A message that parks while a skip (or a turn) moves the order past it: its gate read
    /// the order before the move (here: a load that answers with the state as it was), parks,
    /// then reads it again, finds it passed, and takes the message back, dropped as late and
    /// counted, instead of leaving it parked where nobody takes it until it expires.
    @Test func aMessageParkedAsTheOrderPassesItIsTakenBack() async throws {
        let log = Log()
        let store = RefusingSessionStore()
        let harness = try TestHarness(
            Self.routing(log: log), environment: ConsumerEnvironment(sessionStore: store, orderingGapTimeout: .seconds(30)))
        let reply = try await harness.newReplyChannel()
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        let key = Session.storageKey(
            Session.channelSessionKey(replyChannel: reply, secret: harness.environment.sessionConfiguration.secret))
        let asAtOne = try #require(try await store.base.load(key))
        try await harness.send(message(reply, order: 1), to: "websocket.receive")
        try await harness.send(message(reply, order: 2), to: "websocket.receive")
        #expect(await log.entries == ["0", "1", "2"])
        // A copy of 2 whose gate reads the order as it was before 1 and 2 ran (next 1).
        store.staleOnce.withLock { $0 = (key, asAtOne) }
        try await harness.send(message(reply, order: 2), to: "websocket.receive")
        let shared = Self.sharedWaitChannel(harness, reply: reply)
        #expect(try await harness.layer.messagesPending(in: [shared + ".2", shared]) == [0, 0], "taken back, not left parked")
        #expect(await log.entries == ["0", "1", "2"], "and not run twice")
    }

    /// A disconnect that came too far ahead waits on the shared channel; when its turn comes
    /// (the frames before it arrived and ran) it runs, with the socket's cleanup: it was taken
    /// with the others and dropped as "older than the next order", being equal to it.
    @Test func aFarAheadDisconnectRunsWhenItsTurnComes() async throws {
        let log = Log()
        let layer = InMemoryChannelLayer(configuration: .init(channelCapacities: [("__wait__.*", 2)]))
        let harness = try TestHarness(
            Self.routing(log: log), layer: layer, environment: ConsumerEnvironment(orderingGapTimeout: .milliseconds(300)))
        let reply = try await harness.newReplyChannel()
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        try await harness.send(message(reply, order: 1), to: "websocket.receive")
        try await harness.send(message(reply, order: 2), to: "websocket.receive")
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 5, "code": 1000], to: "websocket.disconnect")
        try await harness.send(message(reply, order: 3), to: "websocket.receive")
        try await harness.send(message(reply, order: 4), to: "websocket.receive")
        try await Self.waitFor(log, count: 6)
        #expect(await log.entries == ["0", "1", "2", "3", "4", "disconnect 5"])
        #expect(harness.environment.orderingGaps.skipped == 0, "nothing was lost")
    }

    /// Senders that share one hand-off key at the same moment (consumers of different sockets
    /// posting to one room's sequence) each get a number of their own: a lost race re-reads
    /// the counter instead of writing the same number again, so none is dropped as a duplicate.
    @Test func concurrentOrderedSendsWithOneKeyAreAllNumbered() async throws {
        let log = Log()
        let layer = InMemoryChannelLayer()
        let worker = Worker(
            router: try Router([
                route("post") { context in
                    try await Channel("stage").send(["text": context.message["text"] ?? .null], orderedBy: "room-1")
                },
                route("stage", inSendOrder { context in await log.add(try context.message.string("text")) }),
            ]), layer: layer, concurrency: 8, environment: ConsumerEnvironment())
        let task = Task { await worker.run() }
        for index in 0..<40 { try await layer.send(["text": .string("m\(index)")], to: "post") }
        let deadline = ContinuousClock.now + .seconds(20)
        while await log.entries.count < 40, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(20)) }
        let entries = await log.entries
        #expect(entries.count == 40 && Set(entries).count == 40, "every post ran once: \(entries.count) of 40")
        worker.stop()
        await task.value
    }

    @Test func twoWorkersOnRedisProcessMessagesInOrder() async throws {
        let prefix = "t" + ChannelNames.randomLetters(8) + ":"
        let sessionPrefix = String(prefix.dropLast()) + "-session:"
        let log = Log()
        // Two workers, each with its own layer and session store connections, as two processes would have.
        var workers: [Worker] = []
        var layers: [RedisChannelLayer] = []
        // One deployment: one secret (channel-session keys are keyed with it).
        let settings = SessionConfiguration()
        for _ in 0..<2 {
            let layer = try TestRedis.layer(prefix: prefix)
            layers.append(layer)
            workers.append(
                Worker(
                    router: try Router(Self.routing(log: log)), layer: layer, concurrency: 2,
                    environment: ConsumerEnvironment(
                        sessionStore: try TestRedis.sessionStore(prefix: sessionPrefix), sessionConfiguration: settings)))
        }
        let tasks = workers.map { worker in Task { await worker.run() } }
        let sender = layers[0]
        for round in 0..<5 {
            let reply = try await sender.newChannel("test.reply?")
            try await sender.send(message(reply, order: 2), to: "websocket.receive")
            try await sender.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
            try await sender.send(message(reply, order: 1), to: "websocket.receive")
            var replies: [Message] = []
            while replies.count < 3, let next = try await sender.receive(channels: [reply], timeout: .seconds(10)) {
                replies.append(next.message)
            }
            #expect(replies == [["accept": true], ["text": "1"], ["text": "2"]], "round \(round)")
        }
        #expect(await log.entries == Array(repeating: ["0", "1", "2"], count: 5).flatMap { $0 })
        for worker in workers { worker.stop() }
        for task in tasks { await task.value }
        for layer in layers { await layer.close() }
    }

    /// A held copy's claim that loses its race to another write of the socket's session (not a
    /// copy of its order: a renewal, say) reads the session again and runs: before, it was
    /// dropped as a second copy, and the only copy of the message was lost.
    @Test func aHeldCopysClaimThatLosesARaceToAnotherWriteStillRuns() async throws {
        let log = Log()
        let store = StaleLoadSessionStore()
        var environment = ConsumerEnvironment(sessionStore: store, orderingGapTimeout: .seconds(4))
        environment.resentGrace = .milliseconds(300)
        let harness = try TestHarness(Self.routing(log: log), environment: environment)
        let reply = try await harness.newReplyChannel()
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        let sessionKey = Session.channelSessionKey(replyChannel: reply, secret: environment.sessionConfiguration.secret)
        let storageKey = Session.storageKey(sessionKey)
        let before = try #require(try await store.base.load(storageKey))
        // Another write of the session; the claim's read (the third read of the session: the
        // marked copy's wrapper's, the held copy's wrapper's, the claim's) gets the bytes from
        // before it, and its save loses the race.
        let other = try await Session.load(key: sessionKey, store: store.base, settings: environment.sessionConfiguration)
        other["renewed"] = .int(1)
        try await other.save()
        store.stale.withLock { $0 = (storageKey, before, 3) }
        try await harness.send(message(reply, order: 1).markedResent(), to: "websocket.receive")
        try await Self.waitFor(log, count: 2)
        #expect(await log.entries == ["0", "1"], "the only copy ran")
        #expect(store.stale.withLock { $0 == nil }, "the claim read the bytes from before")
    }

    /// A worker told to stop while it holds a copy back for its grace runs that copy before it
    /// returns (before, the process exited with it in memory: the socket waited a gap timeout
    /// and the message was skipped as lost).
    @Test func aStoppingWorkerRunsTheCopyItHoldsBackFirst() async throws {
        let log = Log()
        var environment = ConsumerEnvironment(orderingGapTimeout: .seconds(4))
        environment.resentGrace = .milliseconds(800)
        let layer = InMemoryChannelLayer()
        let worker = Worker(router: try Router(Self.routing(log: log)), layer: layer, environment: environment)
        let running = Task { await worker.run() }
        let reply = try await layer.newChannel("test.reply?")
        try await layer.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        #expect(try await layer.receive(channels: [reply], timeout: .seconds(10))?.message == ["accept": true])
        try await layer.send(message(reply, order: 1).markedResent(), to: "websocket.receive")
        let deadline = ContinuousClock.now + .seconds(10)
        while environment.orderingGaps.heldBack.count == 0, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(10))
        }
        #expect(environment.orderingGaps.heldBack.count == 1, "the copy is held back")
        worker.stop()
        await running.value
        #expect(await log.entries == ["0", "1"], "it ran before the worker stopped")
        #expect(try await layer.receive(channels: [reply], timeout: .seconds(1))?.message == ["text": "1"])
    }

    /// A send tried again after its connection to the layer was lost may have been stored by
    /// its first try too (Redis SIGKILLed between its append-only file and its reply; a proxy
    /// that cuts the connection): two copies of one order, the second marked `__resent`. Taken
    /// by two workers at once, both copies read the same stored order (it moves only when a
    /// turn ends) and both ran the consumer: one text delivered twice to a whole room in the
    /// Redis-restart e2e. Now the marked copy waits `resentGrace` and is dropped as late; when
    /// it is the only copy (the first try was not stored) it runs after the grace; two marked
    /// copies (the second try lost its reply too) come back together and one takes the turn.
    /// Both ordering wrappers: a socket's frames and an ordered hand-off's messages.
    @Test(arguments: [(true, 1), (false, 1), (false, 2), (true, 2)], [false, true])
    func aMessageStoredTwiceByARetriedSendRunsOnce(copies: (firstCopyStored: Bool, resent: Int), handOff: Bool) async throws {
        let log = Log()
        var environment = ConsumerEnvironment(orderingGapTimeout: .seconds(4))
        environment.resentGrace = .milliseconds(600)
        // Slow enough that the two copies' turns overlap.
        let consumer: Consumer = { context in
            try await Task.sleep(for: .milliseconds(300))
            await log.add(try context.message.string("text"))
        }
        let routing: [RoutingEntry] = [
            route("websocket.connect", enforceOrdering { try await $0.accept() }),
            route("websocket.receive", enforceOrdering(consumer)),
            route("handoff", inSendOrder(consumer)),
        ]
        let layer = InMemoryChannelLayer()
        let (one, two) = (
            try TestHarness(routing, layer: layer, environment: environment),
            try TestHarness(routing, layer: layer, environment: environment)
        )
        let reply = try await one.newReplyChannel()
        try await one.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        func copy(_ order: Int64) -> ReceivedMessage {
            if handOff {
                let stamp = OrderStamp(key: "k", order: order - 1, epoch: "e")
                return ReceivedMessage(channel: "handoff", message: stamp.stamped(["text": .string("\(order)")]))
            }
            return ReceivedMessage(channel: "websocket.receive", message: message(reply, order: order))
        }
        let first = copy(1)
        let resent = ReceivedMessage(channel: first.channel, message: first.message.markedResent())
        let three = try TestHarness(routing, layer: layer, environment: environment)
        async let a: Void = copies.firstCopyStored ? one.worker.dispatch(first) : ()
        async let b: Void = two.worker.dispatch(resent)
        async let c: Void = copies.resent > 1 ? three.worker.dispatch(resent) : ()
        _ = await (a, b, c)
        // The held-back copy comes back after its grace and is dropped or run: a margin past it.
        let deadline = ContinuousClock.now + .seconds(10)
        while await log.entries.isEmpty, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(20)) }
        try await Task.sleep(for: .milliseconds(1_500))
        #expect(await log.entries == ["1"], "the message ran once")
        // The sequence goes on.
        await one.worker.dispatch(copy(2))
        #expect(await log.entries == ["1", "2"])
        #expect(environment.orderingGaps.skipped == 0, "nothing skipped as lost")
    }
}

@Suite("consume later", .timeLimit(.minutes(2)))
struct ConsumeLaterTests {
    @Test func retriedThenDroppedAfterTen() async throws {
        let log = Log()
        let harness = try TestHarness([
            route(
                "jobs",
                { context in
                    let retries = context.message[Worker.retryKey]?.intValue ?? 0
                    await log.add("\(retries)")
                    if try context.message.string("job") == "flaky" && retries < 3 { throw ConsumerError.consumeLater }
                    if try context.message.string("job") == "never" { throw ConsumerError.consumeLater }
                })
        ])
        try await harness.send(["job": "flaky"], to: "jobs")
        #expect(await log.entries == ["0", "1", "2", "3"], "put back until it succeeds")
        #expect(harness.worker.messagesDroppedAfterRetries == 0)
        try await harness.send(["job": "never"], to: "jobs")
        #expect(await log.entries.count == 4 + 11, "the first try and ten retries")
        #expect(harness.worker.messagesDroppedAfterRetries == 1)
    }
}

/// A session store that refuses loads while `refusing` is set (counted), or answers one
/// load with bytes from before.
final class RefusingSessionStore: SessionStore {
    let base = InMemorySessionStore()
    let refusing = Atomic<Bool>(false)
    let refused = Atomic<Int>(0)
    /// The next load of this key answers with these bytes (a read from before a change).
    let staleOnce = Mutex<(key: String, data: [UInt8])?>(nil)

    func load(_ key: String) async throws -> [UInt8]? {
        let stale: [UInt8]? = staleOnce.withLock { stale in
            guard let pending = stale, pending.key == key else { return nil }
            stale = nil
            return pending.data
        }
        if let stale { return stale }
        if refusing.load(ordering: .relaxed) {
            refused.add(1, ordering: .relaxed)
            throw ChannelLayerError(.connectionLost, "the store is unreachable (test)")
        }
        return try await base.load(key)
    }

    func store(_ key: String, data: [UInt8], expected: [UInt8]?, ttl: Duration) async throws -> Bool {
        try await base.store(key, data: data, expected: expected, ttl: ttl)
    }

    func delete(_ key: String) async throws { try await base.delete(key) }
}

/// Runs `afterPark` in the task that parks a message on a wait channel, right after the park
/// (by default it freezes that task for good, until cancelled: a worker that died there).
final class FreezeAfterParkLayer: ForwardingChannelLayer {
    let base: any ChannelLayer
    let froze = Mutex(false)
    let afterPark: @Sendable () async -> Void

    init(base: any ChannelLayer, afterPark: @escaping @Sendable () async -> Void = { try? await Task.sleep(for: .seconds(3600)) }) {
        self.base = base
        self.afterPark = afterPark
    }

    func send(_ message: Message, to channel: String) async throws(ChannelLayerError) {
        try await base.send(message, to: channel)
        guard channel.hasPrefix(CapacityTable.waitChannelPrefix) else { return }
        froze.withLock { $0 = true }
        await afterPark()
    }
}

/// An in-memory layer that runs a hook (once) inside the first look at a socket's wait
/// channels that finds nothing waiting: after the count, before the looker sees it.
final class LookHookLayer: ForwardingChannelLayer, ChannelLayerPendingCounts {
    let base: any ChannelLayer = InMemoryChannelLayer()
    private let hook = Mutex<(channel: String, run: @Sendable () async -> Void)?>(nil)

    func arm(_ sharedWaitChannel: String, _ run: @escaping @Sendable () async -> Void) {
        hook.withLock { $0 = (sharedWaitChannel, run) }
    }

    func pendingCounts(_ channels: [String]) async throws(ChannelLayerError) -> [Int] {
        let counts = try await base.messagesPending(in: channels)
        guard counts.allSatisfy({ $0 == 0 }), let first = channels.first else { return counts }
        let run = hook.withLock { armed -> (@Sendable () async -> Void)? in
            guard let current = armed, current.channel == first else { return nil }
            armed = nil
            return current.run
        }
        if let run { await run() }
        return counts
    }
}

/// A session store whose `n`th load of one key (armed in `stale`) answers with bytes from
/// before a change: the save that follows loses its race.
final class StaleLoadSessionStore: SessionStore {
    let base = InMemorySessionStore()
    let stale = Mutex<(key: String, data: [UInt8], countdown: Int)?>(nil)

    func load(_ key: String) async throws -> [UInt8]? {
        let answer: [UInt8]? = stale.withLock { stale in
            guard var pending = stale, pending.key == key else { return nil }
            pending.countdown -= 1
            guard pending.countdown == 0 else {
                stale = pending
                return nil
            }
            stale = nil
            return pending.data
        }
        if let answer { return answer }
        return try await base.load(key)
    }

    func store(_ key: String, data: [UInt8], expected: [UInt8]?, ttl: Duration) async throws -> Bool {
        try await base.store(key, data: data, expected: expected, ttl: ttl)
    }

    func delete(_ key: String) async throws { try await base.delete(key) }
}
