import ASGI
import CoreMetrics
import DequeModule
import Logging
import Synchronization

/// `--consumer-timeout`: a consumer that runs longer is cancelled (its next `await` that honours
/// cancellation throws `CancellationError`) and counted. A response that streams, and a request
/// whose body streams in, are exempt: their client bounds them (the server's body deadlines; a
/// client that leaves stops the consumer). A consumer that ignores cancellation keeps its slot.
///
/// Every consumer has the same timeout, so deadlines come in the order consumers start: one
/// watchdog task sleeps until the oldest running consumer's deadline, no timer per consumer.
final class ConsumerDeadlines: Sendable {
    let timeout: Duration
    private let logger: Logger

    static let timedOut = Counter(label: "channels_consumer_timeouts_total")

    private struct Running {
        let handle: TaskHandle
        let name: String
        let exempt: @Sendable () -> Bool
    }

    private struct State {
        var nextID = 0
        var running: [Int: Running] = [:]
        var order = Deque<(id: Int, deadline: ContinuousClock.Instant)>()
        var timedOut: Set<Int> = []
        var waiter: CheckedContinuation<Void, Never>?
        var stopping = false
    }

    private let state = Mutex(State())
    /// The watchdog's task, so a stop can end its sleep.
    private let watchdog = TaskHandle()
    private let count = Atomic<Int>(0)

    init(timeout: Duration, logger: Logger) {
        self.timeout = timeout
        self.logger = logger
    }

    /// Consumers cancelled at their timeout so far.
    var timedOutCount: Int { count.load(ordering: .relaxed) }

    /// A consumer starts in the task `handle` runs it in; `exempt` says, at the deadline,
    /// whether it may run on (a streaming response).
    func begin(_ handle: TaskHandle, name: String, exempt: @escaping @Sendable () -> Bool) -> Int {
        let deadline = ContinuousClock.now + timeout
        let (id, waiter) = state.withLock { state -> (Int, CheckedContinuation<Void, Never>?) in
            let id = state.nextID
            state.nextID += 1
            state.running[id] = Running(handle: handle, name: name, exempt: exempt)
            state.order.append((id, deadline))
            defer { state.waiter = nil }
            return (id, state.waiter)
        }
        waiter?.resume()
        return id
    }

    /// The consumer `id` returned; true when it had been cancelled at its timeout.
    @discardableResult
    func end(_ id: Int) -> Bool {
        let (timedOut, idle) = state.withLock { state -> (Bool, Bool) in
            state.running[id] = nil
            return (state.timedOut.remove(id) != nil, state.stopping && state.running.isEmpty)
        }
        if idle { watchdog.cancel() }
        return timedOut
    }

    /// No more consumers will start: the watchdog returns once the running ones have.
    func stop() {
        let (waiter, idle) = state.withLock { state -> (CheckedContinuation<Void, Never>?, Bool) in
            state.stopping = true
            defer { state.waiter = nil }
            return (state.waiter, state.running.isEmpty)
        }
        waiter?.resume()
        if idle { watchdog.cancel() }
    }

    /// The watchdog: sleeps until the oldest running consumer's deadline, cancels it if it still
    /// runs. Returns after `stop()`, once no consumer runs (or when cancelled).
    func watch() async {
        await watchdog.running {
            while !Task.isCancelled {
                let head = state.withLock { state -> (id: Int, deadline: ContinuousClock.Instant)?? in
                    while let first = state.order.first, state.running[first.id] == nil { state.order.removeFirst() }
                    if let first = state.order.first { return .some(first) }
                    return state.stopping ? .none : .some(nil)
                }
                guard let head else { return }  // stopped, and nothing runs
                guard let (id, deadline) = head else {
                    await withCheckedContinuation { continuation in
                        let now = state.withLock { state -> Bool in
                            if !state.order.isEmpty || state.stopping { return true }
                            state.waiter = continuation
                            return false
                        }
                        if now { continuation.resume() }
                    }
                    continue
                }
                do { try await Task.sleep(until: deadline, clock: .continuous) } catch { return }
                let overrun = state.withLock { state -> Running? in
                    if state.order.first?.id == id { state.order.removeFirst() }
                    guard let running = state.running[id], !running.exempt() else { return nil }
                    state.timedOut.insert(id)
                    return running
                }
                guard let overrun else { continue }
                count.add(1, ordering: .relaxed)
                Self.timedOut.increment()
                logger.warning(
                    "consumer ran past --consumer-timeout: cancelled",
                    metadata: ["consumer": "\(overrun.name)", "timeout_s": "\(timeout.seconds)"])
                overrun.handle.cancel()
            }
        }
    }
}
