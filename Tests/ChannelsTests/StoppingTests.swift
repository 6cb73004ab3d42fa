import ASGI
import Channels
import Logging
import ServiceLifecycle
import Synchronization
import TestSupport
import Testing

final class Counter: Sendable {
    private let count = Atomic<Int>(0)
    func add() { count.add(1, ordering: .relaxed) }
    var value: Int { count.load(ordering: .relaxed) }
}

/// Workers and the delay server stop at once, in the middle of a blocking receive,
/// and lose nothing a stop interrupts. A bound of 15 s: without the wake-up, a stop would wait for
/// the receive's 30 s (Redis: `BLPOP` slices of 60 s here). Not less: CI runs this beside the
/// whole suite, where timers fire seconds late, and a 5 s bound once ran out on a stop that
/// worked.
@Suite("stopping workers and the delay server", .timeLimit(.minutes(2)))
struct StoppingTests {
    enum Layer: String, CaseIterable, CustomTestStringConvertible {
        case memory, redis
        var testDescription: String { rawValue }
        func make() throws -> any ChannelLayer {
            switch self {
            case .memory: InMemoryChannelLayer(configuration: .init(capacity: 10_000))
            case .redis:
                // BLPOPs as long as the receive itself: only a wake-up ends one early.
                try TestRedis.layer(capacity: 10_000, blockingSlice: .seconds(60))
            }
        }
    }

    /// Half the receive's 30 s: a stop that is not woken fails it.
    static let stopBound = Duration.seconds(15)

    /// Whether `body` returned within `bound`; it is left running (and reported) when not.
    func returns(within bound: Duration, _ body: @escaping @Sendable () async -> Void) async -> Bool {
        await withTaskGroup(of: Bool.self) { group in
            group.addTask {
                await body()
                return true
            }
            group.addTask {
                try? await Task.sleep(for: bound)
                return false
            }
            let first = await group.next()!
            group.cancelAll()
            return first
        }
    }

    func counting(_ processed: Counter) throws -> Router {
        try Router([
            route(
                "work",
                { _ in processed.add() })
        ])
    }

    @Test(arguments: Layer.allCases)
    func stopWakesAWorkerBlockedInReceive(_ kind: Layer) async throws {
        let layer = try kind.make()
        let processed = Counter()
        let worker = Worker(router: try counting(processed), layer: layer, concurrency: 2)
        let running = Task { await worker.run() }
        // One message through, so the worker is back in its (now blocking) receive.
        try await layer.send(["n": 0], to: "work")
        while processed.value < 1 { try await Task.sleep(for: .milliseconds(10)) }
        try await Task.sleep(for: .milliseconds(200))
        worker.stop()
        let stopped = await returns(within: Self.stopBound) { await running.value }
        #expect(stopped, "stop() did not reach the blocking receive: run() still waits")
        // The layer is still usable after the wake-up (Redis: the blocking connection was unblocked, not cut).
        try await layer.send(["n": 1], to: "work")
        #expect(try await layer.receive(channels: ["work"], timeout: .seconds(5))?.message["n"] == 1)
    }

    /// Messages keep arriving while the worker is stopped: every one is either run or still
    /// queued afterwards, none is taken and dropped by the interrupted receive.
    @Test(arguments: Layer.allCases)
    func aStopWhileMessagesFlowLosesNone(_ kind: Layer) async throws {
        let layer = try kind.make()
        let processed = Counter()
        let worker = Worker(router: try counting(processed), layer: layer, concurrency: 4)
        let running = Task { await worker.run() }
        let total = 400
        for n in 0..<total {
            try await layer.send(["n": .int(Int64(n))], to: "work")
            if n == total / 2 { worker.stop() }
            if n % 20 == 0 { try await Task.sleep(for: .milliseconds(2)) }
        }
        let stopped = await returns(within: Self.stopBound) { await running.value }
        #expect(stopped)
        var left = 0
        while try await layer.receive(channels: ["work"], timeout: .zero) != nil { left += 1 }
        #expect(processed.value + left == total, "processed \(processed.value), left \(left)")
        #expect(processed.value > 0)
    }

    /// In a service group: a graceful shutdown stops an idle worker and delay server at once;
    /// a worker that finishes the queue first runs what was queued.
    @Test(arguments: Layer.allCases)
    func aGracefulShutdownStopsTheServicesAtOnce(_ kind: Layer) async throws {
        let layer = try kind.make()
        let processed = Counter()
        let worker = Worker(router: try counting(processed), layer: layer, concurrency: 2, finishQueuedOnShutdown: true)
        let delay = DelayServer(layer: layer, store: InMemoryDelayStore())
        let group = ServiceGroup(
            configuration: .init(services: [delay, worker], logger: Logger(label: "test")))
        let running = Task { try await group.run() }
        try await Task.sleep(for: .milliseconds(300))
        await group.triggerGracefulShutdown()
        let stopped = await returns(within: Self.stopBound) { _ = try? await running.value }
        #expect(stopped, "the services did not stop on a graceful shutdown")
        #expect(processed.value == 0)
    }

    @Test(arguments: Layer.allCases)
    func stopWakesADelayServerBlockedInReceive(_ kind: Layer) async throws {
        let layer = try kind.make()
        let delay = DelayServer(layer: layer, store: InMemoryDelayStore())
        let running = Task { await delay.run() }
        try await Channel("out").send(["n": 1], delay: .milliseconds(10), on: layer)
        #expect(try await layer.receive(channels: ["out"], timeout: .seconds(10))?.message["n"] == 1)
        try await Task.sleep(for: .milliseconds(200))
        delay.stop()
        let stopped = await returns(within: Self.stopBound) { await running.value }
        #expect(stopped, "stop() did not reach the delay server's blocking receive")
    }
}
