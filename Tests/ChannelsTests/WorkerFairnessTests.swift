import ASGI
import RedisChannelLayer
import Synchronization
import TestSupport
import Testing

@testable import Channels

/// A socket whose consumer hangs holds one worker slot, not one per frame it sent meanwhile:
/// everyone else's frames keep being served.
@Suite("worker fairness", .timeLimit(.minutes(1)))
struct WorkerFairnessTests {
    @Test func aHungSocketsQueuedFramesDoNotTakeTheWorkersSlots() async throws {
        let layer = InMemoryChannelLayer(configuration: .init(capacity: 10_000))
        let served = Counter()
        let release = Gate()
        let worker = Worker(
            router: try Router([
                route(
                    "websocket.receive",
                    { context in
                        if context.message.replyChannel == "hung!" {
                            await release.wait()
                        } else {
                            served.add()
                        }
                    })
            ]), layer: layer, concurrency: 2)
        let running = Task { await worker.run() }
        // The hung socket sends 20 frames first (each would take a slot while it waits behind
        // the first), then 50 other sockets send 2 frames each.
        for order in 1...20 {
            try await layer.send(["reply_channel": "hung!", "path": "/", "order": .int(Int64(order))], to: "websocket.receive")
        }
        for socket in 0..<50 {
            for order in 1...2 {
                try await layer.send(
                    ["reply_channel": .string("s\(socket)!"), "path": "/", "order": .int(Int64(order))], to: "websocket.receive")
            }
        }
        var waited = 0
        while served.value < 100, waited < 1000 {
            try await Task.sleep(for: .milliseconds(10))
            waited += 1
        }
        #expect(served.value == 100, "the other sockets got \(served.value) of 100 frames served while one socket hung")
        release.open()
        worker.stop()
        await running.value
    }

    /// The chat example's pipeline under a flood: one socket's frames each wait for room in a
    /// channel that the same worker drains. The frames queued behind the waiting one hold slots
    /// (past the mailbox's free share), yet the drained channel keeps a slot of its own, so the
    /// flood moves instead of wedging the worker until timeouts drop messages.
    @Test func aFloodWaitingOnAnotherChannelLeavesThatChannelASlot() async throws {
        let layer = InMemoryChannelLayer(configuration: .init(capacity: 10_000))
        let served = Counter()
        let staged = Gate()
        let worker = Worker(
            router: try Router([
                route(
                    "websocket.receive",
                    { _ in
                        await staged.wait()
                        served.add()
                    }),
                route("stage", { _ in staged.open() }),
            ]), layer: layer, concurrency: 4, consumerTimeout: nil)
        let running = Task { await worker.run() }
        let frames = Mailboxes.freeWaiting + 40
        try await flood(layer, frames: frames)
        try await layer.send(["go": true], to: "stage")
        var waited = 0
        while served.value < frames, waited < 1000 {
            try await Task.sleep(for: .milliseconds(10))
            waited += 1
        }
        #expect(served.value == frames, "\(served.value) of \(frames) frames served; the stage never got a slot")
        worker.stop()
        staged.open()
        await running.value
    }

    /// One socket's `frames` frames, and the wait (bounded) until the worker has taken them all.
    private func flood(_ layer: InMemoryChannelLayer, frames: Int) async throws {
        for order in 1...frames {
            try await layer.send(["reply_channel": "flood!", "path": "/", "order": .int(Int64(order))], to: "websocket.receive")
        }
        var waited = 0
        while try await layer.channelStatistics("websocket.receive").messagesPending > 0, waited < 500 {
            try await Task.sleep(for: .milliseconds(10))
            waited += 1
        }
    }

    /// The same wedge held on: while the flood's slots stay taken, the stage it waits for still
    /// runs at its own pace on the reserved slot (not one message per back-off pause).
    @Test func aChannelOnTheReservedSlotKeepsItsPace() async throws {
        let layer = InMemoryChannelLayer(configuration: .init(capacity: 10_000))
        let staged = Counter()
        let hold = Gate()
        let worker = Worker(
            router: try Router([
                route("websocket.receive", { _ in await hold.wait() }),
                route("stage", { _ in staged.add() }),
            ]), layer: layer, concurrency: 4, consumerTimeout: nil)
        let running = Task { await worker.run() }
        try await flood(layer, frames: Mailboxes.freeWaiting + 40)
        var waited = 0
        // Past the back-off's longest pause (0.5 s) a few times over: 200 stage messages.
        for n in 0..<200 { try await layer.send(["n": .int(Int64(n))], to: "stage") }
        waited = 0
        while staged.value < 200, waited < 500 {
            try await Task.sleep(for: .milliseconds(10))
            waited += 1
        }
        #expect(staged.value == 200, "\(staged.value) of 200 stage messages in 5 s beside a wedged flood")
        worker.stop()
        hold.open()
        await running.value
    }

