import ASGI
import Logging
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import InterfaceServer

/// The line for a full channel: one sender probes it, the others wait; every send that gets
/// through lets the next two go, a prober that stops lets the next one go, first come first
/// served; a sender in line gives up at its deadline or when cancelled.
@Suite("full channels: one prober, the rest in line", .timeLimit(.minutes(1)))
struct FullChannelsTests {
    final class Turns: Sendable {
        let order = Mutex<[Int]>([])
        var all: [Int] { order.withLock { $0 } }
        func add(_ n: Int) { order.withLock { $0.append(n) } }
    }

    /// Starts `count` senders in line for `channel`, one at a time (each in line before the
    /// next starts); each notes its number when its turn comes (or -n when it gave up).
    func line(
        _ channels: FullChannels, _ channel: String, count: Int, deadline: NIODeadline, loop: any EventLoop, turns: Turns
    ) async -> [Task<Void, Never>] {
        var tasks: [Task<Void, Never>] = []
        let base = channels.waiting(channel)
        for n in 1...count {
            tasks.append(
                Task {
                    let turn = await channels.waitTurn(channel, until: deadline, on: loop)
                    turns.add(turn ? n : -n)
                })
            // In line before the next one starts (bounded).
            for _ in 0..<500 where channels.waiting(channel) < base + n { try? await Task.sleep(for: .milliseconds(2)) }
        }
        return tasks
    }

    func waitFor(_ turns: Turns, count: Int) async {
        for _ in 0..<200 where turns.all.count < count { try? await Task.sleep(for: .milliseconds(10)) }
    }

    @Test func eachSendThatGetsThroughLetsTheNextTwoGo() async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        let channels = FullChannels()
        #expect(!channels.isHeld("websocket.connect"))
        #expect(channels.startProbing("websocket.connect"))
        #expect(channels.isHeld("websocket.connect") && !channels.isHeld("websocket.receive"))
        let turns = Turns()
        let tasks = await line(channels, "websocket.connect", count: 5, deadline: .now() + .seconds(30), loop: group.next(), turns: turns)
        try await Task.sleep(for: .milliseconds(100))
        #expect(turns.all.isEmpty, "nobody in line goes while the channel is refused")
        channels.stopProbing("websocket.connect", accepted: true)
        await waitFor(turns, count: 2)
        // Two let go at once run in either order.
        #expect(Set(turns.all) == [1, 2], "the prober got through: the first two in line go")
        channels.accepted("websocket.connect")
        await waitFor(turns, count: 4)
        #expect(Set(turns.all) == [1, 2, 3, 4])
        channels.accepted("websocket.connect")
        await waitFor(turns, count: 5)
        #expect(Set(turns.all) == [1, 2, 3, 4, 5])
        #expect(!channels.isHeld("websocket.connect"), "nobody probes or waits: the channel is no longer held")
        for task in tasks { await task.value }
    }

    /// One prober at a time; a prober that stops without a send through lets the next one go;
    /// a sender refused while another probes goes back to the head of the line; a sender let
    /// go that will not send passes its turn on.
    @Test func oneProberAtATimeAndTurnsAreNeverLost() async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        let channels = FullChannels()
        #expect(channels.startProbing("c"))
        #expect(!channels.startProbing("c"), "another sender probes it")
        let turns = Turns()
        let tasks = await line(channels, "c", count: 3, deadline: .now() + .seconds(30), loop: group.next(), turns: turns)
        let refused = Task {
            let turn = await channels.waitTurn("c", until: .now() + .seconds(30), on: group.next(), atHead: true)
            turns.add(turn ? 10 : -10)
        }
        for _ in 0..<500 where channels.waiting("c") < 4 { try await Task.sleep(for: .milliseconds(2)) }
        channels.stopProbing("c", accepted: false)
        await waitFor(turns, count: 1)
        #expect(turns.all == [10], "the prober gave up: the head of the line (the refused one) goes")
        channels.passTurn("c")
        await waitFor(turns, count: 2)
        #expect(turns.all == [10, 1], "it will not send after all: the next one goes")
        #expect(channels.startProbing("c"))
        channels.passTurn("c")
        try await Task.sleep(for: .milliseconds(50))
        #expect(turns.all == [10, 1], "a turn passed while a prober is at it goes to nobody")
        channels.stopProbing("c", accepted: true)
        await waitFor(turns, count: 4)
        #expect(Set(turns.all) == [10, 1, 2, 3])
        for task in tasks + [refused] { await task.value }
        #expect(!channels.isHeld("c"))
    }

    @Test func aSenderInLineGivesUpAtItsDeadlineOrWhenCancelled() async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        let channels = FullChannels()
        #expect(channels.startProbing("c"))
        let turns = Turns()
        let early = await line(channels, "c", count: 1, deadline: .now() + .milliseconds(200), loop: group.next(), turns: turns)
        let late = await line(channels, "c", count: 2, deadline: .now() + .seconds(30), loop: group.next(), turns: turns)
        await waitFor(turns, count: 1)
        #expect(turns.all == [-1], "the first in line gave up at its deadline")
        late[0].cancel()
        await waitFor(turns, count: 2)
        #expect(turns.all == [-1, -1], "a cancelled sender leaves the line")
        channels.stopProbing("c", accepted: true)
        await waitFor(turns, count: 3)
        #expect(turns.all == [-1, -1, 2], "those who left take no turn")
        for task in early + late { await task.value }
        #expect(!channels.isHeld("c"))
    }
}

