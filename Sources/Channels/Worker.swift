import ASGI
import CoreMetrics
import DequeModule
import Logging
import OrderedCollections
import ServiceLifecycle
import Synchronization

/// Pulls messages from the channels the routing names and runs the matching consumers, up to
/// `concurrency` at once.
public final class Worker: Service, Sendable {
    /// The routing the worker dispatches with.
    public let router: Router
    /// The layer it receives from and sends on.
    public let layer: any ChannelLayer
    /// The channels it listens on (the routing's channels after `only` / `exclude`).
    public let channels: [String]
    /// Sessions, users, retry and ordering settings handed to every consumer.
    public let environment: ConsumerEnvironment
    private let concurrency: Int
    let logger: Logger
    let retriesDropped = Atomic<Int>(0)
    let sendsDropped = Atomic<Int>(0)
    let unroutedCount = Atomic<Int>(0)

    /// How many times a message may be put back with `ConsumerError.consumeLater`.
    public static let maxRetries = 10
    /// The key that carries a re-queued message's retry count.
    public static let retryKey = "__retries__"

    private let mailboxes = Mailboxes()
    /// See `init`'s `consumerExecutors`; `nextExecutor` counts the turns.
    private let consumerExecutors: [any TaskExecutor]
    private let nextExecutor = Atomic<Int>(0)

    /// The executor the next consumer task prefers (nil: the global one).
    private func consumerExecutor() -> (any TaskExecutor)? {
        guard !consumerExecutors.isEmpty else { return nil }
        let turn = nextExecutor.add(1, ordering: .relaxed).oldValue
        return consumerExecutors[turn % consumerExecutors.count]
    }
    /// Multi-message HTTP responses in progress, stopped when their client leaves.
    public let streams: ResponseStreams
    /// Whether it runs, and how it stops.
    /// Where a shutdown stands: running, taking nothing more, or taking what is queued first.
    private enum Stop: Int, AtomicRepresentable {
        case running, stopTaking, finishQueued
    }
    private let stopping = Atomic<Stop>(.running)
    /// Free consumer slots.
    private let slots: Slots
    /// `consumerTimeout`'s watchdog.
    let deadlines: ConsumerDeadlines?

    /// Consumers cancelled at `consumerTimeout` so far.
    public var consumersTimedOut: Int { deadlines?.timedOutCount ?? 0 }
    /// Cancelled consumers that ignored their cancellation and whose slot was given back.
    public var consumersAbandoned: Int { deadlines?.abandonedCount ?? 0 }
    /// Whether a graceful shutdown takes what is queued before stopping (`finishQueuedThenStop`).
    public let finishQueuedOnShutdown: Bool
    let processed = Atomic<Int>(0)

