import ASGI
import Testing

@testable import Channels

/// `Channel`, `Group`, `Presence` and `Group.publish` outside any consumer (a handler of another
/// framework, a job, a script): on an explicit layer or the process-wide default.
@Suite("channels and groups from anywhere", .serialized)
struct OutsideConsumerTests {
    @Test("without a consumer and without a default layer: a clear error, nothing sent")
    func noLayer() async throws {
        let saved = ChannelLayers.default
        ChannelLayers.default = nil
        defer { ChannelLayers.default = saved }
        let group = await #expect(throws: ConsumerContextError.self) { try await Group("g").send(["x": 1]) }
        let channel = await #expect(throws: ConsumerContextError.self) { try await Channel("c").send(["x": 1]) }
        #expect(group?.code == .noLayer && channel?.code == .noLayer)
    }

    @Test("the default layer: group add and send, channel send, publish with offsets, presence list")
    func defaultLayer() async throws {
        let layer = InMemoryChannelLayer()
        let saved = ChannelLayers.default
        ChannelLayers.default = layer
        defer { ChannelLayers.default = saved }
        try await Group("news").add(Channel("reader-1"))
        try await Group("news").add(Channel("reader-2"))
        try await Group("news").send(["text": "breaking"])
        for reader in ["reader-1", "reader-2"] {
            let got = try await layer.receive(channels: [reader], timeout: .seconds(1))
            #expect(got?.message["text"]?.stringValue == "breaking")
        }
        try await Channel("jobs").send(["task": "resize"])
        #expect(try await layer.receive(channels: ["jobs"], timeout: .seconds(1))?.message["task"]?.stringValue == "resize")

        GroupHistory.keep("news", size: 10, ttl: .seconds(60))
        let first = try await Group("news").publish("{\"headline\":\"one\"}")
        let second = try await Group("news").publish("{\"headline\":\"two\"}")
        #expect(first.offset == 1 && second.offset == 2 && first.epoch == second.epoch)
        let got = try #require(try await layer.receive(channels: ["reader-1"], timeout: .seconds(1)))
        #expect(got.message["text"]?.stringValue == "{\"offset\":1,\"epoch\":\"\(first.epoch)\",\"headline\":\"one\"}")
        let publication: ASGIValue = ["group": "news", "offset": 1, "epoch": .string(first.epoch)]
        #expect(got.message["publication"] == publication)
        // An explicit layer wins over the default.
        let other = InMemoryChannelLayer()
        try await Group("news").publish("{}", on: other)
        let slice = try await other.historyRead("news", after: nil, retention: HistoryRetention(size: 10, ttl: .seconds(60)))
        #expect(slice.top.offset == 1)
        // A group without a history rule refuses to publish.
        let refused = await #expect(throws: ConsumerContextError.self) { try await Group("plain").publish("{}") }
        #expect(refused?.code == .historyNotKept)

        _ = try await layer.presenceJoin("news", connection: "s!1", user: "ann", meta: "{}", ttl: .seconds(30))
        #expect(try await Presence("news").list().map(\.user) == ["ann"])
        #expect(try await Group("news").presence.list(on: layer).map(\.connections) == [1])
    }
}
