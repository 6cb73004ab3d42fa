import ASGI
import CoreMetrics
import Foundation
import Logging
import Synchronization

/// The ordering wrappers' state of one worker (held by its ``ConsumerEnvironment``): messages
/// skipped by ``enforceOrdering(slight:_:)`` and ``inSendOrder(_:)`` because they never arrived
/// within the gap timeout, and the wait channels a gap watch already covers.
public final class OrderingGaps: Sendable {
    private let skippedCount = Atomic<Int>(0)
    private let watched = Mutex<Set<String>>([])
    /// Per wait channel, the stored next order this process saw stuck and since when (its own
    /// monotonic clock): a gap's age never compares two machines' wall clocks.
    private let stuck = Mutex<[String: (next: Int64, since: ContinuousClock.Instant)]>([:])

    /// Copies held back for their grace (a worker's shutdown waits for them).
    let heldBack = HeldBack()

    /// No gaps skipped yet.
    public init() {}

    /// Messages skipped so far.
    public var skipped: Int { skippedCount.load(ordering: .relaxed) }

    func countSkipped(_ count: Int) {
        skippedCount.add(count, ordering: .relaxed)
        ChannelsMetrics.orderingSkipped.increment(by: count)
    }
    /// True when the caller should start watching `waitChannel` (nobody here does yet).
    func watch(_ waitChannel: String) -> Bool { watched.withLock { $0.insert(waitChannel).inserted } }
    func unwatch(_ waitChannel: String) { _ = watched.withLock { $0.remove(waitChannel) } }
    /// Whether a gap watch of this process covers `waitChannel` now.
    func isWatched(_ waitChannel: String) -> Bool { watched.withLock { $0.contains(waitChannel) } }

    /// What this process parked on one wait channel.
    private struct Parks {
        /// When it parked each order whose message came on the channel the others come on (its
        /// own monotonic clock): the evidence ``provenLost(_:waitChannel:next:)`` reads.
        var times: [Int64: ContinuousClock.Instant] = [:]
        /// When the last gap found lost by its age was found so (``foundLost(_:waiting:)``).
        var lostSince: ContinuousClock.Instant?
        /// The order last judged (a lower one later means the sequence began again).
        var lastNext = Int64.min
    }
    private let parkedHere = Mutex<[String: Parks]>([:])
    /// How many times this process parked on each wait channel (a watch that ends tells from it
    /// whether one parked here since its last look).
    private let parkCounts = Mutex<[String: Int]>([:])

    /// The count of this process's parks on `waitChannel` so far.
    func parkCount(_ waitChannel: String) -> Int { parkCounts.withLock { $0[waitChannel] ?? 0 } }

    /// Records that this process parked a message of `order` on `waitChannel`; `sameChannel`
    /// when the message came on the channel the sequence's other messages come on (a socket's
    /// frames on `websocket.receive`, not its connect or disconnect).
    func parked(_ waitChannel: String, order: Int64, sameChannel: Bool) {
        let now = ContinuousClock.now
        parkCounts.withLock { counts in
            if counts.count > 100_000 { counts = [:] }
            counts[waitChannel, default: 0] &+= 1
        }
        parkedHere.withLock { parked in
            if parked.count > 100_000 { parked = [:] }
            var parks = parked[waitChannel] ?? Parks()
            if sameChannel, parks.times.count < 4096, parks.times[order] == nil { parks.times[order] = now }
            parked[waitChannel] = parks
        }
    }

    /// Forgets what this process parked on `waitChannel` (nothing of it waits any more).
    func forgetParked(_ waitChannel: String) {
        _ = parkedHere.withLock { $0.removeValue(forKey: waitChannel) }
        _ = stuck.withLock { $0.removeValue(forKey: waitChannel) }
    }

    /// Whether the message of `next` is lost, judged from the last gap this process found lost
    /// by its age on `waitChannel` (the order stood still for the gap timeout from `lostSince`):
    /// if this process parked a later message of the same channel before that stand began, the
    /// message of `next` was taken before it (one channel's messages are taken in the order
    /// they were sent); nothing of the socket ran during the stand, and no turn takes a message
    /// before its order comes (a skip looks at what waits without taking it), so the message
    /// of `next` sat all that time in the hands of a worker that never parked or ran it: dead,
    /// or stuck as long as the first gap's. Lost on the same evidence, it is skipped after a
    /// short grace, not after a gap timeout of its own (a dead worker leaves every other message of a burst
    /// missing, with two workers). Order 0 (a connect, on a channel of its own) is never judged
    /// this way; a park older than ten timeouts is forgotten; a sequence that began again (its
    /// sender's counter lost: the order went back) starts with no evidence.
    ///
    /// The evidence alone is not enough: the message of `next` may have been parked and taken
    /// by a turn an instant ago (a drain takes an order's message when its turn comes, and the
    /// order moves only when it ran). So the order must also have stood at `next` for
    /// ``provenGrace(_:)`` as this process saw it, far longer than a turn takes from taking
    /// its message to its gate; ``evidencePending(_:waitChannel:next:)`` tells the gap watch
    /// to look again then.
    func provenLost(_ timeout: Duration, waitChannel: String, next: Int64) -> Bool {
        guard hasEvidence(timeout, waitChannel: waitChannel, next: next) else { return false }
        let now = ContinuousClock.now
        return stuck.withLock { stuck in
            if let seen = stuck[waitChannel], seen.next == next { return now - seen.since >= Self.provenGrace(timeout) }
            stuck[waitChannel] = (next, now)
            return false
        }
    }