    /// A worker that takes messages off `layer` and runs `router`'s consumers for them.
    ///
    /// - Parameters:
    ///   - router: the application's routes.
    ///   - layer: the channel layer to receive from.
    ///   - concurrency: consumers run at once (worker slots; `runworker --threads`).
    ///   - only: glob patterns; when given, only matching channels are listened on.
    ///   - exclude: glob patterns of channels not to listen on.
    ///   - consumerTimeout: a consumer that runs longer is cancelled and counted (nil: no limit);
    ///     a streaming HTTP response is exempt (its client bounds it).
    ///   - finishQueuedOnShutdown: on a graceful shutdown, take what is queued before stopping
    ///     (the only worker of an in-process layer); otherwise stop taking at once (other workers
    ///     read on).
    ///   - middleware: around every consumer, the first outermost (see ``ConsumerMiddleware``).
    ///   - hooks: called when the worker is ready and around each consumer.
    ///   - environment: what consumers see besides their message (sessions, users, settings).
    ///   - logger: where the worker logs.
    ///   - abandonAfter: how long a cancelled consumer may ignore its cancellation before its
    ///     slot is given back (counted as abandoned).
    ///   - consumerExecutors: executors the consumers' tasks prefer, taken in turn (none: the
    ///     global concurrent executor). `runworker` gives the event loops its Redis connections
    ///     live on: a consumer's layer calls then go out and come back on its own thread, with
    ///     no hand-over between threads on either side of each round trip.
    ///   - streamLeaseDuration: how long a streamed response's lease lasts unless renewed
    ///     (`ResponseStreamLeases`): the server cuts the response this long after the worker
    ///     died (two seconds at least).
    public init(
        router: Router, layer: any ChannelLayer, concurrency: Int = 4, only: [String] = [],
        exclude: [String] = [], environment: ConsumerEnvironment = ConsumerEnvironment(),
        finishQueuedOnShutdown: Bool = false, consumerTimeout: Duration? = .seconds(60),
        middleware: [ConsumerMiddleware] = [], hooks: WorkerHooks = WorkerHooks(),
        logger: Logger = Logger(label: "channels.worker"), abandonAfter: Duration = .seconds(5),
        consumerExecutors: [any TaskExecutor] = [], streamLeaseDuration: Duration = .seconds(20)
    ) {
        self.streams = ResponseStreams(leaseDuration: streamLeaseDuration)
        self.consumerExecutors = consumerExecutors
        self.middleware = middleware
        self.hooks = hooks
        self.finishQueuedOnShutdown = finishQueuedOnShutdown
        self.deadlines = consumerTimeout.map { ConsumerDeadlines(timeout: $0, abandonAfter: abandonAfter, logger: logger) }
        self.router = router
        self.environment = environment
        self.layer = layer
        self.concurrency = max(1, concurrency)
        self.logger = logger
        // Channels 1.x defaults: connects are accepted and HTTP gets 404 even when unrouted, and
        // the other WebSocket channels are drained (and counted) so they never fill up.
        var listen = router.channels.union([ASGIChannel.httpRequest] + ASGIChannel.websocket)
        if !only.isEmpty {
            let patterns = only.map(GlobPattern.init)
            listen = listen.filter { name in patterns.contains { $0.matches(name) } }
        }
        let excluded = exclude.map(GlobPattern.init)
        listen = listen.filter { name in !excluded.contains { $0.matches(name) } }
        // A connection's last message after its others when one batch takes both (a batch takes
        // its lists' messages in this order): the disconnects last.
        self.channels = listen.sorted { ($0.hasSuffix(".disconnect") ? 1 : 0, $0) < ($1.hasSuffix(".disconnect") ? 1 : 0, $1) }
        self.wakeChannel = "worker." + ChannelNames.randomLetters(10) + "!"
        self.receivingChannels = self.channels + [wakeChannel]
        // A slot more for each other channel (up to a quarter of `concurrency`), kept for channels
        // that hold none: a flood on one never takes what the others need to move, and the
        // flooded one still has all of `concurrency`.
        self.slots = Slots(self.concurrency, reserve: min(max(0, self.channels.count - 1), max(1, self.concurrency / 4)))
    }

    let middleware: [ConsumerMiddleware]
    let hooks: WorkerHooks

    /// A process channel of this worker's where a stop wakes the receive loop.
    private let wakeChannel: String

    /// `channels`, and the wake channel.
    private let receivingChannels: [String]

    /// Messages handed to consumers so far.
    public var messagesProcessed: Int { processed.load(ordering: .relaxed) }

    /// Runs until `stop()` or a graceful shutdown of the service group it runs in, then lets the
    /// consumers in hand finish and returns; cancelling the task that runs it cancels them too.
    ///
    /// One receive loop takes as many messages as there are free consumer slots in one call (one
    /// Redis round trip while messages flow; a blocking wait when none do) and starts a consumer
    /// task for each; when every slot is busy it waits for one to finish. A stop wakes a blocking
    /// receive at once with a message to the worker's own inbox (what the receive had already
    /// taken is still run); cancellation reaches it too (Redis: `CLIENT UNBLOCK`).
    public func run() async {
        logger.info("worker ready", metadata: ["channels": "\(channels.joined(separator: ", "))", "concurrency": "\(concurrency)"])
        await hooks.ready?()
        guard !channels.isEmpty else {
            logger.warning("no channels to listen on")
            return
        }
        // Cancelled (the shutdown grace is over, or the caller gave up): the consumers still
        // running are cancelled with it.
        let slots = self.slots
        let logger = self.logger
        await withTaskCancellationHandler {
            // The inbox (credit for streamed responses, their clients leaving) is read by a
            // loop of its own, whatever the consumer slots: consumers waiting for credit hold
            // them. It runs until the consumers are done, so responses in flight at a stop still
            // get their credit and finish.
            await withDiscardingTaskGroup { group in
                group.addTask { await self.readInbox() }
                group.addTask { await self.streams.keepLeases(on: self.layer) }
                await serve()
                // Copies an ordering gate held back for their grace run before the worker
                // stops (a grace each at most, then their consumers).
                await environment.orderingGaps.heldBack.finished()
                group.cancelAll()
            }
        } onCancel: {
            logger.warning(
                "shutdown grace over: cancelling the consumers in hand", metadata: ["in_hand": "\(slots.total - slots.freeCount)"])
        }
        logger.info("worker stopped", metadata: ["processed": "\(messagesProcessed)"])
    }

