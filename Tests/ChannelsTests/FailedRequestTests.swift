import ASGI
import Channels
import Testing

/// An HTTP consumer that fails before it answers: the worker answers for it (500; 503 when its
/// timeout cancelled it), as Django answers an exception, instead of leaving the client waiting
/// for the server's own timeout. One that answered, or that is put back for later, gets nothing more.
@Suite("failed requests", .timeLimit(.minutes(1)))
struct FailedRequestTests {
    struct Boom: Error {}

    /// The statuses of the response starts that reached `reply`: waits up to 20 s for the first
    /// (the whole suite's load can hold a worker up for seconds), then 300 ms more for any other.
    func statuses(on layer: InMemoryChannelLayer, _ reply: String) async throws -> [Int] {
        var statuses: [Int] = []
        var deadline = ContinuousClock.now + .seconds(20)
        while ContinuousClock.now < deadline {
            if let received = try await layer.receive(channels: [reply], timeout: .milliseconds(100)),
                let status = received.message["status"]?.intValue
            {
                if statuses.isEmpty { deadline = ContinuousClock.now + .milliseconds(300) }
                statuses.append(Int(status))
            }
        }
        return statuses
    }

    @Test func aConsumerThatThrowsBeforeAnsweringGets500AndOneThatAnsweredNothingMore() async throws {
        let layer = InMemoryChannelLayer(configuration: .init(capacity: 1_000))
        let router = try Router([
            route(
                "http.request",
                { context in
                    let path = context.message["path"]?.stringValue ?? ""
                    if path == "/answered/" { try await context.respond(contentType: "text/plain", "fine") }
                    if path == "/later/", (context.message[Worker.retryKey]?.intValue ?? 0) == 0 { throw ConsumerError.consumeLater }
                    if path == "/later/" { try await context.respond(contentType: "text/plain", "second try") }
                    throw Boom()
                })
        ])
        let worker = Worker(router: router, layer: layer, concurrency: 4)
        let running = Task { await worker.run() }
        for (path, reply) in [("/fails/", "reply.a"), ("/answered/", "reply.b"), ("/later/", "reply.c")] {
            try await layer.send(["reply_channel": .string(reply), "path": .string(path), "method": "GET"], to: "http.request")
        }
        #expect(try await statuses(on: layer, "reply.a") == [500])
        #expect(try await statuses(on: layer, "reply.b") == [200], "one that answered gets no 500 after")
        #expect(try await statuses(on: layer, "reply.c") == [200], "a retry answers, not the first try")
        worker.stop()
        await running.value
    }

    @Test func aConsumerCancelledAtItsTimeoutGets503() async throws {
        let layer = InMemoryChannelLayer(configuration: .init(capacity: 1_000))
        let router = try Router([route("http.request", { _ in try await Task.sleep(for: .seconds(3600)) })])
        let worker = Worker(router: router, layer: layer, concurrency: 2, consumerTimeout: .milliseconds(200))
        let running = Task { await worker.run() }
        try await layer.send(["reply_channel": "reply.d", "path": "/slow/", "method": "GET"], to: "http.request")
        #expect(try await statuses(on: layer, "reply.d") == [503])
        worker.stop()
        await running.value
    }
}
