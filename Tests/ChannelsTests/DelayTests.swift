import ASGI
import ChannelsRedis
import ChannelsTesting
import Foundation
import RedisChannelLayer
import TestSupport
import Testing

@testable import Channels

@Suite("delay server", .timeLimit(.minutes(2)))
struct DelayTests {
    @Test func deliversWhenDueNotBefore() async throws {
        let layer = InMemoryChannelLayer()
        let server = DelayServer(layer: layer, store: InMemoryDelayStore())
        let task = Task { await server.run() }
        let sent = Date()
        try await Channel("later").send(["n": 1], delay: .milliseconds(300), on: layer)
        try await Channel("later").send(["n": 0], delay: .milliseconds(100), on: layer)
        let first = try #require(try await layer.receive(channels: ["later"], timeout: .seconds(10)))
        let firstAt = Date().timeIntervalSince(sent)
        let second = try #require(try await layer.receive(channels: ["later"], timeout: .seconds(10)))
        let secondAt = Date().timeIntervalSince(sent)
        #expect(first.message == ["n": 0], "the shorter delay first")
        #expect(second.message == ["n": 1])
        #expect(firstAt >= 0.1 && secondAt >= 0.3, "never early")
        #expect(server.statistics.delivered == 2)
        server.stop()
        await task.value
    }

    @Test func malformedMessagesAreDroppedAndTheLoopGoesOn() async throws {
        let layer = InMemoryChannelLayer()
        let server = DelayServer(layer: layer, store: InMemoryDelayStore())
        let task = Task { await server.run() }
        let bad: [Message] = [
            [:], ["channel": "x"], ["channel": "bad name!!", "content": [:], "delay": 1],
            ["channel": "x", "content": "not a map", "delay": 1], ["channel": "x", "content": [:], "delay": -5],
            ["channel": "x", "content": [:], "delay": "soon"],
        ]
        for message in bad { try await layer.send(message, to: DelayServer.channel) }
        try await Channel("good").send(["ok": true], delay: .milliseconds(10), on: layer)
        let received = try #require(try await layer.receive(channels: ["good"], timeout: .seconds(10)))
        #expect(received.message == ["ok": true])
        #expect(server.statistics.malformed == bad.count)
        server.stop()
        await task.value
    }

    @Test func aFullChannelAtDeliveryIsRetriedASecondLater() async throws {
        let layer = InMemoryChannelLayer(configuration: .init(capacity: 1))
        let server = DelayServer(layer: layer, store: InMemoryDelayStore())
        let task = Task { await server.run() }
        try await layer.send(["blocker": true], to: "busy")
        try await Channel("busy").send(["late": true], delay: .milliseconds(10), on: layer)
        // Wait until the delivery was refused once, then free the channel.
        var refused = false
        for _ in 0..<100 where !refused {
            _ = try await layer.receive(channels: ["never-sent-to"], timeout: .milliseconds(50))
            refused = server.statistics.retriedFull > 0
        }
        #expect(refused)
        #expect(try await layer.receive(channels: ["busy"])?.message == ["blocker": true])
        let late = try #require(try await layer.receive(channels: ["busy"], timeout: .seconds(10)))
        #expect(late.message == ["late": true])
        server.stop()
        await task.value
        // Retried a second later: late by at least that second, counted from its first due time.
        #expect(server.statistics.delivered == 1)
        #expect(server.statistics.late == 1, "a retried delivery counts late")
    }

