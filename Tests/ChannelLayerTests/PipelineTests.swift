import ASGI
import Foundation
import Testing

@testable import RedisChannelLayer

/// Concurrent calls share round trips through the automatic pipeline; nothing may be lost,
/// duplicated or reordered for one sender, and capacity must hold exactly.
@Suite("automatic pipelining", .timeLimit(.minutes(2)))
struct PipelineTests {
    @Test func manyConcurrentSendersLoseNothingAndKeepEachSendersOrder() async throws {
        try await withLayer(.redis, capacity: 10_000) { layer in
            let senders = 50, each = 40
            try await withThrowingTaskGroup(of: Void.self) { group in
                for sender in 0..<senders {
                    group.addTask {
                        for n in 0..<each { try await layer.send(["s": .int(Int64(sender)), "n": .int(Int64(n))], to: "pipe.many") }
                    }
                }
                try await group.waitForAll()
            }
            var lastSeen = [Int64: Int64]()
            var count = 0
            while let got = try await layer.receive(channels: ["pipe.many"], timeout: .zero) {
                let s = try got.message.int("s"), n = try got.message.int("n")
                #expect(n == (lastSeen[s] ?? -1) + 1, "sender \(s) in order")
                lastSeen[s] = n
                count += 1
            }
            #expect(count == senders * each)
        }
    }

    @Test func capacityHoldsExactlyUnderConcurrentSends() async throws {
        try await withLayer(.redis, capacity: 5) { layer in
            let outcomes = try await withThrowingTaskGroup(of: Bool.self) { group in
                for n in 0..<40 {
                    group.addTask {
                        do {
                            try await layer.send(["n": .int(Int64(n))], to: "pipe.full")
                            return true
                        } catch let error as ChannelLayerError where error.code == .channelFull {
                            return false
                        }
                    }
                }
                return try await group.reduce(into: [Bool]()) { $0.append($1) }
            }
            #expect(outcomes.filter { $0 }.count == 5)
            #expect(try await layer.channelStatistics("pipe.full").channelFullCount == 35)
        }
    }
}
