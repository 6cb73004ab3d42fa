import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOWebSocket

/// The WebSocket echo benchmark of `../shared/peers/ws_bench.py` (same protocol, same output
/// keys) in Swift on one event-loop thread, so the client takes little of the machine's CPU
/// away from the servers it measures:
///
///   channels-bench ws URL latency N          one client, N sequential echoes (after 50 warm-up)
///   channels-bench ws URL throughput C SECS  C clients, closed loop, one message in flight each
///
/// Every client is alone in its room (`URL/<room>/`) and first sends a probe until it comes
/// back, so its group membership is in place before measuring. Every echo is checked.
enum WebSocketBench {
    static func main(_ arguments: [String]) async throws {
        guard arguments.count >= 3 else { throw BenchError("usage: channels-bench ws URL latency N | throughput CLIENTS SECONDS") }
        guard let (host, port) = parse(arguments[0]) else { throw BenchError("bad URL \(arguments[0])") }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let run = String(UInt32.random(in: 0...UInt32.max), radix: 36)
        switch arguments[1] {
        case "latency":
            let n = Int(arguments[2]) ?? 2000
            let client = try await EchoClient.connect(host: host, port: port, room: "lat-\(run)", group: group)
            try await client.join()
            _ = try await client.run(count: 50, deadline: nil)
            let samples = try await client.run(count: n, deadline: nil)
            client.close()
            printJSON(["latency": ["clients": 1, "messages": n, "rtt": summary(samples)]])
        case "throughput":
            let clients = Int(arguments[2]) ?? 50
            let seconds = Double(arguments.count > 3 ? arguments[3] : "10") ?? 10
            var all: [EchoClient] = []
            for i in 0..<clients {
                all.append(try await EchoClient.connect(host: host, port: port, room: "tp-\(run)-\(i)", group: group))
            }
            try await withThrowingTaskGroup(of: Void.self) { tasks in
                for client in all { tasks.addTask { try await client.join() } }
                try await tasks.waitForAll()
            }
            let start = ContinuousClock.now
            let deadline = NIODeadline.now() + .nanoseconds(Int64(seconds * 1e9))
            let results = try await withThrowingTaskGroup(of: [Double].self) { tasks in
                for client in all { tasks.addTask { try await client.run(count: nil, deadline: deadline) } }
                var out: [[Double]] = []
                for try await samples in tasks { out.append(samples) }
                return out
            }
            let elapsed = (ContinuousClock.now - start) / .seconds(1)
            for client in all { client.close() }
            let total = results.reduce(0) { $0 + $1.count }
            printJSON([
                "throughput": [
                    "clients": clients, "duration_s": round2(elapsed), "echoed_messages": total,
                    "msgs_per_s": round2(Double(total) / elapsed), "rtt_under_load": summary(results.flatMap { $0 }),
                    "per_client_min": results.map(\.count).min() ?? 0, "per_client_max": results.map(\.count).max() ?? 0,
                ]
            ])
        default:
            throw BenchError("unknown mode \(arguments[1])")
        }
        try await group.shutdownGracefully()
    }

    static func parse(_ url: String) -> (String, Int)? {
        guard url.hasPrefix("ws://") else { return nil }
        let rest = url.dropFirst(5).split(separator: "/").first.map(String.init) ?? ""
        let parts = rest.split(separator: ":")
        guard parts.count == 2, let port = Int(parts[1]) else { return nil }
        return (String(parts[0]), port)
    }

    static func round2(_ x: Double) -> Double { (x * 1000).rounded() / 1000 }

    static func summary(_ samplesMs: [Double]) -> [String: Any] {
        guard !samplesMs.isEmpty else { return ["n": 0] }
        let sorted = samplesMs.sorted()
        func pct(_ p: Double) -> Double {
            let k = max(0, min(sorted.count - 1, Int((p / 100 * Double(sorted.count) + 0.5).rounded()) - 1))
            return sorted[k]
        }
        let median = sorted.count % 2 == 1 ? sorted[sorted.count / 2] : (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
        return [
            "n": sorted.count, "median_ms": round2(median), "p99_ms": round2(pct(99)),
            "mean_ms": round2(sorted.reduce(0, +) / Double(sorted.count)), "min_ms": round2(sorted[0]),
            "max_ms": round2(sorted[sorted.count - 1]),
        ]
    }

    static func printJSON(_ value: [String: Any]) {
        let data = try! JSONSerialization.data(withJSONObject: value, options: [.sortedKeys])
        print(String(decoding: data, as: UTF8.self))
    }
}

struct BenchError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// One benchmark connection; its handler does the sending and timing on the event loop.
final class EchoClient: Sendable {
    let channel: any Channel
    private let handler: NIOLoopBound<EchoHandler>
    let room: String

    private init(channel: any Channel, handler: NIOLoopBound<EchoHandler>, room: String) {
        self.channel = channel
        self.handler = handler
        self.room = room
    }

