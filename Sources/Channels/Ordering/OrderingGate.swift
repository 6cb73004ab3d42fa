import ASGI
import CoreMetrics
import Foundation
import Logging
import Synchronization

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
        let parked = ParkedMessage(channel: context.channel, content: context.message, order: order)
        try await context.send(parked.message, to: waitChannel, immediately: true)
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
        let data = try? Session.decodeStored(raw, settings: context.environment.sessionConfiguration)
        return (data?[Self.nextOrderKey]?.intValue ?? 0, data?[Self.movedAtKey]?.intValue)
    }

    static func nowMillis() -> Int64 { WallClock.milliseconds }

    /// Moves the stored order from `from` past a gap to `to` (unless another worker moved it).
    private func skipGap(from: Int64, to: Int64) async -> Bool {
        guard let key = session.key else { return false }
        do {
            let stored = try await Session.load(
                key: key, store: context.environment.sessionStore,
                settings: context.environment.sessionConfiguration, ttl: session.ttl, log: .consumer(context))
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
                var entries: [ParkedMessage] = []
                for received in parked {
                    guard let entry = ParkedMessage(received.message) else {
                        ChannelsMetrics.dropped[.malformed]?.increment()
                        context.logger.warning(
                            "dropped a malformed parked message (counted in channels_dropped_total{reason=\"malformed\"})",
                            metadata: ["wait_channel": "\(waitChannel)", "keys": "\(received.message.fieldNames)"])
                        continue
                    }
                    entries.append(entry)
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
                    await run(entry.content, on: entry.channel)
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
                            await run(entry.content, on: entry.channel)
                            progressed = true
                            do { next = try await storedNext() } catch { next = -1 }
                        }
                    }
                }
                let before = next
                for entry in entries[index...] {
                    do {
                        try await retrying(for: context.environment.sendRetry) {
                            try await context.layer.send(entry.message, to: waitChannel)
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
