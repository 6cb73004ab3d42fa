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
        /// Exempt from the deadline: a request whose body streams in.
        let uploading: Bool
        /// Asked at the deadline: a response that streams is exempt too.
        let context: ConsumerContext
        var exempt: Bool { uploading || context.streamChannel.withLock { $0 } != nil }
    }

    /// Consumers in the order they started (so in deadline order), by id: `entries[id - firstID]`;
    /// a finished one is nil until the watchdog passes it.
    private struct State {
        var firstID = 0
        var entries = Deque<(deadline: ContinuousClock.Instant, running: Running?)>()
        var runningCount = 0
        var timedOut: Set<Int> = []
        var waiter: CheckedContinuation<Void, Never>?
        var stopping = false

        mutating func dropFinishedHead() {
            while let first = entries.first, first.running == nil {
                entries.removeFirst()
                firstID += 1
            }
        }
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

    /// A consumer starts in the task `handle` runs it in.
    func begin(_ handle: TaskHandle, name: String, context: ConsumerContext, uploading: Bool) -> Int {
        let deadline = ContinuousClock.now + timeout
        let (id, waiter) = state.withLock { state -> (Int, CheckedContinuation<Void, Never>?) in
            let id = state.firstID + state.entries.count
            state.entries.append((deadline, Running(handle: handle, name: name, uploading: uploading, context: context)))
            state.runningCount += 1
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
            let index = id - state.firstID
            if index >= 0, index < state.entries.count, state.entries[index].running != nil {
                state.entries[index].running = nil
                state.runningCount -= 1
            }
            state.dropFinishedHead()
            return (state.timedOut.remove(id) != nil, state.stopping && state.runningCount == 0)
        }
        if idle { watchdog.cancel() }
        return timedOut
    }

    /// No more consumers will start: the watchdog returns once the running ones have.
    func stop() {
        let (waiter, idle) = state.withLock { state -> (CheckedContinuation<Void, Never>?, Bool) in
            state.stopping = true
            defer { state.waiter = nil }
            return (state.waiter, state.runningCount == 0)
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
                    state.dropFinishedHead()
                    if let first = state.entries.first { return .some((state.firstID, first.deadline)) }
                    return state.stopping ? .none : .some(nil)
                }
                guard let head else { return }  // stopped, and nothing runs
                guard let (id, deadline) = head else {
                    await withCheckedContinuation { continuation in
                        let now = state.withLock { state -> Bool in
                            if !state.entries.isEmpty || state.stopping { return true }
                            state.waiter = continuation
                            return false
                        }
                        if now { continuation.resume() }
                    }
                    continue
                }
                do { try await Task.sleep(until: deadline, clock: .continuous) } catch { return }
                let overrun = state.withLock { state -> Running? in
                    let index = id - state.firstID
                    guard index >= 0, index < state.entries.count, let running = state.entries[index].running else { return nil }
                    // Past its deadline once: it is not looked at again (exempt or cancelled).
                    state.entries[index].running = nil
                    state.runningCount -= 1
                    state.dropFinishedHead()
                    guard !running.exempt else { return nil }
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