    @Test func aDeliveryPastLateAfterCountsLateAndOneOnTimeDoesNot() async throws {
        let layer = InMemoryChannelLayer()
        let store = InMemoryDelayStore()
        // One entry already 2 s overdue when the server starts (as after a delay server's outage).
        let content: Message = ["overdue": true]
        let envelope = MsgPackEncoder.encode(["channel": "out", "content": .map(content.fields)] as ASGIValue)
        try await store.schedule(envelope, due: DelayServer.nowMillis() - 2000)
        let server = DelayServer(layer: layer, store: store, lateAfter: .seconds(1))
        let task = Task { await server.run() }
        #expect(try await layer.receive(channels: ["out"], timeout: .seconds(10))?.message == ["overdue": true])
        server.stop()
        await task.value
        #expect(server.statistics.delivered == 1)
        #expect(server.statistics.late == 1)

        // A server that takes its entries on time counts none late (the bound is generous: 30 s).
        let punctual = DelayServer(layer: layer, store: InMemoryDelayStore(), lateAfter: .seconds(30))
        let again = Task { await punctual.run() }
        for n in 0..<5 { try await Channel("out").send(["n": .int(Int64(n))], delay: .milliseconds(20), on: layer) }
        for _ in 0..<5 { #expect(try await layer.receive(channels: ["out"], timeout: .seconds(10)) != nil) }
        punctual.stop()
        await again.value
        #expect(punctual.statistics.delivered == 5)
        #expect(punctual.statistics.late == 0)
    }

    /// A store whose clock is an hour ahead of this machine's (Redis's `TIME` on a host whose
    /// clock is off, or this host's): an entry another delay server scheduled for 200 ms from
    /// now on that clock is delivered in about 200 ms, not in an hour; one scheduled here too.
    @Test func dueTimesAreOnTheStoresClock() async throws {
        struct AheadStore: DelayStore {
            let base = InMemoryDelayStore()
            func schedule(_ entry: [UInt8], due: Int64) async throws { try await base.schedule(entry, due: due) }
            func takeDue(now: Int64, limit: Int) async throws -> [DueEntry] { try await base.takeDue(now: now, limit: limit) }
            func nextDue() async throws -> Int64? { try await base.nextDue() }
            func now() async throws -> Int64? { DelayServer.nowMillis() + 3_600_000 }
        }
        let layer = InMemoryChannelLayer()
        let store = AheadStore()
        let content: Message = ["from": "elsewhere"]
        let envelope = MsgPackEncoder.encode(["channel": "ahead", "content": .map(content.fields)] as ASGIValue)
        try await store.schedule(envelope, due: DelayServer.nowMillis() + 3_600_000 + 200)
        let server = DelayServer(layer: layer, store: store, lateAfter: .seconds(5))
        let task = Task { await server.run() }
        try await Channel("ahead").send(["from": "here"], delay: .milliseconds(100), on: layer)
        var got: [String] = []
        for _ in 0..<2 {
            if let received = try await layer.receive(channels: ["ahead"], timeout: .seconds(10)) {
                got.append(received.message["from"]?.stringValue ?? "?")
            }
        }
        server.stop()
        await task.value
        #expect(Set(got) == ["elsewhere", "here"], "\(got)")
        #expect(server.statistics.late == 0, "on time, on the store's clock")
    }

    @Test func theRedisStoreTakesDueEntriesWithTheirDueTimesOnce() async throws {
        let store = RedisDelayStore(client: try TestRedis.client(), key: "t" + ChannelNames.randomLetters(8) + "-delay")
        try await store.schedule([1, 2, 3], due: 1_000)
        try await store.schedule([4], due: 2_000)
        try await store.schedule([5], due: 9_000)
        #expect(try await store.nextDue() == 1_000)
        let taken = try await store.takeDue(now: 5_000, limit: 10)
        #expect(taken == [DueEntry(entry: [1, 2, 3], due: 1_000), DueEntry(entry: [4], due: 2_000)])
        #expect(try await store.takeDue(now: 5_000, limit: 10).isEmpty, "taken once")
        #expect(try await store.takeDue(now: 9_000, limit: 10) == [DueEntry(entry: [5], due: 9_000)])
        #expect(try await store.nextDue() == nil)
    }

    /// A delay server killed between its take and its sends: what it took and never finished
    /// is held until its lease lapses, then any take hands it out again (on the store's clock,
    /// here given as `now`); what it finished is gone. Before, a take removed the entries, and a
    /// kill lost up to a whole take of them.
    @Test func theRedisStoreHandsOutAgainWhatADeadTakerNeverFinished() async throws {
        let store = RedisDelayStore(
            client: try TestRedis.client(), key: "t" + ChannelNames.randomLetters(8) + "-delay", deliveryLease: .seconds(1))
        try await store.schedule([1], due: 1_000)
        try await store.schedule([2], due: 1_000)
        let taken = try await store.takeDue(now: 2_000, limit: 10)
        #expect(Set(taken.map(\.entry)) == [[1], [2]])
        try await store.finished(try #require(taken.first { $0.entry == [1] }))
        #expect(try await store.takeDue(now: 2_999, limit: 10).isEmpty, "held while its lease runs")
        let again = try await store.takeDue(now: 3_000, limit: 10)
        #expect(again.map(\.entry) == [[2]], "the unfinished one only")
        #expect(store.reclaimed == 1)
        try await store.finished(try #require(again.first))
        #expect(try await store.takeDue(now: 100_000, limit: 10).isEmpty, "nothing held or due")
        #expect(try await store.nextDue() == nil)
    }

    @Test func twoServersOnRedisSendEachMessageOnce() async throws {
        let prefix = "t" + ChannelNames.randomLetters(8) + ":"
        let key = String(prefix.dropLast()) + "-delay"
        var servers: [DelayServer] = []
        var layers: [RedisChannelLayer] = []
        for _ in 0..<2 {
            let layer = try TestRedis.layer(prefix: prefix, capacity: 1000)
            layers.append(layer)
            servers.append(DelayServer(layer: layer, store: RedisDelayStore(client: try TestRedis.client(), key: key)))
        }
        let tasks = servers.map { server in Task { await server.run() } }
        let sender = layers[0]
        let count = 40
        for n in 0..<count {
            try await Channel("delayed").send(["n": .int(Int64(n))], delay: .milliseconds(Int64(50 + (n % 5) * 40)), on: sender)
        }
        var seen: [Int64] = []
        while seen.count < count, let next = try await sender.receive(channels: ["delayed"], timeout: .seconds(10)) {
            seen.append(try next.message.int("n"))
        }
        #expect(seen.sorted() == (0..<Int64(count)).map { $0 }, "every message once")
        #expect(try await sender.receive(channels: ["delayed"], timeout: .milliseconds(300)) == nil, "and no duplicates")
        #expect(servers.map(\.statistics.delivered).reduce(0, +) == count)
        for server in servers { server.stop() }
        for task in tasks { await task.value }
        for layer in layers { await layer.close() }
    }
}
