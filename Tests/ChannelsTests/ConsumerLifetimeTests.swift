import ASGI
import ChannelsTesting
import Synchronization
import Testing

@testable import Channels

/// Every context a consumer was given, held weakly: a context still alive after its dispatch
/// returned is a leak (a cycle through its outbox, its session, its dispatcher or a parked message).
final class ContextTracker: Sendable {
    private struct Weak: @unchecked Sendable { weak var context: ConsumerContext? }
    private let tracked = Mutex<[Weak]>([])

    func track(_ context: ConsumerContext) { tracked.withLock { $0.append(Weak(context: context)) } }
    var count: Int { tracked.withLock { $0.count } }
    var alive: Int { tracked.withLock { $0.filter { $0.context != nil }.count } }
}

@Suite("consumer context lifetime", .timeLimit(.minutes(2)))
struct ConsumerLifetimeTests {
    static func routing(_ tracker: ContextTracker) -> [RoutingEntry] {
        [
            route(
                "websocket.connect",
                enforceOrdering { context in
                    tracker.track(context)
                    let session = try context.channelSession
                    session["room"] = "lobby"
                    try await context.accept()
                    try await Group("lobby").add(context.replyChannel!)
                }),
            route(
                "websocket.receive",
                enforceOrdering { context in
                    tracker.track(context)
                    let text = try context.message.string("text")
                    if text == "fail" { throw Failure.asked }
                    try await Group("lobby").send(["text": .string("group " + text)])
                    try await context.reply(["text": .string(text)], immediately: text == "now")
                }),
            route(
                "websocket.disconnect",
                enforceOrdering { context in
                    tracker.track(context)
                    try await Group("lobby").discard(context.replyChannel!)
                }),
            route(
                "jobs",
                { context in
                    tracker.track(context)
                    if context.message[Worker.retryKey] == nil { throw ConsumerError.consumeLater }
                    try await Channel("done").send(context.message)
                }),
            route(
                "http.request",
                httpSession { context in
                    tracker.track(context)
                    let session = try context.httpSession
                    session["seen"] = true
                    try await context.respond(contentType: "text/plain", body: Array("ok".utf8))
                }),
        ]
    }

    enum Failure: Error { case asked }

    @Test func everyContextIsFreedWhenItsDispatchReturns() async throws {
        let tracker = ContextTracker()
        let harness = try TestHarness(Self.routing(tracker))
        let reply = try await harness.newReplyChannel()
        func receive(_ text: String, order: Int64) -> Message {
            ["reply_channel": .string(reply), "path": "/", "order": .int(order), "text": .string(text)]
        }
        // Out of order: 2 and 3 are parked until the connect and 1 have run.
        try await harness.send(receive("early", order: 2), to: "websocket.receive")
        try await harness.send(receive("fail", order: 3), to: "websocket.receive")
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 0], to: "websocket.connect")
        try await harness.send(receive("now", order: 1), to: "websocket.receive")
        try await harness.send(receive("plain", order: 4), to: "websocket.receive")
        try await harness.send(["reply_channel": .string(reply), "path": "/", "order": 5, "code": 1000], to: "websocket.disconnect")
        try await harness.send(["reply_channel": "http.response!x", "path": "/", "method": "GET"], to: "http.request")
        try await harness.send(["job": 1], to: "jobs")
        _ = try await harness.runPending()
        // connect, 1, 2 (parked, run by 1's worker), 3 (threw), 4, disconnect, the HTTP request,
        // the job (put back) and the job again.
        #expect(tracker.count == 9, "every consumer ran: \(tracker.count)")
        #expect(tracker.alive == 0, "\(tracker.alive) of \(tracker.count) contexts outlived their dispatch")
        var texts: [String] = []
        while let next = try await harness.receive(from: reply) { if let text = next["text"]?.stringValue { texts.append(text) } }
        #expect(!texts.contains("fail"))
        #expect(texts.filter { !$0.hasPrefix("group") } == ["now", "early", "plain"], "\(texts)")
        #expect(try await harness.receive(from: "done") == ["job": 1, Worker.retryKey: 1])
    }

    @Test func contextsOfARunningWorkerAreFreed() async throws {
        let tracker = ContextTracker()
        let layer = InMemoryChannelLayer(configuration: .init(channelCapacities: [("http.request", 1000)]))
        let worker = Worker(router: try Router(Self.routing(tracker)), layer: layer, concurrency: 4)
        let running = Task { await worker.run() }
        for i in 0..<200 {
            try await layer.send(["reply_channel": .string("http.response!\(i)"), "path": "/", "method": "GET"], to: "http.request")
        }
        var answered = 0
        while answered < 200, try await layer.receive(channels: ["http.response!"], timeout: .seconds(10)) != nil {
            answered += 1
        }
        worker.stop()
        await running.value
        #expect(answered == 200)
        #expect(tracker.count == 200)
        #expect(tracker.alive == 0, "\(tracker.alive) of \(tracker.count) contexts outlived their dispatch")
    }
}
