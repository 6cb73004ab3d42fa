import ASGI
import Channels
import Foundation
import InterfaceServer
import NIOCore
import NIOPosix
import Synchronization
import TestSupport
import Testing

/// A streamed response's worker dies (`SIGKILL`, an OOM kill): nothing else would end the
/// response, so its client waited forever. The worker holds a lease per stream
/// (``ResponseStreamLeases``) and the server cuts the streams whose lease lapsed. Over real
/// sockets, on the in-memory layer and on a real Redis. The waits are long (a minute at most):
/// under the whole suite's load (Sentinel failovers alongside) the server cut a stream 3 s in,
/// and the client task here had not read it 20 s in.
@Suite("streamed responses and their workers' leases", .timeLimit(.minutes(3)))
struct StreamLeaseTests {
    static func layers() throws -> [any ChannelLayer] { [InMemoryChannelLayer(), try TestRedis.layer()] }

    /// A server on `layer` whose lease keeper looks every 200 ms.
    func withServer(layer: any ChannelLayer, _ body: (Int, InterfaceServer) async throws -> Void) async throws {
        var configuration = ServerConfiguration(host: "127.0.0.1", port: 0)
        configuration.pingInterval = nil
        configuration.streamLeaseSweep = .milliseconds(200)
        let server = try InterfaceServer(layer: layer, configuration: configuration)
        try await server.start()
        let port = try #require(server.localAddress?.port)
        do {
            try await body(port, server)
        } catch {
            await server.shutdown()
            throw error
        }
        await server.shutdown()
    }

    /// A worker that died after it took a request and its stream's lease, as a killed one
    /// leaves it: the lease (for 1 s) and, if `started`, the response's start and one chunk;
    /// then nothing, ever.
    static func dieMidStream(layer: any ChannelLayer, started: Bool, inbox: String = "worker.dead!") async throws {
        let received = try #require(try await layer.receive(channels: [ASGIChannel.httpRequest], timeout: .seconds(20)))
        let request = try HTTPRequestMessage(received.message)
        let reply = request.replyChannel.rawValue
        #expect(request.responseCredit != nil, "our server offers credit: a worker of ours takes a lease")
        let pool = try #require(ResponseStreamLeases.pool(replyChannel: reply))
        let disconnect = inbox + ChannelNames.randomLetters(12)
        try await #require(layer.leases).holdLease(disconnect, in: pool, note: reply, for: .seconds(1))
        guard started else { return }
        try await layer.send(
            HTTPResponseStart(
                status: 200, headers: [("content-type", "text/event-stream")], content: Array("data: 0\n\n".utf8),
                moreContent: true, disconnectChannel: disconnect
            ).message, to: reply)
        try await layer.send(HTTPResponseChunk(content: Array("data: 1\n\n".utf8), moreContent: true).message, to: reply)
    }

