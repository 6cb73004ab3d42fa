import ASGI
import Benchmark
import Foundation
import RedisChannelLayer

/// The hot paths of a message's trip, on package-benchmark: wall clock, throughput and
/// mallocs per operation, so an allocation added to the codec or the typed messages shows up
/// as a number. `swift package --package-path Benchmarks benchmark` runs them; with
/// `REDIS_URL` set the Redis layer's round trip runs too (against that server).
///
/// Baselines: `swift package --package-path Benchmarks benchmark baseline update main`, then
/// `... benchmark baseline compare main` after a change.
let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .throughput, .mallocCountTotal],
        maxDuration: .seconds(2),
        maxIterations: 1_000_000
    )

    let receive = WebSocketReceiveMessage(
        replyChannel: "websocket.send!abcdefghijkl", path: "/chat/lobby/", order: 42,
        data: .text(#"{"handle": "alice", "message": "hello, room"}"#)
    ).message
    let encoded = MsgPackEncoder.encode(receive)

    Benchmark("msgpack encode websocket.receive", configuration: .init(scalingFactor: .kilo)) { benchmark in
        for _ in benchmark.scaledIterations { blackHole(MsgPackEncoder.encode(receive)) }
    }

    Benchmark("msgpack decode websocket.receive", configuration: .init(scalingFactor: .kilo)) { benchmark in
        let decoder = MsgPackDecoder()
        for _ in benchmark.scaledIterations { blackHole(try decoder.decodeMessage(encoded)) }
    }

    Benchmark("typed websocket.receive from Message", configuration: .init(scalingFactor: .kilo)) { benchmark in
        for _ in benchmark.scaledIterations { blackHole(try WebSocketReceiveMessage(receive)) }
    }

    Benchmark("in-memory layer send + receive") { benchmark in
        let layer = InMemoryChannelLayer(configuration: .init(capacity: 1_000))
        for _ in benchmark.scaledIterations {
            try await layer.send(receive, to: "websocket.receive")
            blackHole(try await layer.receive(channels: ["websocket.receive"], timeout: .zero))
        }
    }

    Benchmark("in-memory layer sendGroup to 100 members") { benchmark in
        let layer = InMemoryChannelLayer(configuration: .init(capacity: 1_000_000))
        var members: [String] = []
        for _ in 0..<100 {
            let channel = try await layer.newChannel("websocket.send!")
            members.append(channel)
            try await layer.groupAdd("room", channel: channel)
        }
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            try await layer.sendGroup("room", message: receive)
        }
        benchmark.stopMeasurement()
        await layer.close()
    }

    if let url = ProcessInfo.processInfo.environment["REDIS_URL"] {
        Benchmark("Redis layer send + receive (one round trip each)") { benchmark in
            var configuration = try RedisChannelLayerConfiguration(urls: [url])
            configuration.prefix = "benchmark" + ChannelNames.randomLetters(6) + ":"
            let layer = try RedisChannelLayer(configuration: configuration)
            for _ in benchmark.scaledIterations {
                try await layer.send(receive, to: "bench.roundtrip")
                blackHole(try await layer.receive(channels: ["bench.roundtrip"], timeout: .seconds(5)))
            }
            await layer.close()
        }
    }
}
