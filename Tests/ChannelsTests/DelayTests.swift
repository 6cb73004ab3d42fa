import ASGI
import ChannelsRedis
import ChannelsTesting
import Foundation
import RedisChannelLayer
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
