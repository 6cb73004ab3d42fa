import ASGI
import Channels
import Logging
import NIOCore
import NIOPosix
import NIOWebSocket
import Synchronization
import TestSupport
import Testing

@testable import InterfaceServer
@testable import RedisChannelLayer

/// A layer that stores runs in one step, as the Redis layer's script does (into an in-memory
/// layer, as far as its capacity goes), keeps their receipts as it does, and notes the size
/// of every send it is asked for. The runs named in `storedThenLost` (by the "who" of their
/// first message) are stored and then fail once as a lost connection (a Redis that ran the
/// script and died before its reply); those in `lostBefore` fail once before storing.
final class RunCountingLayer: ForwardingChannelLayer, ChannelLayerSendMany {
    let memory: InMemoryChannelLayer
    var base: any ChannelLayer { memory }
    let sizes = Mutex<[Int]>([])
    let storedThenLost = Mutex<Set<String>>([])
    let lostBefore = Mutex<Set<String>>([])
    let receipts = Mutex<[String: (number: Int, stored: Int)]>([:])
    var sendsManyAtOnce: Bool { true }

    init(capacity: Int) { memory = InMemoryChannelLayer(configuration: .init(capacity: capacity)) }

    func send(_ message: Message, to channel: String) async throws(ChannelLayerError) {
        sizes.withLock { $0.append(1) }
        try await memory.send(message, to: channel)
    }

    func sendMany(_ messages: [Message], to channel: String, receipt: RunReceipt?) async throws(ChannelLayerError) -> Int {
        sizes.withLock { $0.append(messages.count) }
        let who = messages.first?["who"]?.stringValue ?? ""
        if lostBefore.withLock({ $0.remove(who) != nil }) {
            throw ChannelLayerError(.connectionLost, "the test's layer lost its connection before storing a run")
        }
        if let receipt, let done = receipts.withLock({ $0[receipt.holder] }), done.number == receipt.number { return done.stored }
        var stored = 0
        for message in messages {
            do {
                try await memory.send(message, to: channel)
            } catch {
                if stored == 0 { throw error }
                break
            }
            stored += 1
        }
        if let receipt, stored > 0 { receipts.withLock { $0[receipt.holder] = (receipt.number, stored) } }
        if storedThenLost.withLock({ $0.remove(who) != nil }) {
            throw ChannelLayerError(.connectionLost, "the test's layer lost its connection after storing a run")
        }
        return stored
    }
}

@Suite("a connection's burst goes to the layer in runs", .timeLimit(.minutes(1)))
struct LayerSenderRunTests {
    func sender(_ layer: any ChannelLayer, prefix: String, heldLimit: Int = 64) async throws -> (
        NIOLoopBound<LayerSender>, ServerContext, any EventLoop
    ) {
        let logger = Logger(label: "test")
        var configuration = ServerConfiguration(host: "127.0.0.1", port: 0)
        configuration.channelFullTimeout = .seconds(20)
        let server = ServerContext(
            layer: layer, router: ReplyRouter(layer: layer, prefix: prefix, logger: logger),
            configuration: configuration, logger: logger, accessLog: nil)
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let sender = try await loop.submit {
            NIOLoopBound(
                LayerSender(server: server, loop: loop, outageTimeout: .seconds(30), heldLimit: heldLimit, owner: nil),
                eventLoop: loop)
        }.get()
        return (sender, server, loop)
    }

    func receiveAll(_ layer: InMemoryChannelLayer, _ channel: String, count: Int) async throws -> [Message] {
        var received: [Message] = []
        let end = ContinuousClock.now + .seconds(20)
        while received.count < count, ContinuousClock.now < end {
            received += try await layer.receiveBatch(channels: [channel], max: 100, timeout: .milliseconds(100)).map(\.message)
        }
        return received
    }

