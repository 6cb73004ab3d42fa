import ASGI
import CoreMetrics
import Foundation
import Logging
import OrderedCollections
import ServiceLifecycle
import Synchronization

/// The delay server (`rundelay`): takes `{channel, content, delay}` messages (delay in
/// milliseconds) from `asgi.delay`, keeps them in a ``DelayStore``, and sends `content` to
/// `channel` when due. Malformed messages are logged, counted and dropped; a full channel at
/// delivery time is retried a second later. A message delivered more than `lateAfter` after it
/// was due (the server was down or busy, the channel was full) is counted late.
public final class DelayServer: Service, Sendable {
    /// The channel delayed messages are sent to (`asgi.delay`), as in Channels.
    public static let channel = "asgi.delay"
    /// The layer it receives `asgi.delay` from and delivers on.
    public let layer: any ChannelLayer
    /// Where scheduled messages wait for their time.
    public let store: any DelayStore
    /// How far past its due time a delivery counts as late.
    public let lateAfter: Duration
    private let logger: Logger
    private let stopping = Atomic<Bool>(false)
    /// The task that takes `asgi.delay` messages; `stop()` cancels it.
    private let intakeTask = TaskHandle()
    private let wake = Wakeup()
    private let counters = Mutex(Counters())

    /// What the delay server has done so far.
    public struct Counters: Sendable {
        /// Messages accepted and stored for later.
        public var scheduled = 0
        /// Messages delivered on their channel.
        public var delivered = 0
        /// Of those, the ones delivered more than `lateAfter` past their due time.
        public var late = 0
        /// `asgi.delay` messages without a valid channel, content or delay: logged and dropped.
        public var malformed = 0
        /// Deliveries retried because the target channel was full.
        public var retriedFull = 0
        /// Deliveries that failed and were stored again for another try.
        public var failed = 0
        /// Messages taken for delivery that could neither be delivered nor stored again.
        public var lost = 0
    }

    /// A delay server on `layer` that keeps scheduled messages in `store`; deliveries more than
    /// `lateAfter` past due are counted late.
    public init(
        layer: any ChannelLayer, store: any DelayStore, lateAfter: Duration = .milliseconds(500),
        logger: Logger = Logger(label: "channels.delay")
    ) {
        self.layer = layer
        self.store = store
        self.lateAfter = lateAfter
        self.logger = logger
    }

    /// The counters so far.
    public var statistics: Counters { counters.withLock { $0 } }

    static func nowMillis() -> Int64 { WallClock.milliseconds }

    /// The store's clock as last read (Redis `TIME`, every 10 s) and when, on this process's
    /// monotonic clock: due times are set and compared on the store's clock, carried forward
    /// between reads by the monotonic one, so delay servers whose machines' clocks differ agree,
    /// and a step of this machine's wall clock moves nothing. Nil until read (or for a store on
    /// this process's clock, which uses the wall clock).
    private let storeClock = Mutex<(millis: Int64, at: ContinuousClock.Instant)?>(nil)

    /// Now, on the store's clock.
    func storeNow() async -> Int64 {
        if let known = storeClock.withLock({ $0 }), ContinuousClock.now - known.at < .seconds(10) {
            return known.millis + Self.milliseconds(ContinuousClock.now - known.at)
        }
        let start = ContinuousClock.now
        guard let remote = try? await store.now() else {
            // Not readable now: the last reading, carried on.
            if let known = storeClock.withLock({ $0 }) { return known.millis + Self.milliseconds(ContinuousClock.now - known.at) }
            return Self.nowMillis()
        }
        let end = ContinuousClock.now
        let middle = start + (end - start) / 2
        storeClock.withLock { $0 = (remote, middle) }
        return remote + Self.milliseconds(end - middle)
    }

    private static func milliseconds(_ duration: Duration) -> Int64 { duration.nanoseconds / 1_000_000 }

    /// Runs until `stop()`, a graceful shutdown of its service group, or cancellation.
    public func run() async {
        logger.info("delay server ready", metadata: ["channel": "\(Self.channel)"])
        await withGracefulShutdownHandler {
            await withDiscardingTaskGroup { group in
                group.addTask { await self.intakeTask.running { await self.intake() } }
                group.addTask { await self.dispatch() }
            }
        } onGracefulShutdown: {
            self.stop()
        }
        logger.info("delay server stopped", metadata: ["delivered": "\(statistics.delivered)"])
    }

    /// Asks `run()` to stop: a blocking receive is woken at once (a message it had already taken
    /// is still stored), a delivery in progress finishes.
    public func stop() {
        stopping.store(true, ordering: .relaxed)
        intakeTask.cancel()
        wake.signal()
    }

    private var isStopping: Bool { stopping.load(ordering: .relaxed) || Task.isCancelled }

    private func intake() async {
        var failures = FailureStreak()
        while !isStopping {
            do {
                guard let received = try await layer.receive(channels: [Self.channel], timeout: .seconds(30)) else { continue }
                failures.succeeded()
                try await accept(received.message)
            } catch {
                await failures.failed { count in
                    logger.error("delay intake failed", metadata: ["error": "\(error)", "failures": "\(count)"])
                }
            }
        }
    }

    /// Validates and stores one `asgi.delay` message.
    func accept(_ message: Message) async throws {
        let request: DelayRequest
        do {
            request = try DelayRequest(message)
        } catch {
            counters.withLock { $0.malformed += 1 }
            ChannelsMetrics.dropped[.malformed]?.increment()
            logger.warning(
                "dropped a malformed delay message: it needs channel (a valid name), content (a map) and delay (ms >= 0)",
                // Its keys, not its values: a message may carry cookies or tokens.
                metadata: ["keys": "\(message.fieldNames)", "error": "\(error)"])
            return
        }
        let entry = DelayEntry(channel: request.channel, content: request.content)
        try await store.schedule(entry.stored, due: await storeNow() + request.delay)
        counters.withLock { $0.scheduled += 1 }
        ChannelsMetrics.delayScheduled.increment()
        wake.signal()
    }

