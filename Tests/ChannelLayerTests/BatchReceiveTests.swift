import ASGI
import Foundation
import Testing

@testable import RedisChannelLayer

@Suite("batch receive", .timeLimit(.minutes(2)))
struct BatchReceiveTests {
    @Test(arguments: LayerKind.allCases)
    func batchesKeepOrderAndFullNames(_ kind: LayerKind) async throws {
        try await withLayer(kind, capacity: 100) { layer in
            for i in 0..<10 { try await layer.send(["n": .int(Int64(i))], to: "reply.abc!conn\(i % 3)") }
            var seen: [ReceivedMessage] = []
            var batches = 0
            while seen.count < 10 {
                let batch = try await layer.receiveBatch(channels: ["reply.abc!"], max: 4, timeout: .seconds(2))
                #expect(!batch.isEmpty && batch.count <= 4)
                seen += batch
                batches += 1
            }
            #expect(seen.map { $0.message["n"]?.intValue ?? -1 } == Array(0..<10), "FIFO across batches")
            #expect(seen.map(\.channel) == (0..<10).map { "reply.abc!conn\($0 % 3)" }, "full names restored")
            #expect(batches >= 3)
            #expect(try await layer.receiveBatch(channels: ["reply.abc!"], max: 4, timeout: .zero).isEmpty)
        }
    }

    /// A flood on one channel (a storm of disconnects) does not take every batch: each channel
    /// with messages waiting gets its share, and a batch keeps the channels' order.
    @Test(arguments: LayerKind.allCases)
    func aFloodOnOneChannelDoesNotTakeEveryBatch(_ kind: LayerKind) async throws {
        try await withLayer(kind, capacity: 500) { layer in
            for i in 0..<200 { try await layer.send(["n": .int(Int64(i))], to: "fair.flood") }
            for i in 0..<5 { try await layer.send(["n": .int(Int64(1000 + i))], to: "fair.trickle") }
            let channels = ["fair.flood", "fair.trickle"]
            let batch = try await layer.receiveBatch(channels: channels, max: 10, timeout: .zero)
            #expect(batch.count == 10)
            #expect(batch.filter { $0.channel == "fair.trickle" }.count == 5, "the trickle got its half of the batch")
            let flood = batch.filter { $0.channel == "fair.flood" }.compactMap { $0.message["n"]?.intValue }
            #expect(flood == flood.sorted() && flood.count == 5, "each channel's messages in queue order")
            #expect(batch.map(\.channel) == Array(repeating: "fair.flood", count: 5) + Array(repeating: "fair.trickle", count: 5))
            // The trickle is dry: the flood fills the batch.
            let next = try await layer.receiveBatch(channels: channels, max: 10, timeout: .zero)
            #expect(next.map(\.channel) == Array(repeating: "fair.flood", count: 10))
        }
    }

    /// A connection's last message (`*.disconnect`) gets no share of a batch: a disconnect is
    /// not taken while connects queued before it wait (a storm's connects, then one socket's
    /// disconnect: taken before its connect, it would leave a ghost group member), only into
    /// the room the other channels leave.
    @Test(arguments: LayerKind.allCases)
    func disconnectsFillOnlyTheRoomTheOthersLeave(_ kind: LayerKind) async throws {
        try await withLayer(kind, capacity: 500) { layer in
            for i in 0..<20 { try await layer.send(["n": .int(Int64(i))], to: "fair.connect") }
            for i in 0..<3 { try await layer.send(["n": .int(Int64(i))], to: "fair.receive") }
            for i in 0..<5 { try await layer.send(["n": .int(Int64(i))], to: "fair.disconnect") }
            // As a worker lists them: its own wake channel after the disconnects.
            let channels = ["fair.connect", "fair.receive", "fair.disconnect", "fair.wake!"]
            var batches: [[String: Int]] = []
            for _ in 0..<3 {
                let batch = try await layer.receiveBatch(channels: channels, max: 10, timeout: .zero)
                batches.append(Dictionary(grouping: batch, by: \.channel).mapValues(\.count))
            }
            #expect(batches[0] == ["fair.connect": 7, "fair.receive": 3], "no disconnect while connects wait")
            #expect(batches[1] == ["fair.connect": 10])
            #expect(batches[2] == ["fair.connect": 3, "fair.disconnect": 5], "the room the connects leave")
            // Only disconnects: they share as any channel does.
            for i in 0..<4 { try await layer.send(["n": .int(Int64(i))], to: "fair.disconnect") }
            #expect(try await layer.receiveBatch(channels: ["fair.disconnect"], max: 10, timeout: .zero).count == 4)
        }
    }

