import ASGI
import Channels
import Synchronization
import Testing

/// What the framework does when a message does not fit or cannot go out at once.
@Suite("delivery from consumers", .timeLimit(.minutes(2)))
struct DeliveryTests {
    func layer(maxMessageSize: Int = 64 * 1024, capacities: [(String, Int)] = []) -> InMemoryChannelLayer {
        InMemoryChannelLayer(configuration: .init(channelCapacities: capacities, maxMessageSize: maxMessageSize))
    }

    @Test func aReplyOverTheSizeLimitFailsTheConsumerWithATypedError() async throws {
        let layer = layer()
        let outcome = Log()
        let worker = Worker(
            router: try Router([
                route(
                    "websocket.receive",
                    { context in
                        do {
                            try await context.reply(["text": .string(String(repeating: "x", count: 100_000))])
                            await outcome.add("sent")
                        } catch let error as ChannelLayerError {
                            await outcome.add("\(error.code)")
                        }
                    })
            ]), layer: layer)
        await worker.dispatch(ReceivedMessage(channel: "websocket.receive", message: ["reply_channel": "r!1", "order": 1]))
        #expect(await outcome.entries == ["messageTooLarge"])
        #expect(try await layer.receive(channels: ["r!"]) == nil)
    }

    @Test func aLargeRespondIsSplitIntoChunksThatFitTheLayer() async throws {
        let layer = layer()
        let body = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        let worker = Worker(
            router: try Router([
                route("http.request", { context in try await context.respond(contentType: "application/octet-stream", body: body) })
            ]), layer: layer)
        await worker.dispatch(ReceivedMessage(channel: "http.request", message: ["reply_channel": "r!2", "path": "/"]))
        var parts: [Message] = []
        while let part = try await layer.receive(channels: ["r!"]) { parts.append(part.message) }
        #expect(parts.count > 1)
        #expect(parts.first?["status"] == 200)
        let headers = parts.first?["headers"]?.arrayValue ?? []
        #expect(
            headers.contains {
                $0.arrayValue?.first?.bytesValue == Array("content-length".utf8)
                    && $0.arrayValue?.last?.bytesValue == Array("300000".utf8)
            })
        #expect(parts.dropLast().allSatisfy { $0["more_content"] == true } && parts.last?["more_content"] == false)
        #expect(parts.allSatisfy { MsgPackEncoder.encodedSize($0) <= 64 * 1024 })
        #expect(parts.flatMap { $0["content"]?.bytesValue ?? [] } == body)
    }

    /// A send whose reply was lost with the connection may have been stored: the consumer's
    /// next try carries `__resent`, so an ordering gate meeting both copies runs one; a refusal
    /// that ran nothing (`-LOADING`) is tried again unmarked.
    @Test func aSendTriedAgainAfterALostConnectionIsMarked() async throws {
        let layer = StoredThenLostLayer(losing: ["lost"])
        let worker = Worker(
            router: try Router([
                route(
                    "work",
                    { context in
                        try await context.send(["n": 1], to: "lost")
                        try await context.send(["n": 2], to: "fine", immediately: true)
                        try await context.send(["n": 3], to: "loading", immediately: true)
                    })
            ]), layer: layer)
        await worker.dispatch(ReceivedMessage(channel: "work", message: [:]))
        let first = try await layer.memory.receive(channels: ["lost"])?.message
        let second = try await layer.memory.receive(channels: ["lost"])?.message
        #expect(first == ["n": 1] && first?.isResent == false, "the first try, stored before its reply was lost")
        #expect(second == ["n": 1, Message.resentField: true] && second?.isResent == true, "the next try, marked")
        #expect(try await layer.memory.receive(channels: ["fine"])?.message == ["n": 2], "an unhindered send is not marked")
        #expect(
            try await layer.memory.receive(channels: ["loading"])?.message == ["n": 3],
            "a send Redis refused without running it (-LOADING) is tried again unmarked")
        #expect(worker.messagesDroppedOnSend == 0)
    }

    @Test func aBufferedSendToAFullChannelWaitsForRoomThenIsDroppedAndCounted() async throws {
        let layer = layer(capacities: [("out", 1)])
        try await layer.send(["n": 0], to: "out")
        var environment = ConsumerEnvironment()
        environment.sendRetry = .seconds(5)
        let worker = Worker(
            router: try Router([route("work", { _ in try await Channel("out").send(["n": 1]) })]),
            layer: layer, environment: environment)
        // Room appears while the send is retried: it goes through.
        async let done: Void = worker.dispatch(ReceivedMessage(channel: "work", message: [:]))
        try await Task.sleep(for: .milliseconds(100))
        #expect(try await layer.receive(channels: ["out"])?.message == ["n": 0])
        await done
        #expect(try await layer.receive(channels: ["out"], timeout: .seconds(1))?.message == ["n": 1])
        #expect(worker.messagesDroppedOnSend == 0)

        // No room for the whole retry time: dropped and counted, not silently.
        try await layer.send(["n": 2], to: "out")
        environment.sendRetry = .milliseconds(200)
        let impatient = Worker(
            router: try Router([route("work", { _ in try await Channel("out").send(["n": 3]) })]),
            layer: layer, environment: environment)
        await impatient.dispatch(ReceivedMessage(channel: "work", message: [:]))
        #expect(impatient.messagesDroppedOnSend == 1)
    }
}

/// Stores every send; a send to a channel in `losing` then fails once as a lost connection, as
/// a Redis that ran the command and died before its reply.
final class StoredThenLostLayer: ForwardingChannelLayer {
    let memory = InMemoryChannelLayer()
    var base: any ChannelLayer { memory }
    let losing: Mutex<Set<String>>
    /// Channels whose first send is refused as by a Redis loading its data set (nothing stored).
    let loading = Mutex<Set<String>>(["loading"])

    init(losing: Set<String>) { self.losing = Mutex(losing) }

    func send(_ message: Message, to channel: String) async throws(ChannelLayerError) {
        if loading.withLock({ $0.remove(channel) != nil }) { throw ChannelLayerError.notReady("LOADING (test)") }
        try await memory.send(message, to: channel)
        if losing.withLock({ $0.remove(channel) != nil }) {
            throw ChannelLayerError(.connectionLost, "the test's layer lost its connection after storing")
        }
    }
}
