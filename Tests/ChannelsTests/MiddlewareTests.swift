import ASGI
import Synchronization
import Testing

@testable import Channels

/// Middleware around consumers (order, short-circuit, errors) and the worker's hooks, on a real
/// worker and the in-memory layer.
@Suite("middleware and worker hooks", .timeLimit(.minutes(1)))
struct MiddlewareTests {
    final class Recorder: Sendable {
        let events = Mutex<[String]>([])
        func add(_ event: String) { events.withLock { $0.append(event) } }
        var all: [String] { events.withLock { $0 } }
    }

    @Test("middleware run in order around the consumer; one that does not call next short-circuits; hooks once each")
    func orderAndShortCircuit() async throws {
        let recorder = Recorder()
        let layer = InMemoryChannelLayer()
        let outer: ConsumerMiddleware = { context, next in
            recorder.add("outer>")
            try await next(context)
            recorder.add("<outer")
        }
        let gate: ConsumerMiddleware = { context, next in
            recorder.add("gate>")
            if context.message["blocked"]?.boolValue == true { return }
            try await next(context)
            recorder.add("<gate")
        }
        let hooks = WorkerHooks(
            ready: { recorder.add("ready") },
            consumerStarted: { context in recorder.add("started \(context.channel)") },
            consumerFinished: { _, error in recorder.add(error == nil ? "finished" : "failed") })
        let worker = Worker(
            router: try Router([
                route("jobs") { context in
                    recorder.add("consumer")
                    if context.message["fail"]?.boolValue == true { throw ConsumerError.close(code: 4000) }
                }
            ]), layer: layer, concurrency: 1, middleware: [outer, gate], hooks: hooks)
        await worker.dispatch(ReceivedMessage(channel: "jobs", message: ["n": 1]))
        #expect(recorder.all == ["started jobs", "outer>", "gate>", "consumer", "<gate", "<outer", "finished"])
        recorder.events.withLock { $0.removeAll() }
        await worker.dispatch(ReceivedMessage(channel: "jobs", message: ["blocked": true]))
        #expect(recorder.all == ["started jobs", "outer>", "gate>", "<outer", "finished"])
        recorder.events.withLock { $0.removeAll() }
        await worker.dispatch(ReceivedMessage(channel: "jobs", message: ["fail": true]))
        #expect(recorder.all == ["started jobs", "outer>", "gate>", "consumer", "failed"])

        // `ready` once, when the worker listens.
        recorder.events.withLock { $0.removeAll() }
        let running = Task { await worker.run() }
        for _ in 0..<200 where !recorder.all.contains("ready") { try await Task.sleep(for: .milliseconds(10)) }
        worker.stop()
        await running.value
        #expect(recorder.all == ["ready"])
    }
}
