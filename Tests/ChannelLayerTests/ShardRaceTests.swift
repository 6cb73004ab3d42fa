import ASGI
import Foundation
import Synchronization
import Testing

@testable import RedisChannelLayer

/// A blocking receive of a plain channel on several shards: senders spread such a channel
/// round-robin, so the wait must cover every shard at once, wake the waiters it no longer
/// needs, and keep whatever more than one of them popped.
@Suite("Redis layer: blocking receives across shards", .timeLimit(.minutes(2)))
struct ShardRaceTests {
    func layer(_ urls: [String], slice: Duration = .seconds(1)) throws -> RedisChannelLayer {
        var configuration = try RedisChannelLayerConfiguration(urls: urls)
        configuration.blockingSlice = slice
        return try RedisChannelLayer(configuration: configuration)
    }

    func calls(of command: String, on url: String) throws -> Int {
        let connection = try HiredisConnection(
            endpoint: RedisEndpoint(url: url), connectTimeout: .seconds(1), commandTimeout: .seconds(2))
        let info = try connection.command(["INFO", "commandstats"]).text ?? ""
        guard let line = info.split(whereSeparator: \.isNewline).first(where: { $0.hasPrefix("cmdstat_\(command):") }),
            let calls = line.split(separator: ",").first?.split(separator: "=").last
        else { return 0 }
        return Int(calls) ?? 0
    }

    @Test(
        "a message on either shard arrives at once while the receive waits, for receive and receiveBatch",
        arguments: [1, 4])
    func waitCoversEveryShard(max: Int) async throws {
        let a = try await RedisServer.launch(), b = try await RedisServer.launch()
        // One slice is the whole wait: a receive that waited on one shard only would return
        // nothing after 60 s when the message is on the other.
        let receiver = try layer([a.url, b.url], slice: .seconds(60))
        let sender = try layer([a.url, b.url])
        // The sender's round-robin puts these on shards 0, 0, 1 (a send to "elsewhere" takes
        // shard 1 in between): whichever shard a one-shard wait picked, one round misses.
        for (round, skip) in [false, true, false].enumerated() {
            let started = ContinuousClock.now
            let waiting = Task {
                max == 1
                    ? try await receiver.receive(channels: ["work"], timeout: .seconds(60)).map { [$0] } ?? []
                    : try await receiver.receiveBatch(channels: ["work"], max: max, timeout: .seconds(60))
            }
            try await Task.sleep(for: .milliseconds(200))  // let it block (the test passes either way if it has not yet)
            if skip { try await sender.send(["skip": 1], to: "elsewhere") }
            try await sender.send(["round": .int(Int64(round))], to: "work")
            let got = try await waiting.value
            let elapsed = ContinuousClock.now - started
            #expect(got.map(\.message) == [["round": .int(Int64(round))]], "round \(round)")
            // The waiter on the other shard was woken (CLIENT UNBLOCK), not waited out: the
            // call returned long before its 60 s slice.
            #expect(elapsed < .seconds(30), "round \(round) took \(elapsed): the other shard's waiter was not woken")
        }
        #expect(try calls(of: "client|unblock", on: a.url) + calls(of: "client|unblock", on: b.url) >= 1)
        await receiver.close()
        await sender.close()
        await a.shutdown()
        await b.shutdown()
    }

    @Test("racing shards loses and duplicates nothing: 600 messages from 3 senders, 2 receivers, 2 shards")
    func raceLosesNothing() async throws {
        let a = try await RedisServer.launch(), b = try await RedisServer.launch()
        let receivers = [try layer([a.url, b.url]), try layer([a.url, b.url])]
        let senders = [try layer([a.url, b.url]), try layer([a.url, b.url]), try layer([a.url, b.url])]
        let total = 600
        let received = try await withThrowingTaskGroup(of: [Int64].self) { group in
            for (index, receiver) in receivers.enumerated() {
                group.addTask {
                    var ids: [Int64] = []
                    var idle = 0
                    // Until three idle seconds in a row: every message has been taken by then.
                    while idle < 3 {
                        let batch =
                            index == 0
                            ? try await receiver.receiveBatch(channels: ["work"], max: 4, timeout: .seconds(1))
                            : try await receiver.receive(channels: ["work"], timeout: .seconds(1)).map { [$0] } ?? []
                        idle = batch.isEmpty ? idle + 1 : 0
                        ids += batch.compactMap { $0.message["id"]?.intValue }
                    }
                    return ids
                }
            }
            for (index, sender) in senders.enumerated() {
                group.addTask {
                    for i in 0..<(total / senders.count) {
                        try await sender.send(["id": .int(Int64(index * 1000 + i))], to: "work")
                        // Trickle, so receivers keep going back to a blocking wait.
                        if i % 10 == 0 { try await Task.sleep(for: .milliseconds(5)) }
                    }
                    return []
                }
            }
            var all: [Int64] = []
            for try await ids in group { all += ids }
            return all
        }
        #expect(received.count == total, "received \(received.count) of \(total)")
        #expect(Set(received).count == received.count, "\(received.count - Set(received).count) duplicates")
        for layer in receivers + senders { await layer.close() }
        await a.shutdown()
        await b.shutdown()
    }

    @Test("a server that refuses CLIENT (an ACL without it): receives rotate over the shards and still get everything")
    func refusedClientFallsBackToRotation() async throws {
        let acl: (Int) -> [String] = { _ in ["--user", "app", "on", ">secret", "~*", "&*", "+@all", "-client"] }
        let a = try await RedisServer.launch(arguments: acl), b = try await RedisServer.launch(arguments: acl)
        func url(_ server: RedisServer) -> String {
            server.url.replacingOccurrences(of: "redis://", with: "redis://app:secret@")
        }
        let receiver = try layer([url(a), url(b)])
        let sender = try layer([url(a), url(b)])
        for i in 0..<6 { try await sender.send(["i": .int(Int64(i))], to: "work") }
        var got: [Int64] = []
        while got.count < 6, let next = try await receiver.receive(channels: ["work"], timeout: .seconds(3)) {
            got.append(next.message["i"]?.intValue ?? -1)
        }
        #expect(got.sorted() == [0, 1, 2, 3, 4, 5])
        // Each wait looks at one shard; a message on the other is found on a later call.
        let lateID: Int64 = 99
        try await sender.send(["skip": 1], to: "elsewhere")
        try await sender.send(["i": .int(lateID)], to: "work")
        var late: Int64?
        for _ in 0..<4 where late == nil {
            late = try await receiver.receive(channels: ["work"], timeout: .seconds(2))?.message["i"]?.intValue
        }
        #expect(late == lateID)
        let refused = receiver.unblockRefused.load(ordering: .relaxed)
        #expect(refused, "the refusal was noticed")
        await receiver.close()
        await sender.close()
        await a.shutdown()
        await b.shutdown()
    }
}
