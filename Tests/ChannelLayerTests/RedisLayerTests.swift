import ASGI
import Foundation
import NIOCore
import NIOPosix
import Synchronization
import TestSupport
import Testing

@testable import RedisChannelLayer

@Suite("Redis layer", .timeLimit(.minutes(2)))
struct RedisLayerTests {
    func layer(url: String? = nil, prefix: String = TestRedis.uniquePrefix()) throws -> RedisChannelLayer {
        var configuration = try RedisChannelLayerConfiguration(urls: [try url ?? TestRedis.requireURL()])
        configuration.prefix = prefix
        configuration.statsPrefix = String(prefix.dropLast()) + "-meta:"
        return try RedisChannelLayer(configuration: configuration)
    }

    /// A layer under a prefix of its own on the test Redis, flushed and closed after `body`
    /// (which gets the layer, the Redis URL and the prefix).
    func withPrefixedLayer(_ body: (RedisChannelLayer, String, String) async throws -> Void) async throws {
        let url = try TestRedis.requireURL()
        let prefix = TestRedis.uniquePrefix()
        try await flushingAfter(try layer(prefix: prefix)) { try await body($0, url, prefix) }
    }

    func raw(_ url: String) throws -> HiredisConnection {
        try HiredisConnection(endpoint: RedisEndpoint(url: url), connectTimeout: .seconds(1), commandTimeout: .seconds(2))
    }

    /// A run ends before a message the layer refuses (too large, or with the reserved key): the
    /// ones before it are stored, it is thrown when it comes first; a run of one is a send.
    @Test("a run stops before a message the layer refuses (thrown when it comes first); a receipt stores a run once")
    func aRunStopsBeforeARefusedMessage() async throws {
        try await withPrefixedLayer { layer, url, prefix in
            let large: Message = ["blob": .bytes([UInt8](repeating: 7, count: layer.maxMessageSize + 1))]
            let run: [Message] = [["n": 0], ["n": 1], large, ["n": 3]]
            #expect(try await layer.send(run, to: "runs.refused") == 2)
            await #expect(throws: ChannelLayerError.self) { _ = try await layer.send(Array(run[2...]), to: "runs.refused") }
            #expect(try await layer.send(Array(run[3...]), to: "runs.refused") == 1)
            let reserved: [Message] = [["n": 4], [asgiChannelKey: "x"]]
            #expect(try await layer.send(reserved, to: "runs.refused") == 1)
            let taken = try await layer.receiveBatch(channels: ["runs.refused"], max: 10, timeout: .seconds(1))
            #expect(taken.map { $0.message["n"]?.intValue ?? -1 } == [0, 1, 3, 4])
            #expect(try await layer.send([], to: "runs.refused") == 0)
            // A receipt: the same run again (its first reply lost) stores nothing, and answers
            // what the first stored, also once the messages were taken; the holder's next run
            // is stored (one receipt key per holder: its last run's).
            let again: [Message] = [["n": 10], ["n": 11], ["n": 12]]
            let first = RunReceipt(holder: "h1", number: 1)
            #expect(try await layer.send(again, to: "runs.receipt", receipt: first) == 3)
            #expect(try await layer.send(again, to: "runs.receipt", receipt: first) == 3)
            #expect(try await layer.receiveBatch(channels: ["runs.receipt"], max: 10, timeout: .seconds(1)).count == 3)
            #expect(try await layer.send(again, to: "runs.receipt", receipt: first) == 3)
            let second = RunReceipt(holder: "h1", number: 2)
            #expect(try await layer.send(Array(again.prefix(1)), to: "runs.receipt", receipt: second) == 1, "a run of one with a receipt")
            #expect(try await layer.send(Array(again.prefix(1)), to: "runs.receipt", receipt: second) == 1)
            #expect(try await layer.send(Array(again.suffix(2)), to: "runs.receipt", receipt: RunReceipt(holder: "h2", number: 2)) == 2)
            let once = try await layer.receiveBatch(channels: ["runs.receipt"], max: 10, timeout: .milliseconds(200))
            #expect(once.map { $0.message["n"]?.intValue ?? -1 } == [10, 11, 12], "each run stored once")
            let receipts = try raw(url).command(["KEYS", prefix + "run:*"])
            #expect(receipts.array?.count == 2, "one receipt key per holder: \(receipts)")
            // Large bodies: a run carries up to 256 KiB of them (the first always goes).
            let big: [Message] = (0..<6).map { ["n": .int(Int64($0)), "blob": .bytes([UInt8](repeating: 1, count: 100_000))] }
            #expect(try await layer.send(big, to: "runs.large") == 2)
            #expect(try await layer.send(Array(big[2...]), to: "runs.large") == 2)
            let inOrder = try await layer.receiveBatch(channels: ["runs.large"], max: 10, timeout: .seconds(1))
            #expect(inOrder.map { $0.message["n"]?.intValue ?? -1 } == [0, 1, 2, 3])
        }
    }