    /// A consumer that never returns for one socket while 50 others chat through 2 workers on
    /// Redis: every other frame is served, the hung one is cancelled at the timeout and counted,
    /// and the hung socket's later frames run after it, in order.
    @Test func aHungConsumerIsCancelledAtItsTimeoutAndNobodyElseWaits() async throws {
        let layer = try TestRedis.layer(capacity: 10_000)
        let served = Counter()
        let hungSocketLater = Log()
        let routing = try Router([
            route(
                "websocket.receive",
                { context in
                    let order = context.message["order"]?.intValue ?? 0
                    if context.message.replyChannel == "hung!" {
                        if order == 1 { try await Task.sleep(for: .seconds(3600)) }
                        await hungSocketLater.add("\(order)")
                    } else {
                        served.add()
                    }
                })
        ])
        let workers = (0..<2).map { _ in
            Worker(router: routing, layer: layer, concurrency: 4, consumerTimeout: .milliseconds(500))
        }
        let running = workers.map { worker in Task { await worker.run() } }
        for order in 1...5 {
            try await layer.send(["reply_channel": "hung!", "path": "/", "order": .int(Int64(order))], to: "websocket.receive")
        }
        for round in 1...4 {
            for socket in 0..<50 {
                try await layer.send(
                    ["reply_channel": .string("s\(socket)!"), "path": "/", "order": .int(Int64(round))], to: "websocket.receive")
            }
        }
        var waited = 0
        while (served.value < 200 || workers.map(\.consumersTimedOut).reduce(0, +) < 1), waited < 1000 {
            try await Task.sleep(for: .milliseconds(10))
            waited += 1
        }
        #expect(served.value == 200, "the other sockets got \(served.value) of 200 frames served")
        #expect(workers.map(\.consumersTimedOut).reduce(0, +) == 1)
        // The hung socket's frames after the first ran, in order, on whichever worker took them
        // (both workers may have taken some: each worker keeps its own frames in order).
        waited = 0
        while await hungSocketLater.entries.count < 4, waited < 500 {
            try await Task.sleep(for: .milliseconds(10))
            waited += 1
        }
        #expect(Set(await hungSocketLater.entries) == ["2", "3", "4", "5"])
        for worker in workers { worker.stop() }
        for task in running { await task.value }
    }

    /// A consumer that ignores its cancellation (it waits on a continuation nothing cancels)
    /// gets it at --consumer-timeout, and `abandonAfter` later its slot is given back: with one
    /// slot, every other message is served while it still hangs. A plain channel and a socket.
    @Test(arguments: ["work", "websocket.receive"])
    func aConsumerThatIgnoresItsCancellationGivesItsSlotBack(channel: String) async throws {
        let layer = InMemoryChannelLayer(configuration: .init(capacity: 10_000))
        let served = Counter()
        let hung = Gate()
        let hungLater = Log()
        let worker = Worker(
            router: try Router([
                route(
                    channel,
                    { context in
                        let order = context.message["order"]?.intValue ?? 0
                        guard context.message.replyChannel == "hung!" else { return served.add() }
                        if order == 1 { await hung.wait() } else { await hungLater.add("\(order)") }
                    })
            ]), layer: layer, concurrency: 1, consumerTimeout: .milliseconds(300), abandonAfter: .milliseconds(300))
        let running = Task { await worker.run() }
        for order in 1...3 {
            try await layer.send(["reply_channel": "hung!", "path": "/", "order": .int(Int64(order))], to: channel)
        }
        for other in 0..<10 {
            try await layer.send(["reply_channel": .string("s\(other)!"), "path": "/", "order": 1], to: channel)
        }
        var waited = 0
        while served.value < 10, waited < 1000 {
            try await Task.sleep(for: .milliseconds(10))
            waited += 1
        }
        #expect(served.value == 10, "\(served.value) of 10 other messages served while one consumer ignored its cancellation")
        #expect(worker.consumersTimedOut == 1)
        #expect(worker.consumersAbandoned == 1)
        // It returns at last: the socket's later frames run after it, in order, and the worker
        // still serves (its slot count is whole again).
        hung.open()
        if channel == "websocket.receive" {
            waited = 0
            while await hungLater.entries.count < 2, waited < 500 {
                try await Task.sleep(for: .milliseconds(10))
                waited += 1
            }
            #expect(await hungLater.entries == ["2", "3"])
        }
        for other in 10..<20 {
            try await layer.send(["reply_channel": .string("s\(other)!"), "path": "/", "order": 1], to: channel)
        }
        waited = 0
        while served.value < 20, waited < 500 {
            try await Task.sleep(for: .milliseconds(10))
            waited += 1
        }
        #expect(served.value == 20)
        worker.stop()
        await running.value
    }

