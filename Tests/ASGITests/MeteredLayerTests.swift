import ASGI
import Synchronization
import Testing

@Suite("metered layer", .timeLimit(.minutes(2)))
struct MeteredLayerTests {
    @Test func errorsAreLabelledByTheirCodeFromABoundedSet() {
        #expect(MeteredChannelLayer.label(of: ChannelLayerError.channelFull("x")) == "channel_full")
        #expect(MeteredChannelLayer.label(of: ChannelLayerError.messageTooLarge("x", size: 2, limit: 1)) == "message_too_large")
        #expect(MeteredChannelLayer.label(of: ChannelLayerError(.connectionLost, "gone")) == "connection_lost")
        #expect(MeteredChannelLayer.label(of: ChannelLayerError(.invalidConfiguration, "bad")) == "invalid_configuration")
        #expect(MeteredChannelLayer.label(of: ChannelLayerError(.closed, "closed")) == "closed")
        struct Elsewhere: Error {}
        #expect(MeteredChannelLayer.label(of: Elsewhere()) == "other")
    }

    /// A run to a layer that cannot send it in one step goes one message at a time, as far as
    /// the channel takes it; the first refusal is thrown. A metered layer says what the layer
    /// it wraps does (the in-memory one: not in one step).
    @Test func aRunToALayerWithoutOneStepSendsGoesOneAtATimeUntilTheChannelFills() async throws {
        let base = InMemoryChannelLayer(configuration: .init(capacity: 3))
        let layer = MeteredChannelLayer(base)
        #expect(!layer.sendsManyAtOnce)
        let run: [Message] = (0..<5).map { ["n": .int(Int64($0))] }
        #expect(try await layer.send(run, to: "runs") == 3)
        await #expect(throws: ChannelLayerError.self) { _ = try await layer.send(run, to: "runs") }
        #expect(try await base.send(run, to: "other") == 3)
        let taken = try await base.receiveBatch(channels: ["runs"], max: 10, timeout: .seconds(1))
        #expect(taken.map { $0.message["n"]?.intValue ?? -1 } == [0, 1, 2])
    }

    @Test func itForwardsEveryCallAndRethrowsTheLayersErrors() async throws {
        let base = InMemoryChannelLayer(configuration: .init(capacity: 1))
        let layer = MeteredChannelLayer(MeteredChannelLayer(base))
        #expect(layer.base is InMemoryChannelLayer, "never wrapped twice")
        try await layer.send(["n": 1], to: "one")
        await #expect(throws: ChannelLayerError.self) { try await layer.send(["n": 2], to: "one") }
        await #expect(throws: ChannelLayerError.self) { try await layer.send(["n": 2], to: "bad name!!") }
        try await layer.groupAdd("g", channel: "two")
        #expect(try await layer.groupChannels("g") == ["two"])
        #expect(try await layer.groups() == ["g"])
        #expect(try await layer.pendingChannels() == ["one"])
        try await layer.sendGroup("g", message: ["to": "g"])
        let batch = try await layer.receiveBatch(channels: ["one", "two"], max: 10, timeout: .seconds(1))
        #expect(batch.map(\.channel).sorted() == ["one", "two"])
        #expect(try await layer.channelStatistics("one").messagesPending == 0)
        #expect(layer.location == base.location)
        await layer.close()
        await #expect(throws: ChannelLayerError.self) { try await layer.send(["n": 3], to: "one") }
    }

    @Test func theInMemoryLayerCountsWhatExpiredUnread() async throws {
        let layer = InMemoryChannelLayer(configuration: .init(expiry: .seconds(1)))
        for n in 0..<3 { try await layer.send(["n": .int(Int64(n))], to: "stale") }
        try await layer.send(["n": 9], to: "other")
        #expect(try await layer.channelStatistics("stale").messagesPending == 3, "they were there")
        #expect(layer.messagesExpired == 0)
        try await Task.sleep(for: .milliseconds(2100))
        #expect(try await layer.receive(channels: ["stale"]) == nil)
        #expect(layer.messagesExpired == 3, "found expired by the receive")
        // The one on the other channel is found by the next sweep (statistics purge the channel they ask about).
        #expect(try await layer.channelStatistics("other").messagesPending == 0)
        #expect(layer.messagesExpired == 4)
    }

    @Test("retrying: transient errors are retried until success, for at most the limit; others are thrown at once")
    func retryingRetriesTransientErrorsWithinItsLimit() async throws {
        let calls = Atomic<Int>(0)
        let value = try await retrying(for: .seconds(30)) { () async throws -> Int in
            let n = calls.add(1, ordering: .relaxed).newValue
            if n < 3 { throw ChannelLayerError(.connectionLost, "not yet") }
            return n
        }
        #expect(value == 3 && calls.load(ordering: .relaxed) == 3, "two failures, then the third try's value")

        calls.store(0, ordering: .relaxed)
        await #expect(throws: ChannelLayerError.self) {
            try await retrying(for: .seconds(30)) { () async throws -> Int in
                calls.add(1, ordering: .relaxed)
                throw ChannelLayerError(.invalidName, "never transient")
            }
        }
        #expect(calls.load(ordering: .relaxed) == 1, "a non-transient error is not retried")

        calls.store(0, ordering: .relaxed)
        let clock = ContinuousClock()
        let started = clock.now
        do {
            _ = try await retrying(for: .milliseconds(200)) { () async throws -> Int in
                calls.add(1, ordering: .relaxed)
                throw ChannelLayerError(.connectionLost, "down \(calls.load(ordering: .relaxed))")
            }
            Issue.record("an error that never passes was not thrown")
        } catch let error as ChannelLayerError {
            #expect(error.message == "down \(calls.load(ordering: .relaxed))", "the last error is the one thrown")
        }
        // 10 + 20 + 40 + 80 ms of back-off fit in 200 ms; the next 160 does not.
        #expect(calls.load(ordering: .relaxed) >= 2 && calls.load(ordering: .relaxed) <= 5)
        #expect(clock.now - started >= .milliseconds(30), "it backed off between tries")
    }
}