    /// What a plain socket reads for `GET path` until the server closes it; nil if it is
    /// still open after `seconds`.
    static func rawGet(port: Int, path: String, within seconds: Int) async throws -> String? {
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connect(host: "127.0.0.1", port: port) { channel in
                channel.eventLoop.makeCompletedFuture { try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel) }
            }
        let outcome = try await withThrowingTaskGroup(of: String?.self) { group in
            group.addTask {
                try await channel.executeThenClose { inbound, outbound in
                    try await outbound.write(ByteBuffer(string: "GET \(path) HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"))
                    var text = ""
                    for try await buffer in inbound { text += String(buffer: buffer) }
                    return text
                }
            }
            group.addTask {
                try await Task.sleep(for: .seconds(seconds))
                return nil
            }
            defer { group.cancelAll() }
            return try await group.next() ?? nil
        }
        if outcome == nil { try? await channel.channel.close() }
        return outcome
    }

    @Test func aStreamWhoseWorkerDiedIsCutNotLeftOpen() async throws {
        for layer in try Self.layers() {
            try await withServer(layer: layer) { port, server in
                let inbox = "worker." + ChannelNames.randomLetters(10) + "!"
                async let dead: Void = Self.dieMidStream(layer: layer, started: true, inbox: inbox)
                let outcome = try await Self.rawGet(port: port, path: "/events/", within: 60)
                try await dead
                let text = try #require(outcome, "the stream was still open 60 s after its worker stopped (\(type(of: layer)))")
                #expect(text.contains("data: 0") && text.contains("data: 1"), "what was sent before the death arrives first: \(text)")
                #expect(!text.hasSuffix("0\r\n\r\n"), "cut: no terminating chunk, the client knows it is incomplete")
                #expect(server.statistics.httpWorkerLost == 1)
                // A worker that was only held up (not dead) is told its client is gone, so its
                // consumer stops instead of streaming on to nobody.
                let told = try await layer.receive(channels: [inbox], timeout: .seconds(30))
                #expect(told?.message["reply_channel"] != nil, "the stream's disconnect channel heard nothing")
            }
        }
    }

    @Test func aRequestWhoseWorkerDiedBeforeAnsweringGets503() async throws {
        for layer in try Self.layers() {
            try await withServer(layer: layer) { port, server in
                async let dead: Void = Self.dieMidStream(layer: layer, started: false)
                let outcome = try await Self.rawGet(port: port, path: "/events/", within: 60)
                try await dead
                let text = try #require(outcome, "no answer 60 s after the worker stopped (\(type(of: layer)))")
                #expect(text.hasPrefix("HTTP/1.1 503"), "\(text)")
                #expect(server.statistics.httpWorkerLost == 1)
            }
        }
    }

    /// `/long/`: 13 events half a second apart (6 s: three leases of 2 s), then the end.
    static let longStream = route("http.request", path: "^/long/$") { context in
        try await context.respondStart(contentType: "text/event-stream", firstChunk: Array("data: 0\n\n".utf8))
        for i in 1...12 {
            try await Task.sleep(for: .milliseconds(500))
            try await context.respondChunk(Array("data: \(i)\n\n".utf8))
        }
        try await context.respondChunk([], last: true)
    }

    /// A live worker renews its streams' leases: 30 streams three lease durations long are not
    /// cut, and their leases are given up when they end (a lease left behind would lapse, and the
    /// server would send its cut to a reply channel nobody reads: counted as unroutable).
    @Test func aLiveWorkersLongStreamRunsWholeAndLeavesNoLease() async throws {
        let routes = [Self.longStream]
        for layer in try Self.layers() {
            try await withServer(layer: layer) { port, server in
                let worker = Worker(router: try Router(routes), layer: layer, concurrency: 64, streamLeaseDuration: .seconds(2))
                let task = Task { await worker.run() }
                defer { worker.stop() }
                // 30 at once: a renewal taken before a stream ended and sent after its release
                // had brought the lease back (13 of 100 in a red team's run).
                try await withThrowingTaskGroup(of: String?.self) { group in
                    for _ in 0..<30 { group.addTask { try await Self.rawGet(port: port, path: "/long/", within: 40) } }
                    for try await outcome in group {
                        let text = try #require(outcome, "a stream did not end (\(type(of: layer)))")
                        #expect(text.contains("data: 12") && text.hasSuffix("0\r\n\r\n"), "whole: \(text.suffix(60))")
                    }
                }
                #expect(server.statistics.httpWorkerLost == 0)
                // Past the lease's duration and a few looks of the keeper.
                try await Task.sleep(for: .seconds(3))
                #expect(server.statistics.unroutableReplies == 0, "a lease was left behind and lapsed")
                #expect(server.statistics.httpWorkerLost == 0)
                worker.stop()
                await task.value
            }
        }
    }

    /// One renewal that never comes back (a Redis shard stalled under one lease) held up every
    /// other: the worker renewed one lease at a time, so all its streams were cut. Now the
    /// others run whole, and only the stalled one is cut (its worker told, so it stops).
    @Test func aStalledRenewalHoldsUpNoOtherStream() async throws {
        let layer = StallingLeases(base: InMemoryChannelLayer())
        let routes = [Self.longStream]
        try await withServer(layer: layer) { port, server in
            let worker = Worker(router: try Router(routes), layer: layer, concurrency: 8, streamLeaseDuration: .seconds(2))
            let task = Task { await worker.run() }
            defer { worker.stop() }
            async let first = Self.rawGet(port: port, path: "/long/", within: 40)
            // The first stream's lease is the one whose renewals stall.
            try await layer.firstLeaseTaken()
            async let second = Self.rawGet(port: port, path: "/long/", within: 40)
            async let third = Self.rawGet(port: port, path: "/long/", within: 40)
            for outcome in [try await second, try await third] {
                let text = try #require(outcome, "a stream did not end")
                #expect(text.contains("data: 12") && text.hasSuffix("0\r\n\r\n"), "whole: \(text.suffix(60))")
            }
            let stalled = try #require(try await first, "the stalled stream was left open")
            #expect(!stalled.hasSuffix("0\r\n\r\n"), "the stalled lease's stream is cut")
            #expect(server.statistics.httpWorkerLost == 1)
            // Its worker hears the client is gone and stops the consumer.
            let deadline = ContinuousClock.now + .seconds(30)
            while worker.streams.abandonedCount < 1, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(50)) }
            #expect(worker.streams.abandonedCount == 1)
            worker.stop()
            await task.value
        }
    }

    /// A streaming consumer hears its client left even when `http.disconnect` is full (nothing
    /// consumes it here): the notice to the worker's inbox had waited behind the send to the
    /// full channel, and both were given up.
    @Test func aClientThatLeavesStopsItsStreamEvenWithHTTPDisconnectFull() async throws {
        let routes = [
            route("http.request", path: "^/forever/$") { context in
                try await context.respondStart(contentType: "text/event-stream", firstChunk: Array("data: 0\n\n".utf8))
                while true {
                    try await Task.sleep(for: .milliseconds(100))
                    try await context.respondChunk(Array("data: more\n\n".utf8))
                }
            }
        ]
        for layer in try Self.layers() {
            try await withServer(layer: layer) { port, _ in
                for i in 0..<100 { try await layer.send(["filler": .int(Int64(i))], to: ASGIChannel.httpDisconnect) }
                let worker = Worker(router: try Router(routes), layer: layer, concurrency: 4)
                let task = Task { await worker.run() }
                defer { worker.stop() }
                // The client reads the first event, then leaves.
                #expect(try await Self.rawGet(port: port, path: "/forever/", within: 2) == nil)
                let deadline = ContinuousClock.now + .seconds(30)
                while worker.streams.abandonedCount < 1, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(50)) }
                #expect(worker.streams.abandonedCount == 1, "the consumer was not told its client left (\(type(of: layer)))")
                // Room for the server's own held send, so it stops at once.
                _ = try await layer.receiveBatch(channels: [ASGIChannel.httpDisconnect], max: 200, timeout: .zero)
                worker.stop()
                await task.value
            }
        }
    }

    /// A look for lapsed leases that itself took long found the layer stalled (a Redis shard
    /// stopped longer than a lease): every lease had lapsed meanwhile, its worker's renewal
    /// queued behind the claim, and which streams were cut was a coin toss (40 of 60 in a red
    /// team's run). What such a claim finds gets a grace instead of a cut.
    @Test func leasesFoundByAStalledLookGetAGraceNotACut() async throws {
        let layer = StallingLeases(base: InMemoryChannelLayer(), slowClaims: true)
        try await withServer(layer: layer) { port, server in
            async let dead: Void = Self.dieMidStream(layer: layer, started: true, inbox: "worker." + ChannelNames.randomLetters(10) + "!")
            // Past the lease (1 s) and a slow look (1.5 s): still open.
            #expect(try await Self.rawGet(port: port, path: "/events/", within: 6) == nil, "cut on a stalled look")
            try await dead
            #expect(server.statistics.httpWorkerLost == 0)
        }
    }
}