    /// How long the order must stand at a gap the one before it proves lost: an eighth of the
    /// gap timeout (1.25 s at the default 10 s), far more than a turn takes from taking its
    /// message to its gate, and short enough that the dozens of gaps a dead worker can leave
    /// in a burst go in seconds.
    static func provenGrace(_ timeout: Duration) -> Duration { timeout / 8 }

    /// Whether a gap at `next` has the evidence of the one before it and waits only for its
    /// grace (the gap watch then looks again after the grace, not after a whole gap timeout).
    func evidencePending(_ timeout: Duration, waitChannel: String, next: Int64) -> Bool {
        hasEvidence(timeout, waitChannel: waitChannel, next: next)
    }

    private func hasEvidence(_ timeout: Duration, waitChannel: String, next: Int64) -> Bool {
        guard next > 0 else { return false }
        let now = ContinuousClock.now
        return parkedHere.withLock { parked in
            guard var parks = parked[waitChannel], let lostSince = parks.lostSince else { return false }
            if next < parks.lastNext {
                parks.times = [:]
                parks.lostSince = nil
            }
            parks.lastNext = next
            parks.times = parks.times.filter { $0.key > next && now - $0.value < timeout * 10 }
            parked[waitChannel] = parks
            return parks.lostSince != nil && parks.times.values.contains { $0 < lostSince }
        }
    }

    /// Records that the order of `waitChannel` stood still for the gap timeout (its gap is
    /// lost), after `waiting` (the orders seen waiting after it, counted without taking) were
    /// noted as seen: each was taken from its channel before this moment. (One may be the
    /// socket's disconnect, which comes on a channel of its own: with its receives more than
    /// a gap timeout behind in `websocket.receive`, those are taken for lost, as the first gap
    /// itself is.)
    func foundLost(_ waitChannel: String, waiting: [Int64]) {
        let now = ContinuousClock.now
        parkedHere.withLock { parked in
            if parked.count > 100_000 { parked = [:] }
            var parks = parked[waitChannel] ?? Parks()
            for order in waiting where parks.times.count < 4096 && parks.times[order] == nil {
                parks.times[order] = now
            }
            parks.lostSince = ContinuousClock.now
            parked[waitChannel] = parks
        }
    }

    /// Whether the order of `waitChannel` has stood at `next` for longer than `timeout` as this
    /// process saw it: the first sighting starts the clock, a different `next` restarts it.
    func stuckLongerThan(_ timeout: Duration, waitChannel: String, next: Int64) -> Bool {
        let now = ContinuousClock.now
        let since: ContinuousClock.Instant? = stuck.withLock { stuck in
            if let seen = stuck[waitChannel], seen.next == next { return now - seen.since > timeout ? seen.since : nil }
            if stuck.count > 10_000 { stuck = stuck.filter { now - $0.value.since < timeout * 10 } }
            stuck[waitChannel] = (next, now)
            return nil
        }
        return since != nil
    }
}

/// `enforce_ordering`: the messages of one WebSocket are handled strictly in their `order`
/// (connect = 0 first), whatever worker picks them up and whenever they arrive.
///
/// A message that comes early is parked on the socket's wait channel. The worker that handles
/// the message that was due then takes the parked ones and runs those whose turn has come
/// itself, in order, without sending them through `websocket.receive` again. The next
/// expected order lives in the channel session. With `slight: true` only the connect must
/// come first; later messages are handled as they come. A wait channel that stays full
/// closes the socket with 1013 (try again later): a wedged socket is worse than a closed one.
/// A message that never comes (lost with a worker that was killed while holding it) holds
/// the others back for `environment.orderingGapTimeout`; then the gap is skipped, logged and
/// counted, and the parked messages run.
///
/// The wrapper includes `channelSession`.
public func enforceOrdering(slight: Bool = false, _ consumer: @escaping Consumer) -> Consumer {
    channelSession { context in
        let session = try context.channelSession
        let order: Int64
        if let value = context.message["order"]?.intValue {
            order = value
        } else if context.channel == ASGIChannel.websocketConnect {
            order = 0
        } else {
            throw SessionError(.noOrder, "enforceOrdering needs an 'order' key; a message on '\(context.channel)' has none")
        }
        try await OrderingGate(context: context, session: session, order: order, slight: slight).run(consumer) {
            context.logger.warning("wait channel full; closing the socket with 1013", metadata: ["order": "\(order)"])
            try await context.reply(WebSocketSendMessage.close(code: 1013), immediately: true)
        }
    }
}

