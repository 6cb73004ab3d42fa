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
/// sockets, on the in-memory layer and on a real Redis.
@Suite("streamed responses and their workers' leases", .timeLimit(.minutes(2)))
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
    static func dieMidStream(layer: any ChannelLayer, started: Bool) async throws {
        let received = try #require(try await layer.receive(channels: [ASGIChannel.httpRequest], timeout: .seconds(20)))
        let request = try HTTPRequestMessage(received.message)
        let reply = request.replyChannel.rawValue
        #expect(request.responseCredit != nil, "our server offers credit: a worker of ours takes a lease")
        let pool = try #require(ResponseStreamLeases.pool(replyChannel: reply))
        let disconnect = "worker.deadworker!" + ChannelNames.randomLetters(12)
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
                async let dead: Void = Self.dieMidStream(layer: layer, started: true)
                let outcome = try await Self.rawGet(port: port, path: "/events/", within: 20)
                try await dead
                let text = try #require(outcome, "the stream was still open 20 s after its worker stopped (\(type(of: layer)))")
                #expect(text.contains("data: 0") && text.contains("data: 1"), "what was sent before the death arrives first: \(text)")
                #expect(!text.hasSuffix("0\r\n\r\n"), "cut: no terminating chunk, the client knows it is incomplete")
                #expect(server.statistics.httpWorkerLost == 1)
            }
        }
    }

    @Test func aRequestWhoseWorkerDiedBeforeAnsweringGets503() async throws {
        for layer in try Self.layers() {
            try await withServer(layer: layer) { port, server in
                async let dead: Void = Self.dieMidStream(layer: layer, started: false)
                let outcome = try await Self.rawGet(port: port, path: "/events/", within: 20)
                try await dead
                let text = try #require(outcome, "no answer 20 s after the worker stopped (\(type(of: layer)))")
                #expect(text.hasPrefix("HTTP/1.1 503"), "\(text)")
                #expect(server.statistics.httpWorkerLost == 1)
            }
        }
    }

    /// A live worker renews its streams' leases: a stream three lease durations long is not
    /// cut, and its lease is given up when it ends (a lease left behind would lapse, and the
    /// server would send its cut to a reply channel nobody reads: counted as unroutable).
    @Test func aLiveWorkersLongStreamRunsWholeAndLeavesNoLease() async throws {
        let routes = [
            route("http.request", path: "^/long/$") { context in
                try await context.respondStart(contentType: "text/event-stream", firstChunk: Array("data: 0\n\n".utf8))
                for i in 1...12 {
                    try await Task.sleep(for: .milliseconds(500))
                    try await context.respondChunk(Array("data: \(i)\n\n".utf8))
                }
                try await context.respondChunk([], last: true)
            }
        ]
        for layer in try Self.layers() {
            try await withServer(layer: layer) { port, server in
                let worker = Worker(router: try Router(routes), layer: layer, concurrency: 2, streamLeaseDuration: .seconds(2))
                let task = Task { await worker.run() }
                defer { worker.stop() }
                let outcome = try await Self.rawGet(port: port, path: "/long/", within: 30)
                let text = try #require(outcome, "the stream did not end (\(type(of: layer)))")
                #expect(text.contains("data: 12") && text.hasSuffix("0\r\n\r\n"), "whole: \(text.suffix(60))")
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
}