/// A layer whose sends of the messages named in `failing` (by their "who") each fail once as
/// a lost connection, and of those named in `storedThenLost` each are stored and then fail once
/// so (a Redis that ran the send and died before its reply); everything goes to an in-memory
/// layer of capacity `capacity`.
final class FlakySendLayer: ForwardingChannelLayer {
    let memory: InMemoryChannelLayer
    var base: any ChannelLayer { memory }
    let failing = Mutex<Set<String>>([])
    let storedThenLost = Mutex<Set<String>>([])
    /// Refused once as by a Redis loading its data set: nothing stored, and it says so.
    let notReady = Mutex<Set<String>>([])

    init(capacity: Int = 1) { memory = InMemoryChannelLayer(configuration: .init(capacity: capacity)) }

    func send(_ message: Message, to channel: String) async throws(ChannelLayerError) {
        let who = message["who"]?.stringValue ?? ""
        if failing.withLock({ $0.remove(who) != nil }) {
            throw ChannelLayerError(.connectionLost, "the test's layer lost its connection")
        }
        if notReady.withLock({ $0.remove(who) != nil }) { throw ChannelLayerError.notReady("LOADING (test)") }
        try await memory.send(message, to: channel)
        if storedThenLost.withLock({ $0.remove(who) != nil }) {
            throw ChannelLayerError(.connectionLost, "the test's layer lost its connection after storing")
        }
    }
}

