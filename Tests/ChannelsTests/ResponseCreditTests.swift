import ASGI
import Testing

@testable import Channels

/// A multi-message response waits for the server's credit (`response_credit`) instead of
/// pushing its whole body into the layer.
@Suite("response credit", .timeLimit(.minutes(1)))
struct ResponseCreditTests {
    func credit(_ streams: ResponseStreams, _ channel: String, written: Int) {
        streams.received(ReceivedMessage(channel: channel, message: HTTPResponseCredit(written: written).message))
    }

    @Test func aResponseWaitsPastItsWindowUntilTheServerHasWrittenEnough() async throws {
        let streams = ResponseStreams(creditTimeout: .seconds(30))
        let channel = streams.register(TaskHandle(), window: 100)
        try await streams.reserve(60, on: channel)
        try await streams.reserve(40, on: channel)  // exactly the window
        let sent = Task { try await streams.reserve(30, on: channel) }
        try await Task.sleep(for: .milliseconds(100))
        // 100 in flight: 30 more must wait. 20 written is not enough room for 30...
        credit(streams, channel, written: 20)
        try await Task.sleep(for: .milliseconds(50))
        // ...40 written is (60 in flight + 30 = 90).
        credit(streams, channel, written: 40)
        try await sent.value
        // Credits are totals: an older (smaller) one that arrives late changes nothing.
        credit(streams, channel, written: 10)
        let next = Task { try await streams.reserve(20, on: channel) }  // 90 in flight + 20 > 100
        try await Task.sleep(for: .milliseconds(50))
        credit(streams, channel, written: 130)
        try await next.value
    }

    @Test func aChunkLargerThanTheWindowGoesAloneWhenNothingIsInFlight() async throws {
        let streams = ResponseStreams()
        let channel = streams.register(TaskHandle(), window: 10)
        try await streams.reserve(500, on: channel)
        credit(streams, channel, written: 500)
        try await streams.reserve(500, on: channel)
    }

    @Test func aMalformedCreditIsDroppedAndCountedAndChangesNothing() async throws {
        let streams = ResponseStreams(creditTimeout: .milliseconds(300))
        let channel = streams.register(TaskHandle(), window: 10)
        try await streams.reserve(10, on: channel)
        streams.received(ReceivedMessage(channel: channel, message: ["written": "lots"]))
        streams.received(ReceivedMessage(channel: channel, message: ["written": -5]))
        #expect(streams.malformedCreditCount == 2)
        #expect(streams.abandonedCount == 0, "a bad credit is not a disconnect")
        // No room was made: the next chunk still waits (and here times out).
        let error = await #expect(throws: ConsumerContextError.self) { try await streams.reserve(10, on: channel) }
        #expect(error?.code == .noCredit)
    }

    @Test func withoutCreditNothingWaits() async throws {
        let streams = ResponseStreams()
        let channel = streams.register(TaskHandle(), window: nil)
        for _ in 0..<100 { try await streams.reserve(1 << 20, on: channel) }
    }

    @Test func aClientThatLeavesEndsTheWaitWithCancellation() async throws {
        let streams = ResponseStreams()
        let channel = streams.register(TaskHandle(), window: 10)
        try await streams.reserve(10, on: channel)
        let waiting = Task { try await streams.reserve(10, on: channel) }
        try await Task.sleep(for: .milliseconds(50))
        streams.received(ReceivedMessage(channel: channel, message: HTTPDisconnectMessage(replyChannel: "r!x", path: "/").message))
        await #expect(throws: CancellationError.self) { try await waiting.value }
        #expect(streams.abandonedCount == 1)
    }

    @Test func aLostCreditFailsTheResponseAfterTheTimeoutInsteadOfHangingIt() async throws {
        let streams = ResponseStreams(creditTimeout: .milliseconds(200))
        let channel = streams.register(TaskHandle(), window: 10)
        try await streams.reserve(10, on: channel)
        let error = await #expect(throws: ConsumerContextError.self) { try await streams.reserve(10, on: channel) }
        #expect(error?.code == .noCredit)
    }