/// What the receiver of an ordered hand-off does with a message's epoch.
enum EpochStep { case follow, straggler }

/// Follows the sender's epoch: the first one is adopted; a new one means the sender's counter
/// was lost and began again at 0, so the receiver's next order starts again (logged); one it
/// left behind marks a straggler.
func followEpoch(_ epoch: String, session: Session, context: ConsumerContext) async throws -> EpochStep {
    let current = session[OrderedHandoff.currentEpochKey]?.stringValue
    if current == epoch { return .follow }
    let old = session[OrderedHandoff.oldEpochsKey]?.arrayValue?.compactMap(\.stringValue) ?? []
    if old.contains(epoch) {
        context.logger.warning(
            "a message of an ordered sequence this receiver already left (its sender's counter was lost and began again); running it unordered",
            metadata: ["channel": "\(context.channel)"])
        return .straggler
    }
    if let current {
        let next = session[OrderingGate.nextOrderKey]?.intValue ?? 0
        context.logger.warning(
            "an ordered sequence began again (its sender's counter was lost: evicted or expired); following the new one",
            metadata: ["channel": "\(context.channel)", "next_was": "\(next)"])
        session[OrderingGate.nextOrderKey] = .int(0)
        session[OrderedHandoff.oldEpochsKey] = .array((old + [current]).suffix(4).map { .string($0) })
    }
    session[OrderedHandoff.currentEpochKey] = .string(epoch)
    try await session.save()
    return .follow
}

/// The receiving half of an ordered hand-off (see ``ConsumerContext/send(_:to:orderedBy:immediately:)``):
/// messages sent with the same key are handled in the order they were sent, across any
/// number of workers. Messages sent without a key pass straight through. The sequence's state
/// is deleted when its end comes (the socket that numbered it disconnected).
public func inSendOrder(_ consumer: @escaping Consumer) -> Consumer {
    { context in
        guard let stamp = OrderStamp(context.message) else { return try await consumer(context) }
        let settings = context.environment.sessionConfiguration
        let session = try await Session.load(
            key: OrderedHandoff.sessionKey("next", channel: context.channel, key: stamp.key, secret: settings.secret),
            store: context.environment.sessionStore, settings: settings, ttl: settings.channelSessionAge,
            log: .consumer(context), handedOn: true)
        let isEnd = stamp.end
        // A new epoch resets the order: decided on what is stored, not on a copy handed on.
        if let epoch = stamp.epoch, session[OrderedHandoff.currentEpochKey]?.stringValue != epoch {
            _ = try await session.reloadIfHandedOn()
        }
        if let epoch = stamp.epoch {
            switch try await followEpoch(epoch, session: session, context: context) {
            case .follow: break
            case .straggler:
                // A message of a sequence this receiver already left: run it, unordered.
                return isEnd ? () : try await consumer(context)
            }
        }
        try await OrderingGate(context: context, session: session, order: stamp.order, slight: false).run(
            isEnd ? { _ in } : consumer
        ) {
            throw ChannelLayerError.channelFull("the wait channel of a sequence on '\(context.channel)'")
        }
        if isEnd && !context.extras.withLock({ $0.parked }) { try await session.delete() }
    }
}

/// Messages an ordering gate holds back for a grace before they run (a copy sent again after a
/// lost connection: `Message.resentField`), so a worker's shutdown waits for them instead of
/// exiting with them in memory.
final class HeldBack: Sendable {
    private struct State {
        var count = 0
        var nextWaiter = 0
        var waiters: [Int: CheckedContinuation<Void, Never>] = [:]
    }
    private let state = Mutex(State())

    /// How many wait for their grace to end, or run after it.
    var count: Int { state.withLock { $0.count } }

    /// Runs `then` after `grace` in a task of its own (not a consumer slot).
    func hold(for grace: Duration, then run: @escaping @Sendable () async -> Void) {
        state.withLock { $0.count += 1 }
        Task.detached {
            try? await Task.sleep(for: grace)
            await run()
            let waiters = self.state.withLock { state -> [CheckedContinuation<Void, Never>] in
                state.count -= 1
                guard state.count == 0 else { return [] }
                defer { state.waiters = [:] }
                return Array(state.waiters.values)
            }
            for waiter in waiters { waiter.resume() }
        }
    }

    /// Returns once nothing is held back (at once when nothing is), or when the caller is cancelled.
    func finished() async {
        let id = state.withLock { state -> Int in
            state.nextWaiter += 1
            return state.nextWaiter
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let resumeNow = state.withLock { state -> Bool in
                    if state.count == 0 || Task.isCancelled { return true }
                    state.waiters[id] = continuation
                    return false
                }
                if resumeNow { continuation.resume() }
            }
        } onCancel: {
            state.withLock { $0.waiters.removeValue(forKey: id) }?.resume()
        }
    }
}