    /// 600 frames handed to one sender at once (a client's burst, read in one go) reach the
    /// layer in order, every one once, in runs: far fewer sends than frames, none larger
    /// than 64. A channel that fills (capacity 50, drained slowly) stops a run where it
    /// filled; the rest waits and goes on, nothing dropped. Before, it was a send per frame.
    @Test func aBurstGoesInOrderInRunsAndAFullChannelStopsARunWhereItFilled() async throws {
        let layer = RunCountingLayer(capacity: 50)
        let (sender, server, loop) = try await sender(layer, prefix: "runtest")
        try await loop.submit {
            for n in 0..<600 { sender.value.send(["n": .int(Int64(n)), "order": .int(Int64(n + 1))], to: "websocket.receive") }
        }.get()
        var received: [Message] = []
        let end = ContinuousClock.now + .seconds(30)
        while received.count < 600, ContinuousClock.now < end {
            received += try await layer.memory.receiveBatch(channels: ["websocket.receive"], max: 30, timeout: .milliseconds(100))
                .map(\.message)
            // Slower than the sender: the channel fills again and again.
            try await Task.sleep(for: .milliseconds(5))
        }
        #expect(received.map { $0["n"]?.intValue ?? -1 } == (0..<600).map(Int64.init), "in order, each once")
        #expect(received.allSatisfy { !$0.isResent })
        let sizes = layer.sizes.withLock { $0 }
        #expect(sizes.count < 150, "\(sizes.count) sends for 600 frames")
        #expect(sizes.max() ?? 0 <= LayerSender.largestRun && sizes.contains { $0 > 1 })
        #expect(server.counters[.heldDropped] == 0)
        try await loop.submit { sender.value.close() }.get()
    }

    /// A run whose script ran and whose reply died with the connection is tried again as it was,
    /// under its receipt: stored once, nothing marked `__resent` (marked, each message of a run
    /// waited out the ordering gate's grace in turn: a run of 64 held its socket for a minute).
    /// A run lost before its script ran is tried again too (the layer stores it then); a frame
    /// that came meanwhile is not added to the run tried again. A lone frame goes as a run of
    /// one under a receipt, and is stored once the same way.
    @Test func aRunTriedAgainAfterALostConnectionIsStoredOnce() async throws {
        let layer = RunCountingLayer(capacity: 1000)
        layer.storedThenLost.withLock { $0 = ["a"] }
        layer.lostBefore.withLock { $0 = ["e"] }
        let (sender, _, loop) = try await sender(layer, prefix: "runlost")
        try await loop.submit {
            for (who, order) in [("a", 1), ("b", 2), ("c", 3)] {
                sender.value.send(["who": .string(who), "order": .int(Int64(order))], to: "websocket.receive")
            }
        }.get()
        let received = try await receiveAll(layer.memory, "websocket.receive", count: 3)
        try await Task.sleep(for: .milliseconds(300))
        let extra = try await layer.memory.receiveBatch(channels: ["websocket.receive"], max: 10, timeout: .zero)
        #expect(received.map { $0["who"]?.stringValue ?? "?" } == ["a", "b", "c"] && extra.isEmpty, "each once: \(extra.count) more")
        #expect(received.allSatisfy { !$0.isResent })
        #expect(layer.sizes.withLock { $0 }.prefix(2) == [3, 3], "the same run tried again")
        // A run lost before it was stored (its connection failed as the script was sent).
        try await loop.submit {
            for (who, order) in [("e", 4), ("f", 5)] {
                sender.value.send(["who": .string(who), "order": .int(Int64(order))], to: "websocket.receive")
            }
        }.get()
        try await Task.sleep(for: .milliseconds(5))
        try await loop.submit { sender.value.send(["who": "g", "order": 6], to: "websocket.receive") }.get()
        let after = try await receiveAll(layer.memory, "websocket.receive", count: 3)
        #expect(after.map { $0["who"]?.stringValue ?? "?" } == ["e", "f", "g"] && after.allSatisfy { !$0.isResent })
        // A lone frame (a run of one) stored and then lost with its connection: stored once too.
        layer.storedThenLost.withLock { $0 = ["h"] }
        try await loop.submit { sender.value.send(["who": "h", "order": 7], to: "websocket.receive") }.get()
        let lone = try await receiveAll(layer.memory, "websocket.receive", count: 1)
        try await Task.sleep(for: .milliseconds(300))
        let again = try await layer.memory.receiveBatch(channels: ["websocket.receive"], max: 10, timeout: .zero)
        #expect(lone.map { $0["who"]?.stringValue ?? "?" } == ["h"] && again.isEmpty && !lone[0].isResent, "\(again.count) more")
        try await loop.submit { sender.value.close() }.get()
    }