/// The in-memory layer, except that every renewal of the first lease taken never comes back
/// (as a call to a stalled Redis shard), until cancelled; with `slowClaims`, instead, every
/// look for lapsed leases is slow.
final class StallingLeases: ForwardingChannelLayer, ChannelLayerLeases {
    let base: any ChannelLayer
    private let memory: InMemoryChannelLayer
    private let first = Mutex<String?>(nil)
    private let taken = AsyncStream<Void>.makeStream()
    /// Every look for lapsed leases waits 1.5 s first, as one sent to a stalled Redis does.
    private let slowClaims: Bool

    init(base: InMemoryChannelLayer, slowClaims: Bool = false) {
        self.base = base
        memory = base
        self.slowClaims = slowClaims
    }

    /// Returns once the first lease was taken.
    func firstLeaseTaken() async throws {
        for await _ in taken.stream { return }
    }

    func holdLease(_ name: String, in pool: String, note: String, for duration: Duration) async throws(ChannelLayerError) {
        let stall = first.withLock { first -> Bool in
            if first == nil {
                first = name
                return false
            }
            return first == name
        }
        if stall && !slowClaims {
            try? await Task.sleep(for: .seconds(3600))
            return
        }
        try await memory.holdLease(name, in: pool, note: note, for: duration)
        if first.withLock({ $0 }) == name { taken.continuation.yield() }
    }

    func takeFreeLease(_ name: String, in pool: String, note: String, for duration: Duration) async throws(ChannelLayerError) -> Bool {
        try await memory.takeFreeLease(name, in: pool, note: note, for: duration)
    }

    func claimLapsedLeases(in pool: String, max: Int, for duration: Duration) async throws(ChannelLayerError) -> [ChannelLayerLease] {
        if slowClaims { try? await Task.sleep(for: .milliseconds(1500)) }
        return try await memory.claimLapsedLeases(in: pool, max: max, for: duration)
    }

    func releaseLease(_ name: String, in pool: String, ifNote note: String?) async throws(ChannelLayerError) {
        try await memory.releaseLease(name, in: pool, ifNote: note)
    }
}
