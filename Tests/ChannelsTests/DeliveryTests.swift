import ASGI
import Channels
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
