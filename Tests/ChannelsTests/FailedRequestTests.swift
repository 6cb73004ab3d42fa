import ASGI
import Channels
import Testing

/// An HTTP consumer that fails before it answers: the worker answers for it (500; 503 when its
/// timeout cancelled it), as Django answers an exception, instead of leaving the client waiting
/// for the server's own timeout. One that answered, or that is put back for later, gets nothing more.
@Suite("failed requests", .timeLimit(.minutes(1)))
struct FailedRequestTests {
    struct Boom: Error {}

    /// What reached `reply` within `wait`: the statuses of the response starts.
    func statuses(on layer: InMemoryChannelLayer, _ reply: String, wait: Duration) async throws -> [Int] {
        var statuses: [Int] = []
        let deadline = ContinuousClock.now + wait
        while ContinuousClock.now < deadline {
            if let received = try await layer.receive(channels: [reply], timeout: .milliseconds(100)) {
                if let status = received.message["status"]?.intValue { statuses.append(Int(status)) }
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
        #expect(try await statuses(on: layer, "reply.a", wait: .seconds(1)) == [500])
        #expect(try await statuses(on: layer, "reply.b", wait: .milliseconds(300)) == [200], "one that answered gets no 500 after")
        #expect(try await statuses(on: layer, "reply.c", wait: .milliseconds(300)) == [200], "a retry answers, not the first try")
        worker.stop()
        await running.value
    }

    @Test func aConsumerCancelledAtItsTimeoutGets503() async throws {
        let layer = InMemoryChannelLayer(configuration: .init(capacity: 1_000))
        let router = try Router([route("http.request", { _ in try await Task.sleep(for: .seconds(3600)) })])
        let worker = Worker(router: router, layer: layer, concurrency: 2, consumerTimeout: .milliseconds(200))
        let running = Task { await worker.run() }
        try await layer.send(["reply_channel": "reply.d", "path": "/slow/", "method": "GET"], to: "http.request")
        #expect(try await statuses(on: layer, "reply.d", wait: .seconds(2)) == [503])
        worker.stop()
        await running.value
    }
}