    private func dispatch() async {
        var failures = 0
        while !isStopping {
            var wait = Duration.seconds(1)
            do {
                while true {
                    let takenAt = ContinuousClock.now
                    let due = try await store.takeDue(now: await storeNow(), limit: 100)
                    var sent = 0
                    for entry in due {
                        // Past half its lease (this process was frozen, or its sends are slow),
                        // what is left of the take is no longer surely this server's: another
                        // may take it over at the lease's end. Left held, it goes out once,
                        // from there.
                        if let lease = store.deliveryLease, ContinuousClock.now - takenAt > lease / 2 {
                            logger.warning(
                                "half a delivery lease went by during a take; leaving the rest to the next take after the lease",
                                metadata: ["left": "\(due.count - sent)"])
                            break
                        }
                        await deliver(entry)
                        sent += 1
                    }
                    if due.count < 100 || sent < due.count { break }
                }
                if let next = try await store.nextDue() {
                    let millis = max(0, min(1000, next - (await storeNow())))
                    wait = .milliseconds(millis)
                }
                failures = 0
            } catch {
                failures += 1
                if failures == 1 || failures % 30 == 0 { logger.error("delay dispatch failed", metadata: ["error": "\(error)"]) }
                wait = Retry.backoff(after: failures)
            }
            // Woken early by a message scheduled here; the bound covers messages scheduled by
            // another delay server (and its death).
            if wait > .zero { await wake.wait(timeout: wait) }
        }
    }

    private func deliver(_ taken: DueEntry) async {
        guard let entry = DelayEntry(stored: taken.entry) else {
            counters.withLock { $0.malformed += 1 }
            logger.warning("dropped an unreadable stored delay entry")
            await finish(taken)
            return
        }
        let channel = entry.channel
        // A retried entry carries the time it was first due.
        let due = entry.firstDue ?? taken.due
        do {
            try await layer.send(entry.content, to: channel)
            await finish(taken)
            let lateness = await storeNow() - due
            let late = lateness > lateAfter.nanoseconds / 1_000_000
            counters.withLock {
                $0.delivered += 1
                if late { $0.late += 1 }
            }
            ChannelsMetrics.delayDelivered.increment()
            ChannelsMetrics.delayLateness.recordMilliseconds(max(0, lateness))
            if late {
                ChannelsMetrics.delayLate.increment()
                logger.info("delivered a delayed message late", metadata: ["channel": "\(channel)", "late_ms": "\(lateness)"])
            }
        } catch  where error.code == .channelFull {
            counters.withLock { $0.retriedFull += 1 }
            ChannelsMetrics.delayRetried.increment()
            logger.info("channel full at delivery; retrying in 1 s", metadata: ["channel": "\(channel)"])
            if await reschedule(entry, firstDue: due, taken: taken) { await finish(taken) }
        } catch {
            counters.withLock { $0.failed += 1 }
            logger.error("could not deliver a delayed message; retrying in 1 s", metadata: ["channel": "\(channel)", "error": "\(error)"])
            if await reschedule(entry, firstDue: due, taken: taken) { await finish(taken) }
        }
    }

    /// Lets the store go of a handled entry. If that fails the store hands it out again after
    /// its lease: delivered twice rather than lost.
    private func finish(_ taken: DueEntry) async {
        do {
            try await store.finished(taken)
        } catch {
            logger.warning(
                "could not mark a delayed message delivered; it may be delivered again", metadata: ["error": "\(error)"])
        }
    }

    /// Stores the envelope again for a try in a second, with the time it was first due (its
    /// lateness counts from then).
    ///
    /// - Returns: whether it was stored again. When it was not, a store that keeps what it handed
    ///   out (`taken` has a receipt) hands it out again after its lease; otherwise it is lost.
    private func reschedule(_ entry: DelayEntry, firstDue: Int64, taken: DueEntry) async -> Bool {
        var entry = entry
        entry.firstDue = firstDue
        let channel = entry.channel
        do {
            try await store.schedule(entry.stored, due: await storeNow() + 1000)
            return true
        } catch {
            if !taken.receipt.isEmpty {
                logger.error(
                    "a delayed message could not be delivered nor stored again; it is taken again when its lease lapses",
                    metadata: ["channel": "\(channel)", "error": "\(error)"])
                return false
            }
            counters.withLock { $0.lost += 1 }
            logger.error(
                "a delayed message is lost: it could not be delivered nor stored again",
                metadata: ["channel": "\(channel)", "error": "\(error)"])
            return false
        }
    }
}

extension Channel {
    /// Sends `message` to this channel after `delay`, through the delay server (`rundelay`, or
    /// the one `runserver` runs in process on the in-memory layer).
    public func send(_ message: Message, delay: Duration, immediately: Bool = false) async throws {
        let millis = delay.nanoseconds / 1_000_000
        try ChannelNames.validateChannel(name)
        let request = DelayRequest(channel: name, content: message, delay: millis)
        try await Channel(DelayServer.channel).send(request.message, immediately: immediately)
    }

    /// The same, outside a consumer.
    public func send(_ message: Message, delay: Duration, on layer: any ChannelLayer) async throws {
        let millis = delay.nanoseconds / 1_000_000
        try ChannelNames.validateChannel(name)
        try await layer.send(DelayRequest(channel: name, content: message, delay: millis).message, to: DelayServer.channel)
    }
}