@Suite("senders in a full channel's line", .timeLimit(.minutes(1)))
struct FullChannelSendersTests {
    /// Senders let go from a full channel's line whose sends then fail for want of the layer
    /// (a Redis connection killed) pass their turn on and retry on their own, outside the line.
    /// Found by a red-team run: they kept the turn and queued again behind the others, nobody
    /// probed the channel, and it sat empty until every sender in line gave up (1013 "stayed
    /// full" for 147 of 150 sockets).
    /// A socket's frame whose send lost its connection may have been stored: the server's next
    /// try is marked `__resent` (an ordering gate then runs the frame once if both copies are
    /// there); one that failed before storing is marked too (nothing tells them apart), one a
    /// Redis refused without running it (`-LOADING`) is not, and the frames behind them, never
    /// tried, are not.
    @Test func aSendTriedAgainAfterALostConnectionIsMarked() async throws {
        let layer = FlakySendLayer(capacity: 100)
        layer.storedThenLost.withLock { $0 = ["a"] }
        layer.failing.withLock { $0 = ["b"] }
        layer.notReady.withLock { $0 = ["c"] }
        let logger = Logger(label: "test")
        let server = ServerContext(
            layer: layer, router: ReplyRouter(layer: layer, prefix: "resenttest", logger: logger),
            configuration: ServerConfiguration(host: "127.0.0.1", port: 0), logger: logger, accessLog: nil)
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let sender = try await loop.submit {
            NIOLoopBound(LayerSender(server: server, loop: loop, outageTimeout: .seconds(30), heldLimit: 64, owner: nil), eventLoop: loop)
        }.get()
        try await loop.submit {
            for (who, order) in [("a", 1), ("b", 2), ("c", 3), ("d", 4)] {
                sender.value.send(["who": .string(who), "order": .int(Int64(order))], to: "websocket.receive")
            }
        }.get()
        var received: [Message] = []
        let end = ContinuousClock.now + .seconds(10)
        while received.count < 5, ContinuousClock.now < end {
            if let message = try await layer.memory.receive(channels: ["websocket.receive"], timeout: .milliseconds(100)) {
                received.append(message.message)
            }
        }
        #expect(received.map { $0["who"]?.stringValue ?? "?" } == ["a", "a", "b", "c", "d"])
        #expect(received.map(\.isResent) == [false, true, true, false, false])
        #expect(received.map { $0["order"]?.intValue ?? -1 } == [1, 1, 2, 3, 4], "the same order in both copies")
        try await loop.submit { sender.value.close() }.get()
    }

    @Test func aTurnThatMeetsALostConnectionIsPassedOn() async throws {
        let layer = FlakySendLayer()
        var configuration = ServerConfiguration(host: "127.0.0.1", port: 0)
        configuration.channelFullTimeout = .seconds(3)
        let logger = Logger(label: "test")
        let server = ServerContext(
            layer: layer, router: ReplyRouter(layer: layer, prefix: "linetest", logger: logger),
            configuration: configuration, logger: logger, accessLog: nil)
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let senders = try await loop.submit {
            NIOLoopBound(
                (0..<4).map { _ in LayerSender(server: server, loop: loop, outageTimeout: .seconds(30), heldLimit: 64, owner: nil) },
                eventLoop: loop)
        }.get()
        func send(_ index: Int, _ who: String) async throws {
            try await loop.submit { senders.value[index].send(["who": .string(who)], to: "line.test") }.get()
        }
        try await send(0, "a1")  // fills the channel
        try await send(0, "a2")  // refused: sender 0 probes
        let deadline = ContinuousClock.now + .seconds(10)
        while !server.fullChannels.isHeld("line.test"), ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        for (index, who) in [(1, "b"), (2, "d"), (3, "e")] {
            try await send(index, who)
            while server.fullChannels.waiting("line.test") < index, ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(5))
            }
        }
        #expect(server.fullChannels.waiting("line.test") == 3, "b, d and e wait in line")
        // The two let go when the prober gets through lose their connection once.
        layer.failing.withLock { $0 = ["b", "d"] }
        var received: [String] = []
        let end = ContinuousClock.now + .milliseconds(2_500)
        while received.count < 5, ContinuousClock.now < end {
            if let message = try await layer.memory.receive(channels: ["line.test"], timeout: .milliseconds(100)) {
                received.append(message.message["who"]?.stringValue ?? "?")
            }
        }
        #expect(received.sorted() == ["a1", "a2", "b", "d", "e"], "every message through, before anyone's bound: \(received)")
        #expect(server.counters[.heldDropped] == 0)
        #expect(layer.failing.withLock { $0.isEmpty }, "both failures were met")
        try await loop.submit { for sender in senders.value { sender.close() } }.get()
    }
}