    /// Every consumer slot held by a response that waits for credit: the credit is still read
    /// (the inbox has a loop of its own), so the responses finish. With the inbox read by the
    /// receive loop, which waits for a free slot, this deadlocked until the credit timeout.
    @Test func aWorkerWhoseEverySlotWaitsForCreditStillReadsTheCredit() async throws {
        let layer = InMemoryChannelLayer(configuration: .init(capacity: 1000))
        let body = (0..<(2 << 20)).map { UInt8(truncatingIfNeeded: $0) }
        let worker = Worker(
            router: try Router([
                route("http.request", { context in try await context.respond(contentType: "application/octet-stream", body: body) })
            ]), layer: layer, concurrency: 1)
        let running = Task { await worker.run() }
        // A request offering a credit of one byte: each chunk waits until the one before it was
        // acknowledged.
        try await layer.send(
            HTTPRequestMessage(replyChannel: "srv!r1", method: "GET", path: "/", responseCredit: 1).message, to: "http.request")
        var received: [UInt8] = []
        var disconnectChannel: String?
        var credited = false
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(20)
        // The test plays the server: it acknowledges every chunk it takes.
        while clock.now < deadline {
            guard let reply = try await layer.receive(channels: ["srv!"], timeout: .seconds(1)) else { continue }
            let response = try HTTPResponseMessage(reply.message)
            let more: Bool
            switch response {
            case .start(let start):
                received += start.content
                disconnectChannel = start.disconnectChannel
                credited = start.takesCredit
                more = start.moreContent
            case .chunk(let chunk):
                received += chunk.content
                more = chunk.moreContent
            }
            if let disconnectChannel { try await layer.send(HTTPResponseCredit(written: received.count).message, to: disconnectChannel) }
            if !more { break }
        }
        #expect(credited, "the response start says it takes credit")
        #expect(received == body, "got \(received.count) of \(body.count) bytes")
        worker.stop()
        await running.value
    }

    /// A download whose client stops reading and an upload whose client stops sending each wait
    /// for their client with the worker's slot lent out: with two slots (and one reserved), 20
    /// other requests are answered meanwhile, and both stalled ones still finish once their
    /// clients move again. Before the lending, the two held both slots and nothing else ran.
    /// (At most as many slots as there are are lent: a third stalled one would keep its own.)
    @Test func consumersWaitingForTheirClientsLendTheirSlots() async throws {
        let layer = InMemoryChannelLayer(configuration: .init(capacity: 1000))
        let body = [UInt8](repeating: 7, count: 1 << 20)
        let worker = Worker(
            router: try Router([
                route(
                    "http.request",
                    { context in
                        switch try HTTPRequestMessage(context.message).path {
                        case "/download": try await context.respond(contentType: "application/octet-stream", body: body)
                        case "/upload":
                            let received = try await context.requestBody()
                            try await context.respond(contentType: "text/plain", body: Array("\(received.count)".utf8))
                        default: try await context.respond(contentType: "text/plain", body: Array("hello".utf8))
                        }
                    })
            ]), layer: layer, concurrency: 2)
        let running = Task { await worker.run() }
        // The test plays the server: replies for each request, in arrival order.
        var replies: [String: [Message]] = [:]
        func next(_ channel: String) async throws -> Message? {
            let deadline = ContinuousClock.now + .seconds(10)
            while replies[channel, default: []].isEmpty, ContinuousClock.now < deadline {
                if let reply = try await layer.receive(channels: ["srv!"], timeout: .seconds(1)) {
                    replies[reply.channel, default: []].append(reply.message)
                }
            }
            return replies[channel]?.isEmpty == false ? replies[channel]?.removeFirst() : nil
        }
        try await layer.send(
            HTTPRequestMessage(replyChannel: "srv!download", method: "GET", path: "/download", responseCredit: 1).message,
            to: "http.request")
        try await layer.send(
            HTTPRequestMessage(
                replyChannel: "srv!upload", method: "POST", path: "/upload", body: [1, 2, 3], bodyChannel: "http.request.body?up"
            )
            .message, to: "http.request")
        // The download's first chunk is out and it waits for a credit that does not come.
        let start = try #require(try await next("srv!download"))
        guard case .start(let head) = try HTTPResponseMessage(start), let disconnectChannel = head.disconnectChannel else {
            Issue.record("the download did not start with a disconnect channel")
            return
        }
        for index in 0..<20 {
            try await layer.send(
                HTTPRequestMessage(replyChannel: ReplyChannelName(trusted: "srv!hello\(index)"), method: "GET", path: "/hello").message,
                to: "http.request")
        }
        var answered = 0
        for index in 0..<20 {
            if try await next("srv!hello\(index)") != nil { answered += 1 }
        }
        #expect(answered == 20, "\(answered) of 20 requests answered while a download and an upload waited for their clients")
        // The clients move again: the upload's last chunk arrives, the download is read.
        try await layer.send(HTTPBodyChunk(content: [4, 5], moreContent: false).message, to: "http.request.body?up")
        let uploaded = try #require(try await next("srv!upload"))
        guard case .start(let uploadAnswer) = try HTTPResponseMessage(uploaded) else {
            Issue.record("the upload's answer is not a response start")
            return
        }
        #expect(uploadAnswer.content == Array("5".utf8))
        var received = head.content
        var more = head.moreContent
        while more {
            try await layer.send(HTTPResponseCredit(written: received.count).message, to: disconnectChannel)
            let reply = try #require(try await next("srv!download"))
            guard case .chunk(let chunk) = try HTTPResponseMessage(reply) else { break }
            received += chunk.content
            more = chunk.moreContent
        }
        #expect(received == body, "the download got \(received.count) of \(body.count) bytes")
        worker.stop()
        await running.value
    }
}