    /// The ordering gate's look at many wait channels: counts in one call, nothing taken.
    @Test(arguments: LayerKind.allCases)
    func pendingCountsCountWithoutTaking(_ kind: LayerKind) async throws {
        try await withLayer(kind, capacity: 100) { layer in
            for i in 0..<2 { try await layer.send(["n": .int(Int64(i))], to: "pending.a") }
            try await layer.send(["n": 9], to: "pending.c")
            try await layer.send(["n": 7], to: "pending.reply!x")
            let counts = try await layer.messagesPending(in: ["pending.a", "pending.b", "pending.c", "pending.reply!"])
            #expect(counts == [2, 0, 1, 1])
            #expect(try await layer.messagesPending(in: []) == [])
            let batch = try await layer.receiveBatch(channels: ["pending.a", "pending.c"], max: 10, timeout: .zero)
            #expect(batch.count == 3, "nothing was taken by the count")
            #expect(try await layer.messagesPending(in: ["pending.a", "pending.c"]) == [0, 0])
        }
    }

    @Test(arguments: LayerKind.allCases)
    func anIdleBatchReceiveWaitsThenTakesWhatQueued(_ kind: LayerKind) async throws {
        try await withLayer(kind, capacity: 100) { layer in
            let sender = Task {
                try await Task.sleep(for: .milliseconds(150))
                for i in 0..<3 { try await layer.send(["n": .int(Int64(i))], to: "batch.idle") }
            }
            var got: [Int64] = []
            while got.count < 3 {
                let batch = try await layer.receiveBatch(channels: ["batch.idle"], max: 10, timeout: .seconds(5))
                #expect(!batch.isEmpty, "a message arrived within the timeout")
                if batch.isEmpty { break }
                got += batch.compactMap { $0.message["n"]?.intValue }
            }
            try await sender.value
            #expect(got == [0, 1, 2])
            let start = ContinuousClock.now
            #expect(try await layer.receiveBatch(channels: ["batch.idle"], max: 10, timeout: .milliseconds(300)).isEmpty)
            #expect(ContinuousClock.now - start >= .milliseconds(250), "it waited for the timeout")
        }
    }

    /// A batch receive that waits (nothing was flowing) and is woken on one channel takes what
    /// waits on the others in the same call: the take behind the `BLPOP` looks at every channel,
    /// so a worker woken by one message runs it without a look that finds nothing first.
    @Test(arguments: LayerKind.allCases)
    func aWaitWokenOnOneChannelTakesTheOthersToo(_ kind: LayerKind) async throws {
        try await withLayer(kind, capacity: 100) { layer in
            let channels = ["woke.a", "woke.b", "woke.c"]
            for (i, channel) in channels.enumerated() {
                for j in 0..<2 { try await layer.send(["n": .int(Int64(10 * i + j))], to: channel) }
            }
            let batch = try await layer.receiveBatch(channels: channels, max: 10, timeout: .seconds(2))
            #expect(batch.count == 6, "every channel's messages in the first batch: \(batch.map(\.channel))")
            for (i, channel) in channels.enumerated() {
                let numbers: [Int64] = batch.filter { $0.channel == channel }.compactMap { $0.message["n"]?.intValue }
                let expected: [Int64] = [Int64(10 * i), Int64(10 * i + 1)]
                #expect(numbers == expected)
            }
            #expect(try await layer.receiveBatch(channels: channels, max: 10, timeout: .zero).isEmpty)
            // A smaller batch takes its share of each, the popped message first among them.
            for (i, channel) in channels.enumerated() {
                for j in 0..<3 { try await layer.send(["n": .int(Int64(10 * i + j))], to: channel) }
            }
            var seen: [ReceivedMessage] = []
            while seen.count < 9 {
                let next = try await layer.receiveBatch(channels: channels, max: 4, timeout: .seconds(2))
                #expect(!next.isEmpty && next.count <= 4)
                seen += next
            }
            for (i, channel) in channels.enumerated() {
                let numbers: [Int64] = seen.filter { $0.channel == channel }.compactMap { $0.message["n"]?.intValue }
                let expected: [Int64] = (0..<3).map { Int64(10 * i + $0) }
                #expect(numbers == expected)
            }
        }
    }

    /// The wait pops from its lists in a random order: a disconnect it popped still comes after
    /// the frames taken with it (in its list's place, disconnects last), as in a look's batch.
    @Test(arguments: LayerKind.allCases)
    func aDisconnectTheWaitPoppedComesAfterTheFramesTakenWithIt(_ kind: LayerKind) async throws {
        try await withLayer(kind, capacity: 100) { layer in
            let channels = ["woke2.receive", "woke2.disconnect"]
            for round in 0..<16 {
                try await layer.send(["n": .int(Int64(round))], to: "woke2.disconnect")
                try await layer.send(["n": .int(Int64(round))], to: "woke2.receive")
                let batch = try await layer.receiveBatch(channels: channels, max: 10, timeout: .seconds(2))
                #expect(batch.map(\.channel) == channels, "round \(round): \(batch.map(\.channel))")
            }
        }
    }
}