    /// The layer's connections have Nagle's algorithm off, given at the TCP level: at the socket
    /// level the option's number is `SO_DEBUG`, which every connection had been put in instead.
    /// (Other tests' raw hiredis connections to the same Redis never set `SO_DEBUG` either.)
    @Test("the layer's connections to Redis are no-delay, not debug")
    func connectionsAreNoDelay() async throws {
        try await withPrefixedLayer { layer, url, _ in
            try await layer.send(Cases.response, to: "daphne.response.AbCdEfGhIj!KlMnOpQrSt")
            let redisPort = try RedisEndpoint(url: url).port
            let toRedis = OwnSockets.all().filter { $0.peerPort == redisPort }
            #expect(!toRedis.isEmpty, "no connection to Redis found")
            let debug = toRedis.filter { OwnSockets.debugFlag($0.descriptor) == true }
            #expect(debug.isEmpty, "\(debug.count) of \(toRedis.count) connections to Redis have SO_DEBUG set")
            #expect(toRedis.contains { OwnSockets.noDelay($0.descriptor) == true })
        }
    }

    @Test("the stored layout is asgi_redis's: body string with TTL, list of body keys, group zset")
    func layout() async throws {
        try await withPrefixedLayer { layer, url, prefix in
            try await layer.send(Cases.response, to: "daphne.response.AbCdEfGhIj!KlMnOpQrSt")
            let redis = try raw(url)
            let list = try redis.command(["LRANGE", prefix + "daphne.response.AbCdEfGhIj!", "0", "-1"])
            let bodyKey = try #require(list.array?.first?.text)
            #expect(bodyKey.hasPrefix(prefix))
            let hexPart = bodyKey.dropFirst(prefix.count)
            #expect(hexPart.count == 32 && hexPart.allSatisfy { "0123456789abcdef".contains($0) })
            let body = try #require(try redis.command(["GET", bodyKey]).bytes)
            // The SPEC's example: the message, then __asgi_channel__ with the full name.
            let expected = "84a6737461747573ccc8a76865616465727390a7636f6e74656e74c4026869ac6d6f72655f636f6e74656e74c2"
            #expect(hex(body).hasPrefix("85" + expected.dropFirst(2)))
            #expect(
                hex(body).hasSuffix(
                    "b0" + hex(Array("__asgi_channel__".utf8)) + "d925" + hex(Array("daphne.response.AbCdEfGhIj!KlMnOpQrSt".utf8))))
            let ttl = try redis.command(["TTL", bodyKey]).integer ?? -1
            #expect(ttl > 30 && ttl <= 60)
            let listTTL = try redis.command(["TTL", prefix + "daphne.response.AbCdEfGhIj!"]).integer ?? -1
            #expect(listTTL > 31 && listTTL <= 61)

            try await layer.groupAdd("chat-lobby", channel: "daphne.response.X!y")
            let members = try redis.command(["ZRANGE", prefix + ":group:chat-lobby", "0", "-1", "WITHSCORES"])
            let pair = try #require(members.array)
            #expect(pair.first?.text == "daphne.response.X!y")
            let score = Double(pair.last?.text ?? "") ?? 0
            #expect(abs(score - Date().timeIntervalSince1970) < 5)
            let count = try redis.command(["GET", String(prefix.dropLast()) + "-meta:daphne.response.AbCdEfGhIj!:messages_count"])
            #expect(count.text == "1")
        }
    }

    @Test("a socket's per-order wait channels count under its one wait channel: one pair of statistics keys, not one per order")
    func waitChannelStatisticsStayOnePair() async throws {
        try await withPrefixedLayer { layer, url, prefix in
            let wait = CapacityTable.waitChannelPrefix + "0123456789abcdef0123456789abcdef01234567"
            for order in 1...20 { try await layer.send(["order": .int(Int64(order))], to: wait + ".\(order)") }
            let redis = try raw(url)
            let meta = String(prefix.dropLast()) + "-meta:"
            #expect(try redis.command(["GET", meta + wait + ":messages_count"]).text == "20")
            let perOrder = try redis.command(["KEYS", meta + wait + ".*"]).array ?? []
            #expect(perOrder.isEmpty, "statistics keys per order: \(perOrder.count)")
            // Each order's message is where it was parked.
            #expect(try await layer.receive(channels: [wait + ".7"])?.message["order"] == 7)
        }
    }

    @Test("received bodies are deleted: DBSIZE does not grow")
    func bodiesDeleted() async throws {
        // A database of its own, so parallel tests do not move DBSIZE.
        let base = try TestRedis.requireURL()
        let url = base.replacingOccurrences(of: #"/\d+$"#, with: "", options: .regularExpression) + "/7"
        let layer = try layer(url: url)
        let redis = try raw(url)
        _ = try redis.command(["FLUSHDB"])
        try await layer.send(["a": 1], to: "dbsize")
        _ = try await layer.receive(channels: ["dbsize"])
        let before = try redis.command(["DBSIZE"]).integer ?? -1
        for i in 0..<50 {
            try await layer.send(["i": .int(Int64(i))], to: "dbsize")
            _ = try #require(try await layer.receive(channels: ["dbsize"], timeout: i % 2 == 0 ? .zero : .seconds(1)))
        }
        let after = try redis.command(["DBSIZE"]).integer ?? -2
        #expect(after == before)
        _ = try redis.command(["FLUSHDB"])
        await layer.close()
    }

    @Test("a body that is not msgpack is counted and skipped; the receive goes on", arguments: [false, true])
    func malformedBodies(blocking: Bool) async throws {
        let url = try TestRedis.requireURL()
        let prefix = TestRedis.uniquePrefix()
        let layer = try layer(prefix: prefix)
        let redis = try raw(url)
        for (i, garbage) in [[0xc1], [0x92, 0x01], Array("not msgpack".utf8), [0x81, 0xa1]].enumerated() {
            _ = try redis.command([Array("SET".utf8), Array("\(prefix)garbage\(i)".utf8), garbage.map { UInt8($0) }])
            _ = try redis.command(["RPUSH", prefix + "mixed", "\(prefix)garbage\(i)"])
        }
        try await layer.send(["good": true], to: "mixed")
        let got = try #require(try await layer.receive(channels: ["mixed"], timeout: blocking ? .seconds(5) : .zero))
        #expect(got.message == ["good": true])
        #expect(try await layer.globalStatistics().malformedMessagesDropped == 4)
        try await layer.flush()
        await layer.close()
    }

    @Test("an expired body is skipped and the next message returned")
    func expiredBody() async throws {
        let url = try TestRedis.requireURL()
        let prefix = TestRedis.uniquePrefix()
        let layer = try layer(prefix: prefix)
        _ = try raw(url).command(["RPUSH", prefix + "exp", prefix + "gone-body"])
        try await layer.send(["after": 1], to: "exp")
        #expect(try await layer.receive(channels: ["exp"])?.message == ["after": 1])
        _ = try raw(url).command(["RPUSH", prefix + "exp", prefix + "gone-body"])
        try await layer.send(["after": 2], to: "exp")
        #expect(try await layer.receive(channels: ["exp"], timeout: .seconds(1))?.message == ["after": 2])
        try await layer.flush()
        await layer.close()
    }

    @Test(
        "a blocking take of one list moves the key in hand and takes it in the same round trip; what a dead reader left in hand comes first"
    )
    func blockingTakeInHand() async throws {
        let url = try TestRedis.requireURL()
        let prefix = TestRedis.uniquePrefix()
        let layer = try layer(prefix: prefix)
        let redis = try raw(url)
        func blmoveCalls() throws -> Int {
            let info = String(decoding: try redis.command(["INFO", "commandstats"]).bytes ?? [], as: UTF8.self)
            guard let line = info.split(separator: "\r\n").first(where: { $0.hasPrefix("cmdstat_blmove:") }),
                let calls = line.split(separator: "=").dropFirst().first?.split(separator: ",").first
            else { return 0 }
            return Int(calls) ?? 0
        }
        /// A reader whose connection died between its move and its take left a body in hand.
        func leaveInHand(_ n: Int) throws {
            _ = try redis.command([
                Array("SET".utf8), Array((prefix + "left-\(n)").utf8), MsgPackEncoder.encode(["left": .int(Int64(n))] as Message),
            ])
            _ = try redis.command(["RPUSH", prefix + "held:inhand", prefix + "left-\(n)"])
        }
        try leaveInHand(0)
        // An operator's list of channels with waiting messages shows it.
        #expect(try await layer.pendingChannels() == ["held:inhand"])
        // A look without waiting takes it.
        #expect(try await layer.receiveBatch(channels: ["held"], max: 8, timeout: .zero).map(\.message) == [["left": 0]])
        try leaveInHand(1)
        let before = try blmoveCalls()
        let sender = Task {
            try await Task.sleep(for: .milliseconds(300))
            try await layer.send(["n": 1], to: "held")
        }
        var got: [Message] = []
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(5)
        while got.count < 2, clock.now < deadline {
            got += try await layer.receiveBatch(channels: ["held"], max: 8, timeout: .seconds(2)).map(\.message)
        }
        try await sender.value
        #expect(got == [["left": 1], ["n": 1]], "the message left in hand first, then the new one, each once")
        #expect(try blmoveCalls() > before, "the wait was a BLMOVE")
        #expect(try redis.command(["EXISTS", prefix + "held:inhand"]).integer == 0, "nothing left in hand")
        #expect(try redis.command(["EXISTS", prefix + "left-1"]).integer == 0, "the body taken is deleted")
        try await layer.flush()
        await layer.close()
    }

    /// Every connection makes one round trip before its first command (a `PING` when there is
    /// no `AUTH` or `SELECT` to send). Any reply will do: a default user whose ACL does not grant
    /// `PING` still gets a working layer, as with asgi_redis, which sends nothing at connect.
    @Test("a default user whose ACL refuses PING still connects: the connect-time round trip takes any reply")
    func aRefusedPingStillConnects() async throws {
        let server = try await RedisServer.launch()
        defer { Task { await server.shutdown() } }
        let admin = try raw(server.url)
        guard case .status = try admin.command(["ACL", "SETUSER", "default", "-ping"]) else {
            Issue.record("this Redis has no ACL (older than 6): a refused PING is not tested")
            return
        }
        #expect(try admin.command(["PING"]).errorMessage?.hasPrefix("NOPERM") == true, "PING is refused now")
        let layer = try layer(url: server.url)
        try await layer.send(["n": 1], to: "acl.ping")
        let got = try await layer.receive(channels: ["acl.ping"], timeout: .seconds(2))
        #expect(got?.message["n"]?.intValue == 1)
        await layer.close()
    }

    /// The take is pipelined behind the move: when Redis refuses the move (an ACL without
    /// `BLMOVE` here; out of memory, or a Redis older than 6.2, the same way), the take behind
    /// it must not take the waiting messages (their keys would be thrown away with the refusal).
    @Test("a move Redis refuses (an ACL without BLMOVE) falls back to BLPOP and loses nothing")
    func aRefusedMoveFallsBackAndLosesNothing() async throws {
        let url = try TestRedis.requireURL()
        let redis = try raw(url)
        let user = "nomove" + ChannelNames.randomLetters(8)
        let password = ChannelNames.randomLetters(16)
        guard case .status = try redis.command(["ACL", "SETUSER", user, "on", ">" + password, "~*", "&*", "+@all", "-blmove"]) else {
            Issue.record("this Redis has no ACL (older than 6): the refused move is not tested")
            return
        }
        defer { _ = try? redis.command(["ACL", "DELUSER", user]) }
        var parts = try #require(URLComponents(string: url))
        parts.user = user
        parts.password = password
        let prefix = TestRedis.uniquePrefix()
        let layer = try layer(url: parts.string, prefix: prefix)
        // The script known, so the first blocking take goes straight to the pipelined move.
        _ = try await Scripts.takeInHand.run(
            on: layer.shared(0), keys: [.text(prefix + "acl:inhand"), .text(prefix + "acl")], args: [0, "0", 60])
        for n in 0..<3 { try await layer.send(["n": .int(Int64(n))], to: "acl") }
        var got: [Int64] = []
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(5)
        while got.count < 3, clock.now < deadline {
            got += try await layer.receiveBatch(channels: ["acl"], max: 8, timeout: .seconds(1)).compactMap { $0.message["n"]?.intValue }
        }
        #expect(got == [0, 1, 2], "every message once, in order, through BLPOP")
        let refused = layer.moveRefused.load(ordering: .relaxed)
        #expect(refused, "later takes use BLPOP")
        try await layer.flush()
        await layer.close()
    }

    @Test("flush removes only this layer's keys, with SCAN")
    func flushIsScoped() async throws {
        let url = try TestRedis.requireURL()
        let mine = try layer()
        let other = try layer()
        try await mine.send(["a": 1], to: "scoped")
        try await other.send(["a": 1], to: "scoped")
        try await mine.flush()
        #expect(try await mine.receive(channels: ["scoped"]) == nil)
        #expect(try await other.receive(channels: ["scoped"]) != nil)
        _ = url
        try await other.flush()
        await mine.close()
        await other.close()
    }

    @Test("shard placement follows the SPEC vectors")
    func shardingVectors() {
        #expect(Sharding.crc32("http.request".utf8) & 0xfff == 2906)
        #expect([2, 3, 5, 7].map { Sharding.shard("http.request", hostCount: $0) } == [1, 2, 3, 4])
        #expect(Sharding.crc32("tgroup".utf8) & 0xfff == 3500)
        #expect([2, 3, 5, 7].map { Sharding.shard("tgroup", hostCount: $0) } == [1, 2, 4, 5])
        #expect(Sharding.crc32("daphne.response.AbCdEfGhIj!".utf8) & 0xfff == 682)
        #expect([2, 3, 5, 7].map { Sharding.shard("daphne.response.AbCdEfGhIj!", hostCount: $0) } == [0, 0, 0, 1])
    }

    @Test("URLs: password, database, options")
    func urls() throws {
        let endpoint = try RedisEndpoint(url: "redis://:s%40cret@example:6380/3")
        #expect(endpoint.host == "example" && endpoint.port == 6380 && endpoint.database == 3 && endpoint.password == "s@cret")
        let configuration = try RedisChannelLayerConfiguration(urls: [
            "redis://h:1/0?expiry=5&capacity=7&capacity.http.*=9&prefix=x:&stats_prefix=y:"
        ])
        #expect(configuration.expiry == .seconds(5) && configuration.capacity == 7 && configuration.prefix == "x:")
        #expect(configuration.statsPrefix == "y:")
        #expect(configuration.channelCapacities.first?.0 == "http.*" && configuration.channelCapacities.first?.1 == 9)
        #expect(throws: ChannelLayerError.self) { try RedisEndpoint(url: "http://x") }
        #expect(throws: ChannelLayerError.self) { try RedisEndpoint(url: "redis://h:notaport") }
        #expect(throws: ChannelLayerError.self) { try RedisChannelLayerConfiguration(urls: ["redis://h?bogus=1"]) }
    }

    @Test("a dead Redis gives connectionLost")
    func deadRedis() async throws {
        let (fd, port) = try RedisServer.boundPort()
        defer { close(fd) }
        let layer = try RedisChannelLayer(urls: ["redis://127.0.0.1:\(port)/0"])
        await #expect { try await layer.send(["a": 1], to: "x") } throws: { ($0 as? ChannelLayerError)?.code == .connectionLost }
        await #expect { try await layer.receive(channels: ["x"], timeout: .seconds(1)) } throws: {
            ($0 as? ChannelLayerError)?.code == .connectionLost
        }
        await layer.close()
    }

    @Test(
        "a server that accepts but never answers: the call fails with connectionLost after the command timeout",
        .timeLimit(.minutes(1)))
    func silentServer() async throws {
        let (fd, port) = try RedisServer.boundPort()
        defer { close(fd) }
        #expect(listen(fd, 16) == 0)
        var configuration = try RedisChannelLayerConfiguration(urls: ["redis://127.0.0.1:\(port)/0"])
        configuration.commandTimeout = .milliseconds(300)
        let layer = try RedisChannelLayer(configuration: configuration)
        let started = ContinuousClock.now
        // Concurrent calls share the one connection; the stuck reply fails them all.
        async let first: Void = layer.send(["a": 1], to: "x")
        async let second: Void = layer.send(["b": 2], to: "y")
        do {
            try await first
            Issue.record("a send to a silent server succeeded")
        } catch {
            #expect((error as? ChannelLayerError)?.code == .connectionLost, "\(error)")
        }
        do {
            try await second
            Issue.record("a send to a silent server succeeded")
        } catch {
            #expect((error as? ChannelLayerError)?.code == .connectionLost, "\(error)")
        }
        let elapsed = ContinuousClock.now - started
        #expect(elapsed >= .milliseconds(250), "failed before the timeout: \(elapsed)")
        // A bound that only a timeout that never fired can miss (a loaded machine is slow, not stuck).
        #expect(elapsed < .seconds(20), "the timeout did not fire: \(elapsed)")
        await layer.close()
    }

    @Test(
        "a call on a connection that has already closed fails at once instead of waiting forever",
        .timeLimit(.minutes(1)))
    func callAfterClose() async throws {
        let endpoint = try RedisEndpoint(url: try TestRedis.requireURL())
        let connection = try await RedisConnection.connect(
            to: endpoint, on: MultiThreadedEventLoopGroup.singleton.next(),
            connectTimeout: .seconds(2), commandTimeout: .seconds(30))
        #expect(try await connection.command(["PING"]).text == "PONG")
        connection.close()
        try await connection.closeFuture.get()
        let started = ContinuousClock.now
        await #expect { _ = try await connection.command(["PING"]) } throws: { error in
            (error as? ChannelLayerError)?.code == .connectionLost
        }
        #expect(ContinuousClock.now - started < .seconds(10), "failed by the command timeout, not by the closed channel")
    }

    @Test(
        "a server that answers with bytes that are not RESP: connectionLost from hiredis's reader, no crash",
        .timeLimit(.minutes(1)))
    func garbageServer() async throws {
        let (fd, port) = try RedisServer.boundPort()
        defer { close(fd) }
        #expect(listen(fd, 16) == 0)
        // Answers the first request with garbage, then keeps the socket open until the send has
        // failed, so the failure can only come from parsing (not from a close or a timeout,
        // which would not say "protocol error").
        let failed = DispatchSemaphore(value: 0)
        let answerer = Thread {
            let client = accept(fd, nil, nil)
            guard client >= 0 else { return }
            var request = [UInt8](repeating: 0, count: 4096)
            _ = read(client, &request, request.count)
            let garbage = Array("?this is not redis\r\n".utf8)
            _ = write(client, garbage, garbage.count)
            _ = failed.wait(timeout: .now() + 60)
            close(client)
        }
        answerer.start()
        let layer = try RedisChannelLayer(urls: ["redis://127.0.0.1:\(port)/0"])
        await #expect { try await layer.send(["a": 1], to: "x") } throws: { error in
            (error as? ChannelLayerError)?.code == .connectionLost && "\(error)".contains("protocol error")
        }
        failed.signal()
        await layer.close()
    }

    @Test("a Redis restart is survived: the call in flight fails, later calls reconnect, nothing leaks")
    func restart() async throws {
        let server = try await RedisServer.launch()
        let layer = try RedisChannelLayer(urls: [server.url])
        try await layer.send(["before": true], to: "restart")
        #expect(try await layer.receive(channels: ["restart"])?.message == ["before": true])
        // A receive blocked in BLPOP when the server goes away.
        let blocked = Task { try await layer.receive(channels: ["restart-wait"], timeout: .seconds(20)) }
        try await Task.sleep(for: .milliseconds(300))
        await server.shutdown()
        let failure = await blocked.result
        switch failure {
        case .failure(let error): #expect((error as? ChannelLayerError)?.code == .connectionLost)
        case .success(let value): Issue.record("the blocked receive should fail, got \(String(describing: value))")
        }
        await #expect { try await layer.send(["down": true], to: "restart") } throws: {
            ($0 as? ChannelLayerError)?.code == .connectionLost
        }
        try await server.restart()
        let openedBefore = layer.connectionsOpened
        try await layer.send(["after": true], to: "restart")
        #expect(try await layer.receive(channels: ["restart"], timeout: .seconds(2))?.message == ["after": true])
        try await layer.groupAdd("g", channel: "restart")
        try await layer.sendGroup("g", message: ["group": true])
        #expect(try await layer.receive(channels: ["restart"])?.message == ["group": true])
        // Reconnecting took a handful of connections, not one per call.
        for _ in 0..<50 {
            try await layer.send(["n": 1], to: "restart")
            _ = try await layer.receive(channels: ["restart"])
        }
        #expect(layer.connectionsOpened - openedBefore <= 4)
        await layer.close()
        await server.shutdown()
    }

    @Test("two Redis servers: ! and ? channels and groups go to their shard, plain channels anywhere")
    func sharded() async throws {
        let a = try await RedisServer.launch(), b = try await RedisServer.launch()
        let layer = try RedisChannelLayer(urls: [a.url, b.url])
        // "daphne.response.AbCdEfGhIj!" hashes to shard 0 of 2, "tgroup" to shard 1.
        try await layer.send(["x": 1], to: "daphne.response.AbCdEfGhIj!abc")
        #expect(try raw(a.url).command(["LLEN", "asgi:daphne.response.AbCdEfGhIj!"]).integer == 1)
        #expect(try raw(b.url).command(["LLEN", "asgi:daphne.response.AbCdEfGhIj!"]).integer == 0)
        #expect(
            try await layer.receive(channels: ["daphne.response.AbCdEfGhIj!"], timeout: .seconds(1))?.channel
                == "daphne.response.AbCdEfGhIj!abc")
        try await layer.groupAdd("tgroup", channel: "daphne.response.AbCdEfGhIj!m1")
        try await layer.groupAdd("tgroup", channel: "plain.member")
        #expect(try raw(b.url).command(["ZCARD", "asgi::group:tgroup"]).integer == 2)
        try await layer.sendGroup("tgroup", message: ["hello": "group"])
        #expect(
            try await layer.receive(channels: ["daphne.response.AbCdEfGhIj!"], timeout: .seconds(1))?.channel
                == "daphne.response.AbCdEfGhIj!m1")
        // Plain channels go round-robin; receives from every host find them all.
        for i in 0..<6 { try await layer.send(["i": .int(Int64(i))], to: "plain.rr") }
        #expect(try raw(a.url).command(["LLEN", "asgi:plain.rr"]).integer == 3)
        #expect(try raw(b.url).command(["LLEN", "asgi:plain.rr"]).integer == 3)
        var got = 0
        while try await layer.receive(channels: ["plain.rr", "plain.member"], timeout: .milliseconds(1500)) != nil { got += 1 }
        #expect(got == 7)
        await layer.close()
        await a.shutdown()
        await b.shutdown()
    }

    @Test("large messages go on the loop's bulk connection; one sender's mixed sizes still arrive in order")
    func bulkMessagesKeepTheirOrder() async throws {
        let layer = try layer()
        defer {
            Task {
                try? await layer.flush(); await layer.close()
            }
        }
        let opened = layer.connectionsOpened
        let sizes = [10, 200_000, 5, 70_000, 64 * 1024 - 100, 1_000_000, 1, 65_536]
        for (index, size) in sizes.enumerated() {
            try await layer.send(["i": .int(Int64(index)), "pad": .bytes([UInt8](repeating: 7, count: size))], to: "bulk.order")
        }
        // Small and large sends used two connections (the shared one and the bulk one).
        #expect(layer.connectionsOpened - opened == 2)
        for (index, size) in sizes.enumerated() {
            let got = try #require(try await layer.receive(channels: ["bulk.order"], timeout: .seconds(2)))
            #expect(got.message["i"] == .int(Int64(index)))
            #expect(got.message["pad"]?.bytesValue?.count == size)
        }
    }

    @Test("each event loop gets its own shared connection: a command from a loop runs on a connection of that loop")
    func sharedConnectionPerEventLoop() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let connections = RedisConnectionPool(
            endpoint: try RedisEndpoint(url: TestRedis.requireURL()), group: group, connectTimeout: .seconds(2),
            commandTimeout: .seconds(5))
        let loops = Array(group.makeIterator())
        var seen: [ObjectIdentifier] = []
        for (index, loop) in loops.enumerated() {
            // A caller running on loop `index` (as the tasks of a process on NIO's executor do) is given lane `index`.
            #expect(try await loop.submit { connections.currentLane() }.get() == index)
            let connection = try await connections.shared(lane: index)
            #expect(connection.eventLoop === loop, "lane \(index)'s connection lives on loop \(index)")
            #expect(try await connection.command(["PING"]).text == "PONG")
            seen.append(ObjectIdentifier(connection))
        }
        #expect(Set(seen).count == loops.count, "one connection per loop")
        for (index, loop) in loops.enumerated() {
            // Each loop's bulk connection is a second one on the same loop.
            let bulk = try await connections.shared(lane: loops.count + index)
            #expect(bulk.eventLoop === loop && !seen.contains(ObjectIdentifier(bulk)))
            #expect(try await bulk.command(["PING"]).text == "PONG")
        }
        // Off the group's loops (this test's own task): the first lane, and nothing new opened.
        let opened = connections.connectionsOpened
        #expect(connections.currentLane() == 0)
        #expect(ObjectIdentifier(try await connections.shared()) == seen[0] && connections.connectionsOpened == opened)
        connections.close()
        try await group.shutdownGracefully()
    }
}