    /// The receive loop and the consumers it starts, until stopped.
    private func serve() async {
        // Ordered sockets whose every watching worker died are taken over (it stops with the
        // receive loop: a stopping worker takes nothing more over).
        let sweeper = Task { [layer, environment, logger] in
            await OrderingSweeper(layer: layer, environment: environment, logger: logger).run()
        }
        defer { sweeper.cancel() }
        await withGracefulShutdownHandler {
            await withDiscardingTaskGroup { group in
                if let deadlines { group.addTask { await deadlines.watch() } }
                defer { deadlines?.stop() }
                var failures = FailureStreak()
                // With only the reserved slots free: when the idle channels were last looked at,
                // and the pause between looks.
                var idleLooked: (channels: [String], at: ContinuousClock.Instant)?
                var reservedPause = Backoff(first: .milliseconds(20), cap: .milliseconds(500))
                while !Task.isCancelled {
                    let mode = stopping.load(ordering: .relaxed)
                    if mode == .stopTaking { break }
                    let draining = mode == .finishQueued
                    let free = await slots.waitForFree()
                    guard free > 0 else { continue }  // woken by a stop
                    // Every channel keeps a slot for itself: a flood on one (a socket whose
                    // consumer waits for room in a channel this worker drains) cannot take the
                    // slots the other channels need to move.
                    let share = slots.share(of: channels)
                    if share.reservedOnly && !draining, let looked = idleLooked, looked.channels == share.channels,
                        ContinuousClock.now - looked.at < reservedPause.pause
                    {
                        // Looked at these idle channels a moment ago and found nothing: wait for a
                        // slot to come free, or until it is time to look again (a saturated
                        // channel costs one look per pause, not one per finished consumer). A
                        // channel that became idle since is looked at at once.
                        await waitForSlot(
                            after: free, timeout: reservedPause.pause - (ContinuousClock.now - looked.at), pause: &reservedPause)
                        continue
                    }
                    let batch: [ReceivedMessage]
                    do {
                        // Blocks until a message comes (or a stop's wake-up); the bound only renews
                        // the wait now and then. Draining takes only what is already queued. Only
                        // the reserved slots left: what waits on an idle channel, without waiting;
                        // if nothing does, the loop waits below for a slot to come free.
                        batch = try await layer.receiveBatch(
                            channels: share.channels + [wakeChannel], max: share.max,
                            timeout: draining || share.reservedOnly ? .zero : .seconds(30))
                        failures.succeeded()
                    } catch {
                        if Task.isCancelled { break }
                        await failures.failed { count in
                            logger.error("receive failed", metadata: ["error": "\(error)", "failures": "\(count)"])
                        }
                        continue
                    }
                    if share.reservedOnly && !draining {
                        if batch.isEmpty {
                            idleLooked = (share.channels, ContinuousClock.now)
                            await waitForSlot(after: free, timeout: reservedPause.pause, pause: &reservedPause)
                            continue
                        }
                        idleLooked = nil
                        reservedPause.reset()
                    }
                    if draining && batch.isEmpty {
                        // Queued work is done when nothing is queued while no consumer runs (one
                        // that runs may still send to these channels): wait for them, then look again.
                        if free == slots.total { break }
                        _ = await slots.waitForFree(atLeast: slots.total)
                        continue
                    }
                    slots.take(batch)
                    start(batch, in: &group)
                }
            }
        } onGracefulShutdown: {
            if self.finishQueuedOnShutdown { self.finishQueuedThenStop() } else { self.stop() }
        }
    }

    /// Waits (here, not on the layer) for a slot to come free, at most `timeout`. The pause
    /// between looks at the idle channels goes back to 20 ms when one does, and grows to half a
    /// second while none does (every slot held by hung consumers).
    private func waitForSlot(after free: Int, timeout: Duration, pause: inout Backoff) async {
        let slots = self.slots
        let timer = Task {
            // Not when cancelled (a slot came free first).
            guard (try? await Task.sleep(for: timeout)) != nil else { return }
            slots.interrupt()
        }
        let now = await slots.waitForFree(atLeast: free + 1)
        timer.cancel()
        if now > free { pause.reset() } else { _ = pause.next() }
    }

    /// Gives back a consumer slot.
    private func release(_ channel: String) { slots.release(channel) }

    /// Ends a blocking receive at once with a message to the wake channel (which it always
    /// reads; the message means nothing).
    private func wakeReceive() {
        let layer = self.layer
        let channel = wakeChannel + "x"
        Task { try? await layer.send(["wake": true], to: channel) }
    }

