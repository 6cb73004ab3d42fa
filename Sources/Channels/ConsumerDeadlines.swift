import ASGI
import CoreMetrics
import DequeModule
import Logging
import Synchronization

/// `--consumer-timeout`: a consumer that runs longer is cancelled (its next `await` that honours
/// cancellation throws `CancellationError`) and counted. A response that streams, and a request
/// whose body streams in, are exempt: their client bounds them (the server's body deadlines; a
/// client that leaves stops the consumer). A consumer that still runs `abandonAfter` after its
/// cancellation ignores it: its slot is given back (its `abandon` action) and it is counted as
/// abandoned; it runs on in the background, holding nothing the worker waits for.
///
/// Every consumer has the same timeout, so deadlines come in the order consumers start: one
/// watchdog task sleeps until the oldest running consumer's deadline, no timer per consumer.
final class ConsumerDeadlines: Sendable {
    let timeout: Duration
    private let logger: Logger

    static let timedOut = Counter(label: "channels_consumer_timeouts_total")
    static let abandoned = Counter(label: "channels_consumers_abandoned_total")
    /// How long a cancelled consumer may take to return before its slot is given back.
    let abandonAfter: Duration

    private struct Running {
        let handle: TaskHandle
        let name: String
        /// Exempt from the deadline: a request whose body streams in.
        let uploading: Bool
        /// Asked at the deadline: a response that streams is exempt too.
        let context: ConsumerContext
        /// Gives the consumer's slot back (called once, if it ignores its cancellation).
        let abandon: (@Sendable () -> Void)?
        var exempt: Bool { uploading || context.streamChannel.withLock { $0 } != nil }
    }

    /// Consumers in the order they started (so in deadline order), by id: `entries[id - firstID]`;
    /// a finished one is nil until the watchdog passes it.
    private struct State {
        var firstID = 0
        var entries = Deque<(deadline: ContinuousClock.Instant, running: Running?)>()
        var runningCount = 0
        var timedOut: Set<Int> = []
        /// Cancelled consumers that have not returned, by id, and when each is abandoned (in
        /// cancellation order, so in that order too).
        var cancelled: [Int: Running] = [:]
        var abandonments = Deque<(at: ContinuousClock.Instant, id: Int)>()
        var waiter: CheckedContinuation<Void, Never>?
        var stopping = false

        mutating func dropFinishedHead() {
            while let first = entries.first, first.running == nil {
                entries.removeFirst()
                firstID += 1
            }
            while let first = abandonments.first, cancelled[first.id] == nil { abandonments.removeFirst() }
        }
    }

    private let state = Mutex(State())
    /// The watchdog's task, so a stop can end its sleep.
    private let watchdog = TaskHandle()
    private let count = Atomic<Int>(0)
    private let abandonedTotal = Atomic<Int>(0)

    init(timeout: Duration, abandonAfter: Duration = .seconds(5), logger: Logger) {
        self.timeout = timeout
        self.abandonAfter = abandonAfter
        self.logger = logger
    }

    /// Consumers cancelled at their timeout so far.
    var timedOutCount: Int { count.load(ordering: .relaxed) }
    /// Cancelled consumers that ignored it, whose slot was given back, so far.
    var abandonedCount: Int { abandonedTotal.load(ordering: .relaxed) }

    /// A consumer starts in the task `handle` runs it in; `abandon` gives its slot back if it
    /// ignores its cancellation.
    func begin(
        _ handle: TaskHandle, name: String, context: ConsumerContext, uploading: Bool,
        abandon: (@Sendable () -> Void)? = nil
    ) -> Int {
        let deadline = ContinuousClock.now + timeout
        let (id, waiter) = state.withLock { state -> (Int, CheckedContinuation<Void, Never>?) in
            let id = state.firstID + state.entries.count
            state.entries.append(
                (deadline, Running(handle: handle, name: name, uploading: uploading, context: context, abandon: abandon)))
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
            state.cancelled[id] = nil
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
                // The next thing due: the oldest running consumer's deadline, or the oldest
                // cancelled one's abandonment.
                let next = state.withLock { state -> ContinuousClock.Instant?? in
                    state.dropFinishedHead()
                    let due = [state.entries.first?.deadline, state.abandonments.first?.at].compactMap { $0 }.min()
                    if let due { return .some(due) }
                    return state.stopping ? .none : .some(nil)
                }
                guard let next else { return }  // stopped, and nothing runs
                guard let due = next else {
                    await withCheckedContinuation { continuation in
                        let now = state.withLock { state -> Bool in
                            if !state.entries.isEmpty || !state.abandonments.isEmpty || state.stopping { return true }
                            state.waiter = continuation
                            return false
                        }
                        if now { continuation.resume() }
                    }
                    continue
                }
                do { try await Task.sleep(until: due, clock: .continuous) } catch { return }
                cancelOverrunning()
                abandonIgnoring()
            }
        }
    }

    /// Cancels the running consumers past their deadline (and not exempt).
    private func cancelOverrunning() {
        let now = ContinuousClock.now
        while true {
            let overrun = state.withLock { state -> Running?? in
                guard let first = state.entries.first, first.deadline <= now else { return .none }
                let id = state.firstID
                // Past its deadline once: it is not looked at again (exempt or cancelled).
                let running = state.entries[0].running
                state.entries[0].running = nil
                if running != nil { state.runningCount -= 1 }
                state.dropFinishedHead()
                guard let running, !running.exempt else { return .some(nil) }
                state.timedOut.insert(id)
                state.cancelled[id] = running
                state.abandonments.append((now + abandonAfter, id))
                return .some(running)
            }
            guard let overrun else { return }
            guard let overrun else { continue }
            count.add(1, ordering: .relaxed)
            Self.timedOut.increment()
            logger.warning(
                "consumer ran past --consumer-timeout: cancelled",
                metadata: ["consumer": "\(overrun.name)", "timeout_s": "\(timeout.seconds)"])
            overrun.handle.cancel()
        }
    }

    /// Gives back the slots of cancelled consumers that still run `abandonAfter` later.
    private func abandonIgnoring() {
        let now = ContinuousClock.now
        while true {
            let ignoring = state.withLock { state -> Running?? in
                guard let first = state.abandonments.first, first.at <= now else { return .none }
                state.abandonments.removeFirst()
                return .some(state.cancelled.removeValue(forKey: first.id))
            }
            guard let ignoring else { return }
            guard let ignoring else { continue }
            guard let abandon = ignoring.abandon else {
                logger.error(
                    "consumer ignores its cancellation (it holds no slot of its own)",
                    metadata: ["consumer": "\(ignoring.name)", "after_s": "\((timeout + abandonAfter).seconds)"])
                continue
            }
            abandonedTotal.add(1, ordering: .relaxed)
            Self.abandoned.increment()
            logger.error(
                "consumer ignores its cancellation: its slot is given back; it keeps running in the background",
                metadata: ["consumer": "\(ignoring.name)", "after_s": "\((timeout + abandonAfter).seconds)"])
            abandon()
        }
    }
}
