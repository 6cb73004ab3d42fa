import ASGI
import Channels
import Synchronization
import Testing

/// A socket whose consumer hangs holds one worker slot, not one per frame it sent meanwhile:
/// everyone else's frames keep being served.
@Suite("worker fairness", .timeLimit(.minutes(1)))
struct WorkerFairnessTests {
    @Test func aHungSocketsQueuedFramesDoNotTakeTheWorkersSlots() async throws {
        let layer = InMemoryChannelLayer(configuration: .init(capacity: 10_000))
        let served = Counter()
        let release = Gate()
        let worker = Worker(
            router: try Router([
                route(
                    "websocket.receive",
                    { context in
                        if context.message.replyChannel == "hung!" {
                            await release.wait()
                        } else {
                            served.add()
                        }
                    })
            ]), layer: layer, concurrency: 2)
        let running = Task { await worker.run() }
        // The hung socket sends 20 frames first (each would take a slot while it waits behind
        // the first), then 50 other sockets send 2 frames each.
        for order in 1...20 {
            try await layer.send(["reply_channel": "hung!", "path": "/", "order": .int(Int64(order))], to: "websocket.receive")
        }
        for socket in 0..<50 {
            for order in 1...2 {
                try await layer.send(
                    ["reply_channel": .string("s\(socket)!"), "path": "/", "order": .int(Int64(order))], to: "websocket.receive")
            }
        }
        var waited = 0
        while served.value < 100, waited < 1000 {
            try await Task.sleep(for: .milliseconds(10))
            waited += 1
        }
        #expect(served.value == 100, "the other sockets got \(served.value) of 100 frames served while one socket hung")
        release.open()
        worker.stop()
        await running.value
    }
}
