import ASGI
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

    /// No gaps skipped yet.
    public init() {}

    /// Messages skipped so far.
    public var skipped: Int { skippedCount.load(ordering: .relaxed) }

    func countSkipped(_ count: Int) { skippedCount.add(count, ordering: .relaxed) }
    /// True when the caller should start watching `waitChannel` (nobody here does yet).
    func watch(_ waitChannel: String) -> Bool { watched.withLock { $0.insert(waitChannel).inserted } }
    func unwatch(_ waitChannel: String) { _ = watched.withLock { $0.remove(waitChannel) } }

    /// Whether the order of `waitChannel` has stood at `next` for longer than `timeout` as this
    /// process saw it: the first sighting starts the clock, a different `next` restarts it.
    func stuckLongerThan(_ timeout: Duration, waitChannel: String, next: Int64) -> Bool {
        let now = ContinuousClock.now
        return stuck.withLock { stuck in
            if let seen = stuck[waitChannel], seen.next == next { return now - seen.since > timeout }
            if stuck.count > 10_000 { stuck = stuck.filter { now - $0.value.since < timeout * 10 } }
            stuck[waitChannel] = (next, now)
            return false
        }
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
            throw SessionError("enforceOrdering needs an 'order' key; a message on '\(context.channel)' has none")
        }
        try await OrderingGate(context: context, session: session, order: order, slight: slight).run(consumer) {
            context.logger.warning("wait channel full; closing the socket with 1013", metadata: ["order": "\(order)"])
            try await context.reply(WebSocketSendMessage.close(code: 1013), immediately: true)
        }
    }
}

/// The receiving half of an ordered hand-off (see ``ConsumerContext/send(_:to:orderedBy:immediately:)``):
/// messages sent with the same key are handled in the order they were sent, across any
/// number of workers. Messages sent without a key pass straight through. The sequence's state
/// is deleted when its end comes (the socket that numbered it disconnected).
public func inSendOrder(_ consumer: @escaping Consumer) -> Consumer {
    { context in
        guard let key = context.message[OrderedHandoff.keyField]?.stringValue,
            let order = context.message[OrderedHandoff.orderField]?.intValue
        else {
            return try await consumer(context)
        }
        let settings = context.environment.sessionSettings
        let session = try await Session.load(
            key: OrderedHandoff.sessionKey("next", channel: context.channel, key: key, secret: settings.secret),
            store: context.environment.sessionStore, settings: settings, ttl: settings.channelSessionAge,
            log: .consumer(context))
        let isEnd = context.message[OrderedHandoff.endField]?.boolValue == true
        try await OrderingGate(context: context, session: session, order: order, slight: false).run(
            isEnd ? { _ in } : consumer
        ) {
            throw ChannelLayerError.channelFull("the wait channel of a sequence on '\(context.channel)'")
        }
        if isEnd && !context.extras.withLock({ $0.parked }) { try await session.delete() }
    }
}

/// Names and fields of the ordered hand-off.
enum OrderedHandoff {
    static let keyField = "__order_key"
    static let orderField = "__order"
    static let endField = "__order_end"
    static let sentField = "__sent"

    /// A session per (channel, key) for the sender's counter ("sent") and the receiver's next
    /// order ("next"): "ord" and an HMAC, a form no HTTP session key has.
    static func sessionKey(_ role: String, channel: String, key: String, secret: DeploymentSecret) -> String {
        "ord" + secret.hex("ordered-handoff", role + ":" + channel + ":" + key, length: 61)
    }
}

extension ConsumerContext {
    /// Sends `message` to `channel` numbered in the sequence of `key`, so that a consumer
    /// wrapped in ``inSendOrder(_:)`` handles the messages of one key in the order they were
    /// sent here, however many workers run it. Call it from one consumer at a time per key
    /// (for example, under ``enforceOrdering(slight:_:)`` with the socket's reply channel as the key).
    /// Called under a channel session, the sequence ends (its state on both sides is deleted)
    /// when the socket disconnects.
    public func send(_ message: Message, to channel: String, orderedBy key: String, immediately: Bool = false) async throws {
        if let socket = loadedChannelSession {
            let pair: ASGIValue = .array([.string(channel), .string(key)])
            var handoffs = socket[ChannelSessionKey.handoffs]?.arrayValue ?? []
            if !handoffs.contains(pair) {
                handoffs.append(pair)
                socket[ChannelSessionKey.handoffs] = .array(handoffs)
            }
        }
        try await sendNumbered(message, to: channel, orderedBy: key, immediately: immediately, end: false)
    }

    /// Sends the end of `key`'s sequence on `channel` (the receiver deletes its state when the
    /// end's turn comes) and deletes the sender's counter.
    func endOrderedSequence(to channel: String, orderedBy key: String) async throws {
        try await sendNumbered([:], to: channel, orderedBy: key, immediately: false, end: true)
    }