    /// A worker told to finish what is queued and stop while a socket's consumer ignores its
    /// cancellation (its slot given back): when that consumer returns at last, the socket's
    /// queued frames (a `websocket.disconnect`, say) still run before the worker ends.
    @Test func aDrainWaitsForTheFramesBehindAnAbandonedConsumer() async throws {
        let layer = InMemoryChannelLayer(configuration: .init(capacity: 10_000))
        let hung = Gate()
        let hungLater = Log()
        let worker = Worker(
            router: try Router([
                route(
                    "websocket.receive",
                    { context in
                        let order = context.message["order"]?.intValue ?? 0
                        if order == 1 { await hung.wait() } else { await hungLater.add("\(order)") }
                    })
            ]), layer: layer, concurrency: 1, consumerTimeout: .milliseconds(200), abandonAfter: .milliseconds(200))
        let running = Task { await worker.run() }
        for order in 1...3 {
            try await layer.send(["reply_channel": "hung!", "path": "/", "order": .int(Int64(order))], to: "websocket.receive")
        }
        var waited = 0
        while worker.consumersAbandoned < 1, waited < 500 {
            try await Task.sleep(for: .milliseconds(10))
            waited += 1
        }
        #expect(worker.consumersAbandoned == 1)
        worker.finishQueuedThenStop()
        try await Task.sleep(for: .milliseconds(300))
        hung.open()
        await running.value
        #expect(await hungLater.entries == ["2", "3"], "the frames queued behind the abandoned consumer did not run")
    }

    /// A lent slot: the receive loop can use it; the lender gets one back before the receive
    /// loop does; a lender cancelled while it waits takes none; a lease given back while lent
    /// (the watchdog) frees nothing twice.
    @Test func aLentSlotComesBackFirstToItsLender() async throws {
        let slots = Slots(1)
        let work = ReceivedMessage(channel: "work", message: [:])
        slots.take([work])
        let lease = SlotLease(channel: "work", slots: slots)
        lease.lend()
        #expect(slots.freeCount == 1)
        slots.take([work])  // the receive loop runs another message on it
        let back = Task { try await lease.reclaim() }
        try await Task.sleep(for: .milliseconds(50))
        #expect(slots.freeCount == 0, "the lender waits while the slot is used")
        slots.release("work")  // the other message finished: the lender gets the slot, not the loop
        try await back.value
        #expect(slots.freeCount == 0)
        lease.giveBack()
        #expect(slots.freeCount == 1)

        // Cancelled while waiting: no slot taken, none lost.
        slots.take([work])
        let other = SlotLease(channel: "work", slots: slots)
        other.lend()
        slots.take([work])
        let waiting = Task { try await other.reclaim() }
        try await Task.sleep(for: .milliseconds(50))
        waiting.cancel()
        await #expect(throws: CancellationError.self) { try await waiting.value }
        other.giveBack()  // lent, so nothing more is released
        slots.release("work")
        #expect(slots.freeCount == 1, "every slot is back exactly once")
        #expect(slots.lentCount == 0)

        // No more lent than there are slots: a second lender keeps its slot.
        slots.take([work])
        let first = SlotLease(channel: "work", slots: slots)
        first.lend()
        slots.take([work])
        let second = SlotLease(channel: "work", slots: slots)
        second.lend()
        #expect(slots.lentCount == 1 && slots.freeCount == 0, "the second lender kept its slot")
        second.giveBack()
        first.giveBack()
        #expect(slots.lentCount == 0 && slots.freeCount == 1)
    }
}
