import ASGI
import Foundation
import Testing

@testable import RedisChannelLayer

@Suite("a Redis that reads its data set back after a restart", .timeLimit(.minutes(1)))
struct RedisLoadingTests {
    /// After a restart Redis answers `-LOADING` to every command until it has read its data set
    /// back (seconds for a large data set; here a snapshot of 4,000 keys read half a
    /// millisecond apart). Those answers were errors (`backendError`) that nothing tried again: a consumer's
    /// send, a session save, a room's history append failed, and the chat example lost texts
    /// on a restart (the e2e test of a Redis SIGKILLed during ordered bursts, on a loaded
    /// machine). They are now `connectionLost` refusals that ran nothing, waited out as an
    /// unreachable Redis is.
    @Test func whatIsAskedWhileRedisLoadsIsAnsweredOnceItHasLoaded() async throws {
        let server = try await RedisServer.launch { _ in
            // A snapshot read back slowly, answering (-LOADING) between every kilobyte read.
            ["--dbfilename", "data.rdb", "--key-load-delay", "500", "--loading-process-events-interval-bytes", "1024"]
        }
        let client = RedisClient(endpoint: RedisEndpoint(port: server.port))
        try await client.command("EVAL", "for i = 1, 4000 do redis.call('SET', 'filler:' .. i, 'x') end return 1", "0")
        let layer = try RedisChannelLayer(configuration: try RedisChannelLayerConfiguration(urls: [server.url]))
        try await layer.send(["n": 1], to: "loading.test")
        try await client.command("SAVE")
        await server.kill9()
        try await server.restart(whileLoading: true)
        let raw = try HiredisConnection(
            endpoint: RedisEndpoint(port: server.port), connectTimeout: .seconds(1), commandTimeout: .seconds(1))
        #expect(try raw.command(["GET", "filler:1"]).errorMessage?.hasPrefix("LOADING") == true, "Redis is loading")
        // A session store's command, and a consumer's send (tried again as `ConsumerContext` does).
        #expect(try await client.command("GET", "filler:4000").bytes == Array("x".utf8))
        try await retrying(for: .seconds(20)) { try await layer.send(["n": 2], to: "loading.test") }
        #expect(try await layer.receive(channels: ["loading.test"], timeout: .seconds(5))?.message == ["n": 1])
        #expect(try await layer.receive(channels: ["loading.test"], timeout: .seconds(5))?.message == ["n": 2])
        await layer.close()
        await client.close()
        await server.shutdown()
    }

    /// The refusals of a Redis that cannot serve for a moment are lost connections that ran
    /// nothing (a send tried again after one is not marked as possibly stored twice); other
    /// error replies stay what they were.
    @Test func refusalsOfARedisNotReadyAreConnectionLostThatRanNothing() {
        for reply in [
            "LOADING Redis is loading the dataset in memory",
            "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
            "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
            "TRYAGAIN Multiple keys request during rehashing of slot",
        ] {
            let error = ChannelLayerError.redisRefused(reply, "a test")
            #expect(error.code == .connectionLost && !error.mayHaveRun, "\(reply)")
        }
        for (reply, code) in [
            ("ERR wrong number of arguments", ChannelLayerError.Code.backendError),
            ("BUSYKEY Target key name already exists.", .backendError),
            ("OOM command not allowed when used memory > 'maxmemory'.", .outOfMemory),
        ] {
            let error = ChannelLayerError.redisRefused(reply, "a test")
            #expect(error.code == code && error.mayHaveRun, "\(reply)")
        }
        #expect(ChannelLayerError(.connectionLost, "cut").mayHaveRun, "a connection lost mid-call may have run it")
    }
}