    private func sendNumbered(_ message: Message, to channel: String, orderedBy key: String, immediately: Bool, end: Bool)
        async throws
    {
        let settings = environment.sessionSettings
        let counter = try await Session.load(
            key: OrderedHandoff.sessionKey("sent", channel: channel, key: key, secret: settings.secret),
            store: environment.sessionStore, settings: settings, ttl: settings.channelSessionAge,
            log: .consumer(self))
        let sequence = counter[OrderedHandoff.sentField]?.intValue ?? 0
        if end {
            // Nothing stored means the sequence never started (or already ended).
            guard counter.isStored else { return }
            try await counter.delete()
        } else {
            counter[OrderedHandoff.sentField] = .int(sequence + 1)
            try await counter.save()
        }
        var stamped = message
        stamped[OrderedHandoff.keyField] = .string(key)
        stamped[OrderedHandoff.orderField] = .int(sequence)
        if end { stamped[OrderedHandoff.endField] = .bool(true) }
        try await send(stamped, to: channel, immediately: immediately)
    }
}

extension Channel {
    /// ``ConsumerContext/send(_:to:orderedBy:immediately:)`` from inside a consumer.
    public func send(_ message: Message, orderedBy key: String, immediately: Bool = false) async throws {
        guard let context = ConsumerContext.current else {
            throw ChannelLayerError(.invalidConfiguration, "an ordered send needs a consumer context")
        }
        try await context.send(message, to: name, orderedBy: key, immediately: immediately)
    }
}

/// Runs a consumer when its message's turn has come, parks it otherwise, and after each turn
/// runs the parked messages that became due.
struct OrderingGate {
    static let nextOrderKey = "__channels_next_order"
    /// When the order last moved (UNIX milliseconds, the writer's clock): for people reading a
    /// session; a gap's age is measured by each process's own monotonic clock (``OrderingGaps``).
    static let movedAtKey = "__channels_order_moved"
    /// The wait channel a drain loop up the stack is already emptying: nested turns leave it to that loop.
    @TaskLocal static var draining: String?

    let context: ConsumerContext
    /// Where the next expected order is kept.
    let session: Session
    let order: Int64
    let slight: Bool

    /// A hash of the session key: the wait channel's name (seen in `stats`) does not give the key away.
    private var waitChannel: String {
        CapacityTable.waitChannelPrefix + Session.storageKey("wait:" + (session.key ?? "")).prefix(40)
    }

    private func isDue(next: Int64) -> Bool { slight ? (order == 0 || next >= 1) : order == next }

    /// - Parameter waitFull: what to do when the message cannot be parked (the wait channel stayed full).
    func run(_ consumer: Consumer, waitFull: () async throws -> Void) async throws {
        let next = session[Self.nextOrderKey]?.intValue ?? 0
        if !isDue(next: next) {
            if order < next && !slight {
                context.logger.warning(
                    "dropped a message older than the next order",
                    metadata: ["channel": "\(context.channel)", "order": "\(order)", "next": "\(next)"])
                return
            }
            do {
                try await park()
                context.extras.withLock { $0.parked = true }
            } catch let error as ChannelLayerError where error.code == .channelFull {
                try await waitFull()
                return
            }
            // The message that was due may have finished between our read of the session and
            // our park, and found the wait channel empty: if our turn has come, drain ourselves.
            // If the order has not moved for the gap timeout (by this process's own clock), the
            // due message is lost: skip it.
            let (stored, _) = try await storedState()
            if isDue(next: stored) {
                await drain()
            } else if gaps.stuckLongerThan(context.environment.orderingGapTimeout, waitChannel: waitChannel, next: stored) {
                await drain(skippingGapFrom: stored)
            } else if context.environment.orderingGaps.watch(waitChannel) {
                // Nothing may arrive to trigger that check again: look after the gap timeout.
                let gate = self
                Task { await gate.watchGap() }
            }
            return
        }
        do {
            try await consumer(context)
        } catch {
            await context.flush()
            try await advance()
            throw error
        }
        // The replies of this message go out before the next message may run, so the client
        // sees them in order too.
        await context.flush()
        try await advance()
    }

    /// Records that `order` was handled, saves, then runs what became due.
    private func advance() async throws {
        let next = session[Self.nextOrderKey]?.intValue ?? 0
        if order + 1 > next { session[Self.nextOrderKey] = .int(order + 1) }
        session[Self.movedAtKey] = .int(Self.nowMillis())
        // Saved before the wait channel is drained, so what runs next sees the new order.
        try await session.save()
        await drain()
    }

    private func park() async throws {
        let parked: Message = ["channel": .string(context.channel), "content": .map(context.message.fields), "order": .int(order)]
        try await context.send(parked, to: waitChannel, immediately: true)
    }

    private var gaps: OrderingGaps { context.environment.orderingGaps }

    /// Runs (once per wait channel and process at a time) while messages stay parked: after
    /// each gap timeout, runs what became due, or skips a gap that is now old enough.
    private func watchGap() async {
        defer { context.environment.orderingGaps.unwatch(waitChannel) }
        while !Task.isCancelled {
            try? await Task.sleep(for: context.environment.orderingGapTimeout + .milliseconds(100))
            guard let (stored, _) = try? await storedState() else { return }
            if gaps.stuckLongerThan(context.environment.orderingGapTimeout, waitChannel: waitChannel, next: stored) {
                await drain(skippingGapFrom: stored)
            } else {
                await drain()
            }
            guard let pending = try? await context.layer.channelStatistics(waitChannel).messagesPending, pending > 0 else { return }
        }
    }