    /// Wakes the receive loop: from waiting for a free slot at once, from a blocking receive with
    /// a message to its wake channel (which it always reads; the message means nothing).
    private func wake() {
        slots.interrupt()
        wakeReceive()
    }

    /// Reads the inbox until cancelled: credit and disconnects for streamed responses.
    private func readInbox() async {
        var failures = FailureStreak()
        while !Task.isCancelled {
            do {
                let batch = try await layer.receiveBatch(channels: [streams.inbox], max: 64, timeout: .seconds(30))
                failures.succeeded()
                for received in batch { streams.received(received) }
            } catch {
                if Task.isCancelled { return }
                await failures.failed { count in
                    logger.error("inbox receive failed", metadata: ["error": "\(error)", "failures": "\(count)"])
                }
            }
        }
    }

    /// What is queued now, without waiting; nothing when the layer fails (the drain ends).
    private func takeWithoutWaiting(max: Int) async -> [ReceivedMessage] {
        do {
            return try await layer.receiveBatch(channels: receivingChannels, max: max, timeout: .zero)
        } catch {
            logger.error("receive failed while finishing the queued messages", metadata: ["error": "\(error)"])
            return []
        }
    }

    /// Starts a consumer task for each message of `batch` (each already holds a slot).
    private func start(_ batch: [ReceivedMessage], in group: inout DiscardingTaskGroup) {
        for received in batch {
            if received.channel.hasPrefix(wakeChannel) {
                // A stop's wake-up: nothing to run.
                self.release(received.channel)
                continue
            }
            guard let socket = Self.socketKey(received) else {
                group.addTask(executorPreference: consumerExecutor()) {
                    let lease = SlotLease(channel: received.channel, slots: self.slots)
                    await self.dispatchTimed(received, lease: lease)
                    lease.giveBack()
                }
                continue
            }
            // One socket's messages run one after another, in the order received: a burst from
            // one socket is never raced against itself in this process. Slots are for running
            // consumers: a message that waits behind its socket's running one gives its slot back
            // (up to `Mailboxes.freeWaiting` per socket; past that it keeps it, so one socket's
            // flood still slows the receive loop down instead of piling up here).
            switch mailboxes.post(received, to: socket) {
            case .queued(holdsSlot: true):
                continue
            case .queued(holdsSlot: false):
                self.release(received.channel)
                continue
            case .run:
                break
            }
            group.addTask(executorPreference: consumerExecutor()) {
                await self.runSocket(socket, first: received, slotChannel: received.channel)
            }
        }
    }

    /// Runs one socket's messages in order, `first` and then its mailbox, holding one slot
    /// (taken for a message of `slotChannel`).
    private func runSocket(_ socket: String, first: ReceivedMessage?, slotChannel: String) async {
        var next: (message: ReceivedMessage, holdsSlot: Bool)? = first.map { ($0, false) } ?? mailboxes.next(for: socket)
        let lease = SlotLease(channel: slotChannel, slots: slots)
        // Each message starts from the sessions the one before it saved (``SessionHandOn``).
        let handOn = SessionHandOn(maxAge: SessionHandOn.maxAge(gapTimeout: environment.orderingGapTimeout))
        while let (message, holdsSlot) = next {
            let timedOut = await RunningSocket.$current.withValue(RunningSocket(key: socket, mailboxes: mailboxes)) {
                await SessionHandOn.$current.withValue(handOn) { await dispatchTimed(message, lease: lease) }
            }
            if holdsSlot { release(message.channel) }
            if timedOut {
                // A consumer that ignored its cancellation had its slot given back meanwhile:
                // the chain takes one again for the socket's next messages.
                if !lease.keep() { slots.retake(slotChannel) }
                // This task is cancelled for good: the socket's next messages run in a fresh,
                // uncancelled one (the slot goes with them), which this one waits for, so the
                // worker's task group (and a drain at shutdown) still waits for them too.
                await Task { await self.runSocket(socket, first: nil, slotChannel: slotChannel) }.value
                return
            }
            next = mailboxes.next(for: socket)
        }
        lease.giveBack()  // the chain's own
    }

    /// Stops taking messages (a blocking receive is woken at once); the consumers in hand finish.
    public func stop() {
        _ = stopping.compareExchange(expected: .running, desired: .stopTaking, ordering: .relaxed)
        wake()
    }

    /// Takes what is queued now (and what its consumers queue while it does), then stops: a
    /// worker that is the only one on its layer (`runserver`'s in-process workers) stops this way,
    /// so the `websocket.disconnect` of every socket the server closed runs.
    public func finishQueuedThenStop() {
        _ = stopping.compareExchange(expected: .running, desired: .finishQueued, ordering: .relaxed)
        wake()
    }
}