    /// A disconnect (which outlives a give-up) and messages for another channel end a run.
    @Test func aRunIsOneChannelsAndNeverTakesTheDisconnect() async throws {
        let layer = RunCountingLayer(capacity: 1000)
        let (sender, _, loop) = try await sender(layer, prefix: "runends")
        try await loop.submit {
            sender.value.send(["n": 0], to: "websocket.connect")
            for n in 1...4 { sender.value.send(["n": .int(Int64(n))], to: "websocket.receive") }
            sender.value.send(["n": 5], to: "websocket.disconnect", outlivesGiveUp: true)
        }.get()
        let connect = try await receiveAll(layer.memory, "websocket.connect", count: 1)
        let frames = try await receiveAll(layer.memory, "websocket.receive", count: 4)
        let disconnect = try await receiveAll(layer.memory, "websocket.disconnect", count: 1)
        #expect(connect.count == 1 && disconnect.count == 1)
        #expect(frames.map { $0["n"]?.intValue ?? -1 } == [1, 2, 3, 4])
        // The connect may go alone before the frames are queued, or as a run of one: never with them.
        let sizes = layer.sizes.withLock { $0 }
        #expect(sizes.reduce(0, +) == 6 && sizes.last == 1, "\(sizes)")
        try await loop.submit { sender.value.close() }.get()
    }
}

/// The same through a real socket and a real Redis: a client writes 300 frames back to back;
/// the worker gets each once, and the server's sender made far fewer sends than frames (its
/// receipt in Redis holds the number of its last one).
@Suite("a socket's burst reaches Redis in runs", .timeLimit(.minutes(2)))
struct RedisBurstRunTests {
    @Test func aClientsBurstReachesTheWorkerOnceEachInFewSends() async throws {
        let layer = try TestRedis.layer()
        let orders = Mutex<[Int64]>([])
        let routes = [
            route("websocket.connect", path: "^/burst/$") { context in try await context.accept() },
            route("websocket.receive", path: "^/burst/$") { context in
                if let order = context.message["order"]?.intValue { orders.withLock { $0.append(order) } }
            },
        ]
        var configuration = ServerConfiguration(host: "127.0.0.1", port: 0)
        configuration.pingInterval = nil
        configuration.websocketConnectTimeout = .seconds(30)
        configuration.maxFramesPerSecond = 0
        try await ServerTests.withLiveServer(layer: layer, routes: routes, configuration: configuration, concurrency: 4) { port, _ in
            guard case .websocket(let channel) = try await NIOWebSocketClient.connect(port: port, path: "/burst/") else {
                Issue.record("the socket was not accepted")
                return
            }
            try await channel.executeThenClose { _, outbound in
                for n in 0..<300 { try await outbound.write(NIOWebSocketClient.frame(.text, Array("frame \(n)".utf8))) }
                let end = ContinuousClock.now + .seconds(30)
                while orders.withLock({ $0.count }) < 300, ContinuousClock.now < end { try await Task.sleep(for: .milliseconds(20)) }
                // The sender's receipt: `<its last send's number>:<stored>`, read before the close sends one more.
                let keys = try await layer.shared(0).command(["KEYS", .text(layer.configuration.prefix + "run:*")]).array ?? []
                #expect(keys.count == 1, "one receipt key for the one sending connection")
                if let key = keys.first?.bytes {
                    let value = String(decoding: try await layer.shared(0).command(["GET", .bytes(key)]).bytes ?? [], as: UTF8.self)
                    let sends = Int(value.split(separator: ":").first ?? "") ?? .max
                    #expect(sends < 100, "the connect and 300 frames took \(value) sends (number:stored of the last)")
                }
                try? await outbound.write(NIOWebSocketClient.frame(.connectionClose, [0x03, 0xE8]))
            }
        }
        let got = orders.withLock { $0 }.sorted()
        #expect(got == (1...300).map(Int64.init), "every frame once: \(got.count) taken")
    }
}