    static func connect(host: String, port: Int, room: String, group: any EventLoopGroup) async throws -> EchoClient {
        let upgraded = try await ClientBootstrap(group: group)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .connect(host: host, port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    let upgrader = NIOTypedWebSocketClientUpgrader<EchoClient?>(upgradePipelineHandler: { channel, _ in
                        channel.eventLoop.makeCompletedFuture {
                            let handler = EchoHandler()
                            try channel.pipeline.syncOperations.addHandler(handler)
                            return EchoClient(channel: channel, handler: NIOLoopBound(handler, eventLoop: channel.eventLoop), room: room)
                        }
                    })
                    var headers = HTTPHeaders()
                    headers.add(name: "Host", value: "\(host):\(port)")
                    let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/\(room)/", headers: headers)
                    let configuration = NIOTypedHTTPClientUpgradeConfiguration(
                        upgradeRequestHead: head, upgraders: [upgrader],
                        notUpgradingCompletionHandler: { channel in channel.eventLoop.makeCompletedFuture { nil } })
                    return try channel.pipeline.syncOperations.configureUpgradableHTTPClientPipeline(
                        configuration: .init(upgradeConfiguration: configuration))
                }
            }
        guard let client = try await upgraded.get() else { throw BenchError("\(room): the server refused the WebSocket") }
        return client
    }

    /// Sends a probe (again every 3 s, ten times at most) until it comes back.
    func join() async throws {
        let promise = channel.eventLoop.makePromise(of: [Double].self)
        let handler = self.handler
        let probe = Array("join \(room)".utf8)
        channel.eventLoop.execute {
            handler.value.start(payload: { _ in probe }, count: 1, deadline: nil, resendAfter: .seconds(3), promise: promise)
        }
        _ = try await promise.futureResult.get()
    }

    /// Echoes until `count` messages or the deadline; returns each round trip in ms.
    func run(count: Int?, deadline: NIODeadline?) async throws -> [Double] {
        let promise = channel.eventLoop.makePromise(of: [Double].self)
        let handler = self.handler
        let room = self.room
        channel.eventLoop.execute {
            handler.value.start(
                payload: { seq in Array("tp \(room) \(seq) xxxxxxxxxxxxxxxxxxxxxxxx".utf8) },
                count: count, deadline: deadline, resendAfter: nil, promise: promise)
        }
        return try await promise.futureResult.get()
    }

    func close() { channel.close(promise: nil) }
}

final class EchoHandler: ChannelInboundHandler {
    typealias InboundIn = WebSocketFrame
    typealias OutboundOut = WebSocketFrame

    private var context: ChannelHandlerContext?
    private var payload: (Int) -> [UInt8] = { _ in [] }
    private var expected: [UInt8] = []
    private var seq = 0
    private var count: Int?
    private var deadline: NIODeadline?
    private var sentAt = NIODeadline.now()
    private var samples: [Double] = []
    private var promise: EventLoopPromise<[Double]>?
    private var resend: Scheduled<Void>?
    private var tries = 0

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func start(
        payload: @escaping (Int) -> [UInt8], count: Int?, deadline: NIODeadline?, resendAfter: TimeAmount?,
        promise: EventLoopPromise<[Double]>
    ) {
        self.payload = payload
        self.count = count
        self.deadline = deadline
        self.promise = promise
        seq = 0
        tries = 0
        samples = []
        samples.reserveCapacity(count ?? 4096)
        sendNext()
        if let resendAfter, let context {
            let loop = context.eventLoop.assumeIsolated()
            func again() {
                resend = loop.scheduleTask(in: resendAfter) {
                    guard self.promise != nil else { return }
                    self.tries += 1
                    if self.tries >= 10 {
                        self.finish(.failure(BenchError("probe never echoed")))
                    } else {
                        self.send(self.expected)
                        again()
                    }
                }
            }
            again()
        }
    }

    private func sendNext() {
        expected = payload(seq)
        seq += 1
        send(expected)
    }

    private func send(_ bytes: [UInt8]) {
        guard let context else { return }
        sentAt = .now()
        let frame = WebSocketFrame(fin: true, opcode: .text, maskKey: .random(), data: context.channel.allocator.buffer(bytes: bytes))
        context.writeAndFlush(wrapOutboundOut(frame), promise: nil)
    }

    private func finish(_ result: Result<[Double], any Error>) {
        resend?.cancel()
        resend = nil
        let promise = self.promise
        self.promise = nil
        promise?.completeWith(result)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        switch frame.opcode {
        case .ping:
            let pong = WebSocketFrame(fin: true, opcode: .pong, maskKey: .random(), data: frame.unmaskedData)
            context.writeAndFlush(wrapOutboundOut(pong), promise: nil)
        case .text:
            guard promise != nil else { return }
            let got = Array(buffer: frame.unmaskedData)
            guard got == expected else {
                if resend == nil { finish(.failure(BenchError("echo mismatch: got \(String(decoding: got, as: UTF8.self))"))) }
                return  // a joining client may see an earlier copy of its probe
            }
            let now = NIODeadline.now()
            samples.append(Double((now - sentAt).nanoseconds) / 1e6)
            if let count, samples.count >= count { return finish(.success(samples)) }
            if let deadline, now >= deadline { return finish(.success(samples)) }
            sendNext()
        case .connectionClose:
            finish(.failure(BenchError("the server closed the socket")))
            context.close(promise: nil)
        default:
            break
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        finish(.failure(BenchError("connection closed")))
    }
}
