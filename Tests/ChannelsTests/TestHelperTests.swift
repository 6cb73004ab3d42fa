import ASGI
import ChannelsTesting
import Foundation
import Logging
import RedisChannelLayer
import TestSupport
import Testing

@testable import Channels

#if canImport(FoundationNetworking)
    import FoundationNetworking
#endif

/// The test helpers themselves: `forceLogin` on the test client, publish/follow through the
/// harness, and the live server over real sockets.
@Suite("test helpers: forceLogin, history in the harness, the live server", .timeLimit(.minutes(1)))
struct TestHelperTests {
    static let routes: [RoutingEntry] = [
        route(
            "http.request", path: "^/me/$",
            httpSessionUser { context in
                try await context.respond(context.user.isAuthenticated ? context.user.username : "anonymous")
            }),
        route("http.request", path: "^/hello/$") { context in try await context.respond("hello \(context.path)") },
    ]

    @Test("forceLogin: the next requests are the user's; logout: anonymous again")
    func forceLogin() async throws {
        let harness = try TestHarness(
            Self.routes, environment: ConsumerEnvironment(sessionStore: InMemorySessionStore(), users: TestUsers()))
        let client = HTTPTestClient(harness)
        #expect(try await client.get("/me/").text == "anonymous")
        try await client.forceLogin(User(id: "2", username: "bob"))
        #expect(try await client.get("/me/").text == "bob")
        client.logout()
        #expect(try await client.get("/me/").text == "anonymous")
    }

    @Test("login with credentials: through the harness's UserAuthenticator; wrong ones leave the client anonymous")
    func credentialLogin() async throws {
        let harness = try TestHarness(
            Self.routes, environment: ConsumerEnvironment(sessionStore: InMemorySessionStore(), users: TestUsers()))
        let client = HTTPTestClient(harness)
        #expect(try await client.login(username: "bob", password: "wrong") == false)
        #expect(try await client.get("/me/").text == "anonymous")
        #expect(try await client.login(username: "bob", password: "bob's password"))
        #expect(try await client.get("/me/").text == "bob")
        // Without an authenticator, a clear error (not a silent anonymous client).
        let plain = HTTPTestClient(try TestHarness(Self.routes))
        await #expect(throws: TestClientError.self) { try await plain.login(username: "bob", password: "bob's password") }
    }

    @Test("the harness's recording layer keeps history: publish from a consumer, offsets in the frame")
    func publishInTheHarness() async throws {
        GroupHistory.keep("news-*", size: 10, ttl: .seconds(60))
        let harness = try TestHarness([
            route("publish") { context in
                try await Group("news-1").publish("{\"n\":\(try context.message.int("n"))}")
            }
        ])
        try await harness.layer.groupAdd("news-1", channel: "reader")
        try await harness.send(["n": 7], to: "publish")
        let frame = try #require(try await harness.receive(from: "reader", timeout: .seconds(1)))
        let text = try #require(frame["text"]?.stringValue)
        #expect(text.hasPrefix("{\"offset\":1,\"epoch\":\"") && text.hasSuffix("\"n\":7}"))
    }

    @Test("the live server: a real HTTP request reaches the consumer through a real socket")
    func liveServer() async throws {
        let live = try await LiveServer.start(Self.routes)
        do {
            let (data, response) = try await URLSession.shared.data(from: URL(string: live.url + "/hello/")!)
            #expect((response as? HTTPURLResponse)?.statusCode == 200)
            #expect(String(decoding: data, as: UTF8.self) == "hello /hello/")
        } catch {
            await live.stop()
            throw error
        }
        await live.stop()
    }

    /// The recording layer says its base layer's size limit: a consumer under the harness is not
    /// refused a 2 MiB send that `runserver` on the in-memory layer (16 MiB) accepts.
    @Test func theRecordingLayerForwardsTheSizeLimit() async throws {
        let recording = RecordingLayer(InMemoryChannelLayer())
        #expect(recording.maxMessageSize == InMemoryChannelLayer().maxMessageSize)
        let context = ConsumerContext(
            message: ["reply_channel": "big!", "path": "/"], channel: "websocket.receive", parameters: [:], layer: recording,
            logger: Logger(label: "test"))
        let big: Message = ["text": .string(String(repeating: "x", count: 2 << 20))]
        try await context.send(big, to: "big.out", immediately: true)
        #expect(recording.sent.count == 1)
    }

    /// Wrappers forward what they do not change (`ForwardingChannelLayer`): through a recording
    /// layer over a counting layer over Redis, a batch is the Redis layer's batch (not one message
    /// at a time), a bundle registration reaches Redis, and its loss (a flush) is reported back.
    @Test func wrappersForwardBatchesAndTheBundleRegistration() async throws {
        let redis = try TestRedis.layer(capacity: 1000)
        let layer = RecordingLayer(MeteredChannelLayer(redis))
        let process = "fwd.reader" + ChannelNames.randomLetters(6) + "!"
        #expect(try await layer.registeredAsBundleReader(process), "a first registration is not a loss")
        for i in 0..<5 { try await layer.groupAdd("fwd", channel: process + "m\(i)") }
        try await layer.sendGroup("fwd", message: ["n": 1])
        #expect(
            try await redis.channelStatistics(process).messagesPending == 1,
            "one bundle for the five members: the registration reached Redis")
        let batch = try await layer.receiveBatch(channels: [process], max: 64, timeout: .seconds(1))
        #expect(batch.count == 5, "every member of the bundle, through both wrappers")
        try await layer.flush()
        #expect(try await layer.registeredAsBundleReader(process) == false, "the loss is reported through both wrappers")
        await layer.close()
    }
}