    /// The next order as stored now (another worker may have moved it).
    private func storedNext() async throws -> Int64 { try await storedState().next }

    private func storedState() async throws -> (next: Int64, movedAt: Int64?) {
        guard let key = session.key, let raw = try await context.environment.sessionStore.load(Session.storageKey(key)) else {
            return (0, nil)
        }
        let data = try? Session.decodeStored(raw, settings: context.environment.sessionSettings)
        return (data?[Self.nextOrderKey]?.intValue ?? 0, data?[Self.movedAtKey]?.intValue)
    }

    static func nowMillis() -> Int64 {
        let now = Date().timeIntervalSince1970
        return Int64(now * 1000)
    }

    /// Moves the stored order from `from` past a gap to `to` (unless another worker moved it).
    private func skipGap(from: Int64, to: Int64) async -> Bool {
        guard let key = session.key else { return false }
        do {
            let stored = try await Session.load(
                key: key, store: context.environment.sessionStore,
                settings: context.environment.sessionSettings, ttl: session.ttl, log: .consumer(context))
            guard (stored[Self.nextOrderKey]?.intValue ?? 0) == from else { return false }
            stored[Self.nextOrderKey] = .int(to)
            stored[Self.movedAtKey] = .int(Self.nowMillis())
            try await stored.save()
            context.environment.orderingGaps.countSkipped(Int(to - from))
            context.logger.warning(
                "skipped messages that never arrived; running the ones after them",
                metadata: ["channel": "\(context.channel)", "from": "\(from)", "to": "\(to)"])
            return true
        } catch {
            context.logger.error("could not skip an ordering gap", metadata: ["error": "\(error)"])
            return false
        }
    }

    /// Takes every parked message and runs, in order, those whose turn has come; puts the
    /// others back. Repeats while that made progress or the order moved meanwhile.
    private func drain(skippingGapFrom gap: Int64? = nil) async {
        var gap = gap
        guard Self.draining != waitChannel else { return }
        await Self.$draining.withValue(waitChannel) {
            while true {
                let parked: [ReceivedMessage]
                do {
                    parked = try await context.layer.receiveBatch(channels: [waitChannel], max: 1024, timeout: .zero)
                } catch {
                    context.logger.error("could not read the wait channel", metadata: ["error": "\(error)"])
                    return
                }
                if parked.isEmpty { return }
                var entries: [(order: Int64, channel: String, message: Message)] = []
                for received in parked {
                    guard let channel = received.message["channel"]?.stringValue,
                        let content = received.message["content"]?.mapValue,
                        let order = received.message["order"]?.intValue ?? Message(content)["order"]?.intValue
                    else {
                        context.logger.warning("dropped a malformed parked message", metadata: ["wait_channel": "\(waitChannel)"])
                        continue
                    }
                    entries.append((order, channel, Message(content)))
                }
                entries.sort { $0.order < $1.order }
                var progressed = false
                var next: Int64
                do { next = try await storedNext() } catch { next = -1 }
                var index = 0
                while index < entries.count, next >= 0,
                    slight ? (entries[index].order == 0 || next >= 1) : entries[index].order <= next
                {
                    let entry = entries[index]
                    index += 1
                    await run(entry.message, on: entry.channel)
                    progressed = true
                    do { next = try await storedNext() } catch { next = -1 }
                }
                if !progressed, let from = gap, index < entries.count, from == next, entries[index].order > next {
                    gap = nil
                    if await skipGap(from: from, to: entries[index].order) {
                        next = entries[index].order
                        while index < entries.count, entries[index].order <= next {
                            let entry = entries[index]
                            index += 1
                            await run(entry.message, on: entry.channel)
                            progressed = true
                            do { next = try await storedNext() } catch { next = -1 }
                        }
                    }
                }
                let before = next
                for entry in entries[index...] {
                    do {
                        try await retrying(for: context.environment.sendRetry) {
                            try await context.layer.send(
                                [
                                    "channel": .string(entry.channel), "content": .map(entry.message.fields),
                                    "order": .int(entry.order),
                                ], to: waitChannel)
                        }
                    } catch {
                        context.logger.error(
                            "could not park a message again; it is lost",
                            metadata: ["channel": "\(entry.channel)", "order": "\(entry.order)", "error": "\(error)"])
                    }
                }
                if index == entries.count && !progressed { return }
                if !progressed {
                    // Put back before this read: a turn that ends after it drains them itself.
                    let now = (try? await storedNext()) ?? before
                    if now == before { return }
                }
            }
        }
    }

    /// Runs a parked message through the worker's routing, as if it had just arrived.
    private func run(_ message: Message, on channel: String) async {
        if let dispatch = context.dispatcher {
            await dispatch(ReceivedMessage(channel: channel, message: message))
        } else {
            do {
                try await context.layer.send(message, to: channel)
            } catch {
                context.logger.error("could not re-queue a parked message", metadata: ["channel": "\(channel)", "error": "\(error)"])
            }
        }
    }
}
