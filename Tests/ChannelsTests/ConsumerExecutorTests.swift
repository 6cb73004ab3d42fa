import ASGI
import Channels
import Dispatch
import Synchronization
import TestSupport
import Testing

/// A task executor on a serial dispatch queue of its own, which tells whether the code asking
/// runs on it.
final class QueueExecutor: TaskExecutor, @unchecked Sendable {
    let name: String
    private let queue: DispatchQueue
    private let key = DispatchSpecificKey<String>()

    init(_ name: String) {
        self.name = name
        queue = DispatchQueue(label: name)
        queue.setSpecific(key: key, value: name)
    }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        queue.async { job.runSynchronously(on: self.asUnownedTaskExecutor()) }
    }

    var isCurrent: Bool { DispatchQueue.getSpecific(key: key) == name }
}

final class Notes: Sendable {
    let names = Mutex<[String]>([])
}

/// `runworker` runs its consumers on the event loops its Redis connections live on (a round
/// trip then starts and ends on the consumer's own thread): the worker's `consumerExecutors`.
@Suite("consumer executors", .timeLimit(.minutes(1)))
struct ConsumerExecutorTests {
    enum Layer: String, CaseIterable, CustomTestStringConvertible {
        case memory, redis
        var testDescription: String { rawValue }
        func make() throws -> any ChannelLayer {
            switch self {
            case .memory: InMemoryChannelLayer(configuration: .init(capacity: 1_000))
            case .redis: try TestRedis.layer(capacity: 1_000)
            }
        }
    }

    /// On a real Redis too: the consumer's round trips (its send, the socket ordering's reads)
    /// come back to its executor.
    @Test(arguments: Layer.allCases)
    func consumersRunOnTheGivenExecutorsInTurnBeforeAndAfterEachAwait(_ kind: Layer) async throws {
        let layer = try kind.make()
        let executors = [QueueExecutor("first"), QueueExecutor("second")]
        let seen = Notes()
        let note: @Sendable () -> Void = {
            let name = executors.first { $0.isCurrent }?.name ?? "elsewhere"
            seen.names.withLock { $0.append(name) }
        }
        let consumer: Consumer = { context in
            note()
            // A layer call and a yield: the consumer comes back to its executor after each.
            try await context.send(["n": .int(1)], to: "sink")
            await Task.yield()
            note()
        }
        // Plain messages, and a socket's (run one after another from its mailbox).
        let router = try Router([route("work", consumer), route("websocket.receive", consumer)])
        let worker = Worker(router: router, layer: layer, concurrency: 4, consumerExecutors: executors)
        let running = Task { await worker.run() }
        for _ in 0..<20 { try await layer.send(["x": 1], to: "work") }
        for socket in 0..<5 {
            for order in 1...2 {
                try await layer.send(
                    ["reply_channel": .string("s\(socket)!"), "path": "/", "order": .int(Int64(order))], to: "websocket.receive")
            }
        }
        var waited = 0
        while seen.names.withLock({ $0.count }) < 60, waited < 1000 {
            try await Task.sleep(for: .milliseconds(10))
            waited += 1
        }
        worker.stop()
        await running.value
        let names = seen.names.withLock { $0 }
        #expect(names.count == 60, "\(names.count) of 60 notes")
        #expect(!names.contains("elsewhere"), "\(names.filter { $0 == "elsewhere" }.count) notes off the given executors")
        #expect(names.contains("first") && names.contains("second"), "both executors take turns: \(Set(names))")
    }
}
