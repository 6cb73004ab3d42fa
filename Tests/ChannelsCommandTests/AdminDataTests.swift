import ASGI
import Foundation
import Testing

@testable import ChannelsCommand

/// What `stats` prints and the operations page serves: one snapshot for both, taken from a
/// real layer, and the page's process figures summed from the same tallies `/metrics` prints.
@Suite("admin data: the layer snapshot, the page's report, the token")
struct AdminDataTests {
    /// A layer with 3 messages waiting on `work`, 1 on a routed channel, and a group of 2.
    static func busyLayer() async throws -> InMemoryChannelLayer {
        let layer = InMemoryChannelLayer()
        for i in 0..<3 { try await layer.send(["n": .int(Int64(i))], to: "work") }
        try await layer.send(["n": 9], to: "websocket.receive")
        try await layer.groupAdd("room", channel: "a!1")
        try await layer.groupAdd("room", channel: "a!2")
        return layer
    }

    @Test func theSnapshotCountsWhatTheLayerHolds() async throws {
        let layer = try await Self.busyLayer()
        let snapshot = try await LayerSnapshot.take(of: layer, channels: [], routed: ["http.request", "websocket.receive"])
        #expect(snapshot.channels.map(\.name) == ["http.request", "websocket.receive", "work"], "routed and pending, sorted")
        #expect(snapshot.channels.map(\.messagesPending) == [0, 1, 3] && snapshot.pendingTotal == 4)
        #expect(snapshot.groups == [LayerSnapshot.GroupRow(name: "room", members: 2)])
        #expect(snapshot.messagesCount == 4 && snapshot.location == "in-memory (this process)")
        // Named channels only, when some are named.
        let named = try await LayerSnapshot.take(of: layer, channels: ["work"], routed: ["http.request"])
        #expect(named.channels.map(\.name) == ["work"])
    }

    @Test func statsJSONAndTheTableSayTheSame() async throws {
        let snapshot = try await LayerSnapshot.take(of: try await Self.busyLayer(), channels: [], routed: [])
        let json = snapshot.statsJSON
        let work = try #require((json["channels"] as? [String: Any])?["work"] as? [String: Any])
        #expect(work["messages_pending"] as? Int == 3 && work["messages_count"] as? Int == 3)
        #expect((json["groups"] as? [String: Int]) == ["room": 2] && json["messages_count"] as? Int == 4)
        let lines = snapshot.text.split(separator: "\n").map(String.init)
        #expect(lines.contains { $0.hasPrefix("work") && $0.contains("      3") })
        #expect(lines.contains("total sent 4, channel full 0"))
        #expect(lines.contains { $0.hasPrefix("room") && $0.hasSuffix("2") })
        // The page's JSON decodes back to the same snapshot (snake_case both ways).
        let decoded = try LayerSnapshot.decoder.decode(LayerSnapshot.self, from: LayerSnapshot.encoder.encode(snapshot))
        #expect(decoded == snapshot)
    }

    @Test func thePagesFiguresAreTheTalliesSums() async throws {
        let tallies = MetricTallies()
        tallies.value("channels_messages_sent_total", [("kind", "websocket_receive")]).add(5)
        tallies.value("channels_messages_sent_total", [("kind", "http_request")]).add(2)
        tallies.value("channels_dropped_total", [("reason", "slow_client")]).add(1)
        tallies.value("channels_websockets_open", [("server", "a")]).set(7)
        tallies.value("channels_websockets_open", [("server", "b")]).set(3)
        let page = AdminPage(layer: try await Self.busyLayer(), routed: [], tallies: tallies, token: nil, keep: 2)
        let figures = page.processFigures()
        #expect(figures.sent == ["websocket_receive": 5, "http_request": 2])
        #expect(figures.dropped == ["slow_client": 1] && figures.websocketsOpen == 10)
        // Samples are kept up to `keep`, oldest dropped first.
        for _ in 0..<3 { await page.sample() }
        let report = try await page.report(channels: [])
        #expect(report.history.count == 2 && report.history.allSatisfy { $0.sent == 7 && $0.pending == 4 })
        #expect(report.layer.pendingTotal == 4)
    }

    @Test func thePageWantsItsTokenFromAnyOfItsThreePlaces() {
        let page = AdminPage(layer: InMemoryChannelLayer(), routed: [], tallies: MetricTallies(), token: "s3cret")
        #expect(page.allows(authorization: "Bearer s3cret", query: [:]))
        #expect(page.allows(authorization: nil, query: ["token": "s3cret"]))
        #expect(page.allows(authorization: nil, query: [:], cookie: "s3cret"))
        #expect(!page.allows(authorization: "Bearer s3cre", query: [:]))
        #expect(!page.allows(authorization: "s3cret", query: ["token": "S3CRET"], cookie: ""))
        let open = AdminPage(layer: InMemoryChannelLayer(), routed: [], tallies: MetricTallies(), token: nil)
        #expect(open.allows(authorization: nil, query: [:]))
    }
}

/// The bounds the commands' lifecycle keeps: work that ignores cancellation does not hold the
/// caller past its timeout, and a wait ends once, with whichever came first.
@Suite("lifecycle bounds")
struct LifecycleBoundsTests {
    @Test func workThatNeverReturnsGivesTheFallbackAtTheTimeout() async {
        let started = ContinuousClock.now
        let value = await racingTimeout(.milliseconds(200), fallback: "gave up") {
            // Ignores cancellation: a connect to a dead Redis, say.
            await withUnsafeContinuation { (_: UnsafeContinuation<Void, Never>) in }
            return "done"
        }
        #expect(value == "gave up")
        #expect(ContinuousClock.now - started < .seconds(5), "the caller was not held by the work")
    }

    @Test func workThatFinishesFirstWins() async {
        let value = await racingTimeout(.seconds(10), fallback: 0) { 42 }
        #expect(value == 42)
    }

    @Test func aWaitIsResumedOnceWhateverEndsIt() async {
        let results = await withCheckedContinuation { (continuation: CheckedContinuation<Int, Never>) in
            let once = ResumeOnce(continuation)
            let first = once.resume(1)
            let second = once.resume(2)
            #expect(first && !second)
        }
        #expect(results == 1)
    }
}
