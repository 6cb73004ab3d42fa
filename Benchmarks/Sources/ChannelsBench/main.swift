import ASGI
import Foundation
import NIOCore
import NIOPosix
import RedisChannelLayer
import Synchronization

/// Channel layer benchmark: the phases of ../shared/peers/layer_bench.py, for our Redis layer.
/// Usage: channels-bench REDIS_URL [N]. Prints one JSON object.
let arguments = CommandLine.arguments
// Jobs on NIO's event loops, as `runserver` / `runworker` run them (CHANNELS_EXECUTOR=default: Swift's pool).
if ProcessInfo.processInfo.environment["CHANNELS_EXECUTOR"] != "default" {
    NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor()
}
// `channels-bench fill REDIS_URL PREFIX CHANNEL N`: queue N small messages (the worker benchmark's backlog).
if arguments.count == 6, arguments[1] == "fill", let count = Int(arguments[5]) {
    var configuration = try RedisChannelLayerConfiguration(urls: [arguments[2]])
    configuration.prefix = arguments[3]
    configuration.capacity = count + 1
    let layer = try RedisChannelLayer(configuration: configuration)
    let message: Message = ["n": 1, "payload": .bytes(Array(repeating: 0x61, count: 100))]
    try await withThrowingTaskGroup(of: Void.self) { group in
        for lane in 0..<16 {
            group.addTask {
                for _ in stride(from: lane, to: count, by: 16) { try await layer.send(message, to: arguments[4]) }
            }
        }
        try await group.waitForAll()
    }
    await layer.close()
    exit(0)
}
// `channels-bench ws URL latency N | throughput CLIENTS SECONDS`: the WebSocket echo benchmark.
if arguments.count >= 2, arguments[1] == "ws" {
    do {
        try await WebSocketBench.main(Array(arguments.dropFirst(2)))
        exit(0)
    } catch {
        FileHandle.standardError.write(Data("ws bench: \(error)\n".utf8))
        exit(1)
    }
}
// `channels-bench realtime REDIS_URL PREFIX`: recovery and presence figures (scripts/bench-realtime.sh).
if arguments.count == 4, arguments[1] == "realtime" {
    try await RealtimeBench.main(url: arguments[2], prefix: arguments[3])
    exit(0)
}
guard arguments.count >= 2 else {
    FileHandle.standardError.write(Data("usage: channels-bench REDIS_URL [N]\n".utf8))
    exit(2)
}
let url = arguments[1]
let n = arguments.count > 2 ? Int(arguments[2]) ?? 20_000 : 20_000

func makeLayer() throws -> RedisChannelLayer {
    var configuration = try RedisChannelLayerConfiguration(urls: [url])
    configuration.prefix = "bench" + ChannelNames.randomLetters(6) + ":"
    configuration.capacity = 2 * n
    return try RedisChannelLayer(configuration: configuration)
}

func percentile(_ values: [Double], _ p: Double) -> Double {
    guard !values.isEmpty else { return 0 }
    let sorted = values.sorted()
    return sorted[min(sorted.count - 1, Int(Double(sorted.count) * p / 100))]
}

let body: Message = ["payload": .bytes(Array(repeating: 0x61, count: 100))]
let clock = ContinuousClock()
var results: [String: Double] = [:]

let layer = try makeLayer()
// (a) sequential sends, then sequential receives.
var start = clock.now
for _ in 0..<n { try await layer.send(body, to: "bench.tp") }
results["seq_send_per_s"] = Double(n) / (clock.now - start).seconds
start = clock.now
for _ in 0..<n { _ = try await layer.receive(channels: ["bench.tp"], timeout: .seconds(5)) }
results["seq_receive_per_s"] = Double(n) / (clock.now - start).seconds

// (b) one sender and one receiver together.
start = clock.now
async let sender: Void = { for _ in 0..<n { try await layer.send(body, to: "bench.both") } }()
var got = 0
while got < n, try await layer.receive(channels: ["bench.both"], timeout: .seconds(5)) != nil { got += 1 }
try await sender
results["together_msgs_per_s"] = Double(got) / (clock.now - start).seconds

// (b2) the same with concurrency, as a server and a worker have it: the sender keeps 64 sends in
// flight (they share round trips through the automatic pipeline) and the receiver runs 8 receive
// loops, like `runworker --threads 8`.
start = clock.now
let received = Atomic<Int>(0)
let receivers = Int(ProcessInfo.processInfo.environment["BENCH_RECEIVERS"] ?? "8") ?? 8
try await withThrowingTaskGroup(of: Void.self) { group in
    for lane in 0..<64 {
        group.addTask { for _ in stride(from: lane, to: n, by: 64) { try await layer.send(body, to: "bench.conc") } }
    }
    for _ in 0..<receivers {
        group.addTask {
            while received.load(ordering: .relaxed) < n {
                if try await layer.receive(channels: ["bench.conc"], timeout: .milliseconds(200)) != nil {
                    received.add(1, ordering: .relaxed)
                }
            }
        }
    }
    try await group.waitForAll()
}
results["concurrent_msgs_per_s"] = Double(n) / (clock.now - start).seconds

// (b3) one sender (64 sends in flight) and ONE receiver that takes batches (receiveBatch, up to
// 64 per round trip, FIFO), as the interface server's reply reader does.
start = clock.now
try await withThrowingTaskGroup(of: Void.self) { group in
    for lane in 0..<64 {
        group.addTask { for _ in stride(from: lane, to: n, by: 64) { try await layer.send(body, to: "bench.batch") } }
    }
    group.addTask {
        var got = 0
        while got < n {
            got += try await layer.receiveBatch(channels: ["bench.batch"], max: 64, timeout: .seconds(5)).count
        }
    }
    try await group.waitForAll()
}
results["batched_msgs_per_s"] = Double(n) / (clock.now - start).seconds

// (c) send -> reply round trip: an echo task replies on a process channel, as a worker does.
let echo = Task {
    while !Task.isCancelled {
        guard let m = try await layer.receive(channels: ["bench.ping"], timeout: .seconds(1)) else { continue }
        try await layer.send(["pong": true], to: try m.message.string("reply_channel"))
    }
}
var rtts: [Double] = []
for i in 0..<2000 {
    let reply = "bench.pong!" + String(i)
    let t0 = clock.now
    try await layer.send(["reply_channel": .string(reply)], to: "bench.ping")
    _ = try await layer.receive(channels: ["bench.pong!"], timeout: .seconds(5))
    if i >= 100 { rtts.append((clock.now - t0).seconds * 1000) }
}
echo.cancel()
results["rtt_p50_ms"] = percentile(rtts, 50)
results["rtt_p99_ms"] = percentile(rtts, 99)

// (d) sendGroup to 100 members.
for i in 0..<100 { try await layer.groupAdd("benchgroup", channel: "bench.member!" + String(i)) }
var groupTimes: [Double] = []
for _ in 0..<50 {
    let t0 = clock.now
    try await layer.sendGroup("benchgroup", message: body)
    groupTimes.append((clock.now - t0).seconds * 1000)
    for _ in 0..<100 { _ = try await layer.receive(channels: ["bench.member!"]) }
}
results["group100_p50_ms"] = percentile(groupTimes, 50)
results["group100_p99_ms"] = percentile(groupTimes, 99)
try await layer.flush()
await layer.close()

let json = try JSONSerialization.data(withJSONObject: results, options: [.sortedKeys])
print(String(decoding: json, as: UTF8.self))
