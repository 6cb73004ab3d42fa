import ASGI
import Foundation
import RedisChannelLayer

/// `channels-bench realtime REDIS_URL PREFIX`: the layer-side figures of presence and recovery,
/// on Redis and in memory: reading the 1,000 messages a socket missed (a history read after an
/// offset), and listing a group's 10,000 present connections. Leaves the Redis keys in place
/// (`<PREFIX>history:bench-rec`, `<PREFIX>presence:bench-presence`) for the script's raw-Redis
/// reference. Prints one JSON object.
enum RealtimeBench {
    static func main(url: String, prefix: String) async throws {
        var configuration = try RedisChannelLayerConfiguration(urls: [url])
        configuration.prefix = prefix
        let redis = try RedisChannelLayer(configuration: configuration)
        let memory = InMemoryChannelLayer()
        var out: [String: Double] = [:]
        for (name, layer) in [("redis", redis as any ChannelLayer), ("memory", memory)] {
            out["recovery_1000_ms_" + name] = try await recovery(layer as! any ChannelLayerHistory)
            out["presence_list_10000_ms_" + name] = try await presence(layer as! any ChannelLayerPresence)
        }
        await redis.close()
        let data = try JSONSerialization.data(withJSONObject: out, options: [.sortedKeys])
        print(String(decoding: data, as: UTF8.self))
    }

    /// 1,001 messages of about 200 bytes; the median time of 20 reads of the last 1,000.
    static func recovery(_ layer: any ChannelLayerHistory) async throws -> Double {
        let keep = HistoryRetention(size: 2000, ttl: .seconds(600))
        let text = "{\"type\":\"message\",\"user\":\"someone\",\"text\":\"" + String(repeating: "x", count: 150) + "\"}"
        var first = StreamPosition(offset: 0, epoch: "")
        for i in 0...1000 {
            let position = try await layer.historyAppend("bench-rec", message: ["data": .string(text)], retention: keep)
            if i == 0 { first = position }
        }
        var times: [Double] = []
        for _ in 0..<20 {
            let start = ContinuousClock.now
            let slice = try await layer.historyRead("bench-rec", after: first, retention: keep)
            times.append(milliseconds(ContinuousClock.now - start))
            precondition(slice.entries.count == 1000 && slice.complete, "read \(slice.entries.count) entries")
        }
        return median(times)
    }

    /// 10,000 connections of 10,000 users joined (16 at a time); the median time of 20 lists.
    static func presence(_ layer: any ChannelLayerPresence) async throws -> Double {
        try await withThrowingTaskGroup(of: Void.self) { group in
            for lane in 0..<16 {
                group.addTask {
                    for i in stride(from: lane, to: 10_000, by: 16) {
                        _ = try await layer.presenceJoin(
                            "bench-presence", connection: "server!c\(i)", user: "user-\(i)", meta: "{}", ttl: .seconds(600))
                    }
                }
            }
            try await group.waitForAll()
        }
        var times: [Double] = []
        for _ in 0..<20 {
            let start = ContinuousClock.now
            let members = try await layer.presenceList("bench-presence")
            times.append(milliseconds(ContinuousClock.now - start))
            precondition(members.count == 10_000, "listed \(members.count)")
        }
        return median(times)
    }

    static func milliseconds(_ d: Duration) -> Double {
        Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15
    }

    static func median(_ values: [Double]) -> Double {
        let sorted = values.sorted()
        return (sorted[sorted.count / 2] * 100).rounded() / 100
    }
}
