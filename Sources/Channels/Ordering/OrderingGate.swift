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
    /// On a copy held back for `resentGrace` (`Message.resentField`) when it comes back.
    static let heldResentField = "__resent_held"
    /// In the session: the order a held-back copy took the turn of (a first copy of that order
    /// met later is dropped).
    static let resentClaimKey = "__channels_resent_claim"

    let context: ConsumerContext
    /// Where the next expected order is kept.
    let session: Session
    let order: Int64
    let slight: Bool

    /// A hash of the session key: the wait channel's name (seen in `stats`) does not give the key
    /// away. Made once per gate (a turn reads it a dozen times; each was a SHA-256).
    private let waitChannel: String

    init(context: ConsumerContext, session: Session, order: Int64, slight: Bool) {
        self.context = context
        self.session = session
        self.order = order
        self.slight = slight
        self.waitChannel = CapacityTable.waitChannelPrefix + Session.storageKey("wait:" + (session.key ?? "")).prefix(40)
    }

    /// Where a message of `order` waits: a channel of its own per order (`<wait channel>.<order>`),
    /// so the turn that comes takes exactly the message that is due and never takes, and puts
    /// back, the ones still early (with two workers taking a burst of one socket's messages,
    /// that churn cost more than the messages themselves). `slight` ordering waits only for
    /// the connect, and every message then runs at once: one channel for all of them.
    private func parkingChannel(for order: Int64) -> String {
        slight ? waitChannel : waitChannel + "." + String(order)
    }

    /// Where a message of `order` parks while the order stands at `next`: its order's channel,
    /// or, further ahead than a message may wait (only a disconnect is let through that far),
    /// the shared channel, where the gap watch's first look finds it.
    private func parkingChannel(for order: Int64, next: Int64) -> String {
        !slight && order - next >= parkingLimit ? waitChannel : parkingChannel(for: order)
    }

    /// How far ahead of its turn a message may be and still wait: the wait channels' capacity
    /// (a socket cannot have more messages waiting than that).
    private var parkingLimit: Int64 {
        Int64(context.layer.configuredCapacity(for: waitChannel) ?? CapacityTable.waitChannelCapacity(defaultCapacity: 100))
    }

    private func isDue(next: Int64) -> Bool { slight ? (order == 0 || next >= 1) : order == next }

    /// - Parameter waitFull: what to do when the message cannot be parked (the wait channel stayed full).
    func run(_ consumer: Consumer, waitFull: () async throws -> Void) async throws {
        // No socket sends that many messages: an order that would leave nothing after it is
        // malformed (counted), not a turn that could move the order past every later message.
        guard order < Int64.max else {
            // Not the socket's end either: its session stays for the messages that are.
            context.extras.withLock { $0.parked = true }
            ChannelsMetrics.dropped[.malformed]?.increment()
            context.logger.warning(
                "dropped a message whose order is past any a socket reaches (counted in channels_dropped_total{reason=\"malformed\"})",
                metadata: ["channel": "\(context.channel)", "order": "\(order)"])
            return
        }
        var next = session[Self.nextOrderKey]?.intValue ?? 0
        // A copy handed on from this task's last turn (``SessionHandOn``) that another worker's
        // turns may have passed since: not due on it, the store decides (and every later turn of
        // this task reads the store too: a drain of this socket runs its messages inline, and
        // each judged on that copy was parked again and left behind by the drain).
        if !isDue(next: next), try await session.reloadIfHandedOn() {
            next = session[Self.nextOrderKey]?.intValue ?? 0
        }
        if !isDue(next: next) {
            if order < next && !slight {
                ChannelsMetrics.dropped[.late]?.increment()
                context.logger.warning(
                    "dropped a message older than the next order (counted in channels_dropped_total{reason=\"late\"})",
                    metadata: ["channel": "\(context.channel)", "order": "\(order)", "next": "\(next)"])
                return
            }
            // A disconnect always waits: refused, the socket's cleanup (its groups, its
            // session) would never run.
            if !slight && order - next >= parkingLimit && context.channel != ASGIChannel.websocketDisconnect {
                try await waitFull()
                return
            }
            // A lease before the park, when there is none (no watch, here or elsewhere, holds
            // one): a process that died between its park and its watch's first renewal left its
            // parked message to nobody (no lease for a sweeper to find lapsed) until the socket
            // sent again. Only a free one: taken over, a live watch's lease would go with this
            // gate's release below. (A watch of this process that ends between this look and
            // the park leaves the few milliseconds until the next watch's first hold, as before.)
            let lease = gaps.isWatched(waitChannel) ? nil : await takeFreeLease(next: next)
            do {
                try await park(next: next)
                context.extras.withLock { $0.parked = true }
            } catch let error as ChannelLayerError where error.code == .channelFull {
                if let lease { await releaseLease(lease) }
                try await waitFull()
                return
            } catch {
                if let lease { await releaseLease(lease) }
                throw error
            }
            // The message that was due may have finished between our read of the session and
            // our park, and found the wait channel empty: if our turn has come, drain ourselves.
            // If the order has not moved for the gap timeout (by this process's own clock), the
            // due message is lost: skip it. (A read that fails leaves the lease to lapse: a
            // sweeper then looks at what waits.)
            let (stored, _) = try await storedState()
            enum Then { case dropAsLate, drain, skipLostAndDrain, watch, nothing }
            let then: Then =
                if !slight && stored > order && parkingChannel(for: order, next: next) != waitChannel {
                    .dropAsLate
                } else if isDue(next: stored) {
                    .drain
                } else if gaps.stuckLongerThan(context.environment.orderingGapTimeout, waitChannel: waitChannel, next: stored) {
                    .skipLostAndDrain
                } else if gaps.watch(waitChannel) {
                    .watch
                } else {
                    // A watch of this process covers the socket.
                    .nothing
                }
            // The lease is taken on by the watch this turn starts; else given up, alongside what
            // runs (a drain of long consumers must not keep a lease it does not renew; a watch
            // started since wrote a note of its own, which the release leaves).
            if then != .watch, let lease {
                let gate = self
                Task { await gate.releaseLease(lease) }
            }
            switch then {
            case .dropAsLate:
                // A skip moved the order past this message while it parked: nobody would take
                // it again. Taken back and dropped as late (counted), not left to expire.
                dropOlder(await take([parkingChannel(for: order, next: next)]).filter { $0.order < stored }, next: stored)
            case .drain:
                await drain(from: stored)
            case .skipLostAndDrain:
                await foundLost()
                await drain(from: stored, skippingGapFrom: stored)
            case .watch:
                // Nothing may arrive to trigger that check again: look after the gap timeout.
                // Detached: a watch started inside a drain must not inherit its `draining` mark.
                let gate = self
                let watchLease = lease ?? WatchLease(next: stored)
                Task.detached { await gate.watchGap(from: stored, lease: watchLease) }
            case .nothing:
                break
            }
            return
        }
        if !slight {
            if context.message[Self.heldResentField] != nil {
                // Back from its grace and due: the turn is this copy's only if no other copy of
                // the order took it (sent again twice, two held copies come back together).
                guard await claimResentTurn() else { return dropSecondCopy() }
            } else if session[Self.resentClaimKey]?.intValue == order {
                // A copy sent again took this order's turn after its grace: this is the first
                // copy, found late (it waited in another worker longer than the grace).
                return dropSecondCopy()
            } else if context.message.isResent, let dispatch = context.dispatcher {
                return holdBackResent(dispatch)
            }
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

    /// A message sent again after a lost connection (`Message.resentField`) whose turn has
    /// come: the first try may have been stored too, and that copy may be running in another
    /// worker right now, on the same order read from the store (the order only moves when a
    /// turn ends). So this copy waits `resentGrace` (in a task of its own, not in a consumer
    /// slot), then goes through the routing again unmarked and reads the order anew: dropped as
    /// late when the first copy ran meanwhile, run when there was none. (A first copy that runs
    /// longer than the grace still runs twice.)
    private func holdBackResent(_ dispatch: @escaping @Sendable (ReceivedMessage) async -> Void) {
        // Not this message's end: the session stays for its turn.
        context.extras.withLock { $0.parked = true }
        var again = context.message
        again.removeValue(forKey: Message.resentField)
        again[Self.heldResentField] = .bool(true)
        // Longer than a copy of the session handed on between one worker's turns is used
        // without reading the store (`SessionHandOn`): a first copy that starts after the
        // claim below reads the store, and finds the claim.
        let handOnAge = SessionHandOn.maxAge(gapTimeout: context.environment.orderingGapTimeout)
        let (channel, grace) = (context.channel, max(context.environment.resentGrace, handOnAge + .milliseconds(100)))
        ChannelsMetrics.resentHeldBack.increment()
        context.logger.debug(
            "a message sent again after a lost connection waits for a first copy's turn",
            metadata: ["channel": "\(channel)", "order": "\(order)"])
        let held = ReceivedMessage(channel: channel, message: again)
        gaps.heldBack.hold(for: grace) { await dispatch(held) }
    }

    /// Takes the turn for a held-back copy with a compare-and-set of the stored session: false
    /// when the order moved or another copy claimed it. A save that lost its race to another
    /// write (a renewal of the socket's session, say) reads the session again and decides anew.
    private func claimResentTurn() async -> Bool {
        guard let key = session.key else { return true }
        for _ in 0..<8 {
            do {
                let stored = try await loadForOneSave(key)
                guard (stored[Self.nextOrderKey]?.intValue ?? 0) == order, stored[Self.resentClaimKey]?.intValue != order else {
                    return false
                }
                stored[Self.resentClaimKey] = .int(order)
                try await stored.save()
                return true
            } catch let error as SessionError where error.code == .saveConflict {
                continue
            } catch {
                // Unreadable for now: the copy runs, as one without the mark would.
                context.logger.warning("could not claim a turn for a message sent again", metadata: ["error": "\(error)"])
                return true
            }
        }
        // Eight other writers in a row won, none of them a copy of this order (which the reads
        // would have shown): the copy runs, as one without the mark would.
        return true
    }

    /// Drops a copy of a message whose turn another copy took (counted as late).
    private func dropSecondCopy() {
        context.extras.withLock { $0.parked = true }
        ChannelsMetrics.dropped[.late]?.increment()
        context.logger.warning(
            "dropped a second copy of a message sent again after a lost connection (counted in channels_dropped_total{reason=\"late\"})",
            metadata: ["channel": "\(context.channel)", "order": "\(order)"])
    }

    /// Records that `order` was handled, saves, then runs what became due.
    private func advance() async throws {
        // A raise: a gap skip that moved the order further meanwhile (this consumer ran longer
        // than the gap timeout) is not undone when this save loses its race to it.
        session.raise(Self.nextOrderKey, to: order + 1)
        session[Self.movedAtKey] = .int(Self.nowMillis())
        // Saved before the wait channel is drained, so what runs next sees the new order.
        let saved = try await session.save()
        // What runs next (drained here, or next in this worker's run of the socket) starts
        // from the session as saved here, not read back. Not with `slight` ordering, whose
        // turns run at once across workers: each reads the store.
        let handOn = saved && !slight
        if handOn { SessionHandOn.current?.record(session) }
        await drain(from: session[Self.nextOrderKey]?.intValue ?? order + 1, handingOn: handOn ? session : nil)
    }

    private func park(next: Int64) async throws {
        let parked = ParkedMessage(channel: context.channel, content: context.message, order: order)
        try await context.send(parked.message, to: parkingChannel(for: order, next: next), immediately: true)
        // A connect and a disconnect come on channels of their own.
        let sameChannel =
            !slight && context.channel != ASGIChannel.websocketConnect && context.channel != ASGIChannel.websocketDisconnect
        gaps.parked(waitChannel, order: order, sameChannel: sameChannel)
    }

    private var gaps: OrderingGaps { context.environment.orderingGaps }

    /// Runs (once per wait channel and process at a time) while messages wait: after each gap
    /// timeout (or, for a gap the one before it proves lost, after its grace), runs what
    /// became due, or skips a gap that is now old enough. It looks whether anything waits by
    /// counting, never by taking: a message taken to look would be missing for a turn that
    /// ends meanwhile (which then stops, and the socket stalls), and lost with this process if
    /// it died holding it. It watches on while anything waits, parked here or by a process
    /// that died since.
    ///
    /// While it watches it holds a lease on the wait channel in the layer, renewed at every look
    /// and on a beat of its own (a look whose drain runs consumers for long must not let it
    /// lapse), with the order it last saw due: if this process dies, another worker's
    /// ``OrderingSweeper`` finds the lease lapsed and resumes the socket.
    private func watchGap(from known: Int64, lease: WatchLease) async {
        let timeout = context.environment.orderingGapTimeout
        lease.next = known
        let gate = self
        let beat = Task {
            // A lease the park took is fresh: its first renewal waits for the beat.
            var renew = lease.written == nil
            while !Task.isCancelled, !lease.layerClosed.load(ordering: .relaxed) {
                if renew { await gate.holdLease(lease) }
                renew = true
                try? await Task.sleep(for: OrderingSweeper.renewal(timeout))
            }
        }
        var watching = true
        defer {
            beat.cancel()
            if watching { gaps.unwatch(waitChannel) }
        }
        /// Ends the watch once nothing waits (as of the look that began with this process's
        /// park count at `parks`): unwatched first (a message parked from then on starts a watch
        /// of its own), then, if this process parked since that look began (that message saw
        /// this watch and started none), one more look: if something waits and no other watch
        /// took over, the watch goes on. Parks of other processes have watches of their own.
        /// The lease goes only if it is still this watch's.
        func end(parks: Int) async -> Bool {
            gaps.unwatch(waitChannel)
            watching = false
            let waits = gaps.parkCount(waitChannel) != parks ? await somethingWaits() : false
            if waits, gaps.watch(waitChannel) {
                watching = true
                return false
            }
            beat.cancel()
            await beat.value
            // Something waits and another watch of this process took over: the lease is its.
            if !waits { await releaseLease(lease) }
            return true
        }
        var pause = timeout + .milliseconds(100)
        // Until nothing waits, or the layer is closed (its process is stopping: what waits is
        // taken over by a sweeper elsewhere once this lease lapses).
        while !Task.isCancelled, !lease.layerClosed.load(ordering: .relaxed) {
            try? await Task.sleep(for: pause)
            // A store that fails (this process was frozen, Redis is failing over) is looked at
            // again after the pause: the watch ends only when nothing waits.
            pause = timeout + .milliseconds(100)
            guard let (stored, _) = try? await storedState() else { continue }
            lease.next = stored
            await holdLease(lease)
            if gaps.stuckLongerThan(timeout, waitChannel: waitChannel, next: stored) {
                await foundLost()
                await drain(from: stored, skippingGapFrom: stored)
            } else {
                await drain(from: stored)
            }
            let parks = gaps.parkCount(waitChannel)
            if slight {
                guard let pending = try? await context.layer.channelStatistics(waitChannel).messagesPending, pending > 0 else {
                    if await end(parks: parks) { return }
                    continue
                }
                continue
            }
            guard let now = try? await storedNext() else { continue }
            lease.next = now
            switch await firstWaiting(after: now) {
            case .nothing:
                // Forgotten too: how long the order stood (an idle socket's order would
                // otherwise seem to have stood since this look when its next burst comes).
                gaps.forgetParked(waitChannel)
                if await end(parks: parks) { return }
                continue
            case .order, .onSharedChannel, .unknown:
                break
            }
            // Still waiting behind another gap: its clock starts now (the next look skips it
            // if it still stands), not at that look (one gap timeout per gap, not two); one
            // the gap before it proves lost is looked at again after its grace.
            _ = gaps.stuckLongerThan(timeout, waitChannel: waitChannel, next: now)
            pause =
                gaps.evidencePending(timeout, waitChannel: waitChannel, next: now)
                ? OrderingGaps.provenGrace(timeout) + .milliseconds(10) : timeout + .milliseconds(100)
        }
    }

    /// Whether anything of the socket waits parked (a layer that cannot be read counts as yes).
    private func somethingWaits() async -> Bool {
        if slight { return (try? await context.layer.channelStatistics(waitChannel).messagesPending).map { $0 > 0 } ?? true }
        guard let now = try? await storedNext() else { return true }
        if case .nothing = await firstWaiting(after: now) { return false }
        return true
    }

    /// Takes or renews this watch's lease (see ``OrderingSweeper``), noted with the order it
    /// saw due and the watch's own mark; a layer that fails is logged: the watch goes on,
    /// only its takeover is at stake.
    private func holdLease(_ lease: WatchLease) async {
        guard let leases = context.layer.leases else { return }
        let note = OrderingSweeper.note(next: slight ? nil : lease.next, holder: lease.token)
        do {
            try await leases.holdLease(
                waitChannel, in: OrderingSweeper.pool, note: note,
                for: OrderingSweeper.leaseDuration(context.environment.orderingGapTimeout))
            lease.written = note
        } catch {
            if error.code == .closed {
                lease.layerClosed.store(true, ordering: .relaxed)
                return
            }
            context.logger.warning("could not renew an ordering watch's lease", metadata: ["error": "\(error)"])
        }
    }

    /// Takes the socket's lease when nobody holds it (see ``run(_:waitFull:)``); nil when
    /// someone does, or the layer keeps no leases or failed (logged).
    private func takeFreeLease(next: Int64) async -> WatchLease? {
        guard let leases = context.layer.leases else { return nil }
        let lease = WatchLease(next: next)
        let note = OrderingSweeper.note(next: slight ? nil : next, holder: lease.token)
        do {
            guard
                try await leases.takeFreeLease(
                    waitChannel, in: OrderingSweeper.pool, note: note,
                    for: OrderingSweeper.leaseDuration(context.environment.orderingGapTimeout))
            else { return nil }
            lease.written = note
            return lease
        } catch {
            if error.code != .closed { context.logger.warning("could not take an ordering watch's lease", metadata: ["error": "\(error)"]) }
            return nil
        }
    }

    /// Gives the lease up, unless another watch (in another process) holds it now.
    private func releaseLease(_ lease: WatchLease) async {
        guard let note = lease.written else { return }
        try? await context.layer.leases?.releaseLease(waitChannel, in: OrderingSweeper.pool, ifNote: note)
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

    /// The session as stored now, whose save makes one try: one that loses its race throws
    /// `saveConflict` instead of re-reading and applying its changes again.
    private func loadForOneSave(_ key: String) async throws -> Session {
        var settings = context.environment.sessionConfiguration
        settings.saveAttempts = 1
        return try await Session.load(
            key: key, store: context.environment.sessionStore, settings: settings, ttl: session.ttl, log: .consumer(context))
    }

    /// Moves the stored order from `from` past a gap to `to` (unless another worker moved it).
    private func skipGap(from: Int64, to: Int64) async -> Bool {
        guard let key = session.key else { return false }
        // One try: a save that lost its race lost it to a turn or a skip that moved the order,
        // and must not move it again on top (re-applied, a second skip jumped past messages
        // the first one had let run, and they were dropped as older).
        do {
            let stored = try await loadForOneSave(key)
            // No session may mean its connect was lost: the skip starts one, so what waits
            // (the socket's disconnect, with its cleanup, among it) still runs.
            guard to > from, (stored[Self.nextOrderKey]?.intValue ?? 0) == from else { return false }
            stored[Self.nextOrderKey] = .int(to)
            stored[Self.movedAtKey] = .int(Self.nowMillis())
            do {
                try await stored.save()
            } catch let error as SessionError where error.code == .saveConflict {
                return false
            }
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

    /// Runs the parked messages whose turn has come, in order: the one of the next order, then
    /// the one after it, while each is there. With `skippingGapFrom`, when the order is still
    /// there and its message never came, moves past the gap to the first message waiting.
    ///
    /// - Parameter known: the next order, when the caller just read or saved it.
    /// - Returns: false when a gap was to be skipped and nothing waited after it.
    ///   - handingOn: the session this turn just saved: the first message drained starts from it.
    ///     Each one drained then hands its own saves on to the next (``SessionHandOn``, the
    ///     scope the caller runs in, if any: a worker's run of one socket's messages).
    @discardableResult
    private func drain(from known: Int64? = nil, skippingGapFrom gap: Int64? = nil, handingOn saved: Session? = nil) async -> Bool {
        guard Self.draining != waitChannel else { return true }
        let scope =
            SessionHandOn.current ?? SessionHandOn(maxAge: SessionHandOn.maxAge(gapTimeout: context.environment.orderingGapTimeout))
        if let saved { scope.record(saved) }
        return await SessionHandOn.$current.withValue(scope) {
            await drainTurns(from: known, skippingGapFrom: gap)
        }
    }

    private func drainTurns(from known: Int64?, skippingGapFrom gap: Int64?) async -> Bool {
        await Self.$draining.withValue(waitChannel) {
            if slight {
                await drainAll(skippingGapFrom: gap)
                return true
            }
            var gap = gap
            var next: Int64
            if let known {
                next = known
            } else {
                guard let stored = try? await storedNext() else { return true }
                next = stored
            }
            while true {
                // The message due runs next in this task (this worker took it behind this one):
                // not parked, and it drains after itself.
                if gap == nil, RunningSocket.runsNext(order: next, after: context.message, on: context.channel) { return true }
                var entries = await take([parkingChannel(for: next)])
                // Lost on the evidence of the gap found lost before it: skipped now.
                // Proven, the whole stretch of missing orders up to the first one waiting goes
                // (the evidence covers each of them); found lost by its age, only this order
                // (the ones after it may be on their way: they get their grace, as proven gaps).
                var proven = false
                if entries.isEmpty, gap == nil,
                    gaps.provenLost(context.environment.orderingGapTimeout, waitChannel: waitChannel, next: next)
                {
                    gap = next
                    proven = true
                }
                if entries.isEmpty, let from = gap, from == next {
                    // The due message never came: the first one waiting after it, if any, runs now.
                    gap = nil
                    switch await firstWaiting(after: next) {
                    case .nothing:
                        return false
                    case .unknown:
                        return true
                    case .order(let waiting):
                        // Looked at, not taken: a turn never finds a message missing because a
                        // skip holds it.
                        let first = proven ? waiting : min(waiting, from + 1)
                        if await skipGap(from: from, to: first) {
                            next = first
                        } else {
                            guard let now = try? await storedNext() else { return true }
                            next = now
                        }
                        continue
                    case .onSharedChannel:
                        break
                    }
                    let waiting = await takeWaiting(from: next)
                    guard let first = waiting.first else { return false }
                    if first.order == next {
                        // Its message waited on the shared channel (a disconnect that came
                        // too far ahead): no gap, its turn.
                        entries = waiting.filter { $0.order == next }
                        await parkAgain(waiting.filter { $0.order != next }, next: next)
                    } else if !proven && first.order > from + 1 {
                        // Found lost by its age: this order alone.
                        let skipped = await skipGap(from: from, to: from + 1)
                        await parkAgain(waiting, next: skipped ? from + 1 : next)
                        guard let now = try? await storedNext() else { return true }
                        next = now
                        continue
                    } else if await skipGap(from: from, to: first.order) {
                        entries = waiting.filter { $0.order == first.order }
                        await parkAgain(waiting.filter { $0.order != first.order }, next: first.order)
                    } else {
                        // Another turn moved the order meanwhile (and may have found these out):
                        // put them back and go on from the order as it stands.
                        await parkAgain(waiting, next: next)
                        guard let now = try? await storedNext() else { return true }
                        next = now
                        continue
                    }
                }
                // Nothing waits for this order: its message is still on its way (whoever parks
                // it looks at the order afterwards and runs it if its turn has come), running
                // elsewhere, or lost (the gap watch skips it).
                guard let last = entries.last else { return true }
                for entry in entries { await run(entry.content, on: entry.channel) }
                // Each run saved the order after it (its own drain was left to this loop).
                guard last.order < Int64.max else { return true }
                next = last.order + 1
            }
        }
    }

    /// Takes what waits on `channels` (nothing when the layer fails: logged), in order.
    private func take(_ channels: [String]) async -> [ParkedMessage] {
        let taken: [ReceivedMessage]
        do {
            taken = try await context.layer.receiveBatch(channels: channels, max: 1024, timeout: .zero)
        } catch {
            context.logger.error("could not read the wait channel", metadata: ["error": "\(error)"])
            return []
        }
        var entries: [ParkedMessage] = []
        for received in taken {
            guard let entry = ParkedMessage(received.message), entry.order < Int64.max else {
                ChannelsMetrics.dropped[.malformed]?.increment()
                context.logger.warning(
                    "dropped a malformed parked message (counted in channels_dropped_total{reason=\"malformed\"})",
                    metadata: ["wait_channel": "\(received.channel)", "keys": "\(received.message.fieldNames)"])
                continue
            }
            entries.append(entry)
        }
        return entries.sorted { $0.order < $1.order }
    }

    /// The order stood still for the gap timeout: notes, for the gaps after it, which orders
    /// wait now (see ``OrderingGaps/provenLost(_:waitChannel:next:)``), counted without taking.
    private func foundLost() async {
        guard !slight, let next = try? await storedNext() else { return }
        var waiting: [Int64] = []
        for orders in windows(after: next) {
            guard let counts = try? await context.layer.messagesPending(in: orders.map(parkingChannel(for:))) else { break }
            waiting += zip(orders, counts).filter { $0.1 > 0 }.map(\.0)
            // A window with nothing waiting: the burst behind this gap ends before it.
            if counts.allSatisfy({ $0 == 0 }) { break }
        }
        gaps.foundLost(waitChannel, waiting: waiting)
    }

    enum Waiting { case nothing, order(Int64), onSharedChannel, unknown }

    /// The first order after `next` with a message waiting (looked for 128 orders at a time, as
    /// far as a message may wait ahead), counted without taking anything; `onSharedChannel`
    /// when something waits on the socket's one shared channel (a disconnect too far ahead, or
    /// what an earlier version parked), which only taking can sort; `unknown` when the layer
    /// could not be read (logged; the watch looks again).
    private func firstWaiting(after next: Int64) async -> Waiting {
        var shared: [String] = [waitChannel]
        for orders in windows(after: next) {
            let counts: [Int]
            do {
                counts = try await context.layer.messagesPending(in: shared + orders.map(parkingChannel(for:)))
            } catch {
                context.logger.error("could not look at the wait channels", metadata: ["error": "\(error)"])
                return .unknown
            }
            if !shared.isEmpty, counts.first ?? 0 > 0 { return .onSharedChannel }
            if let index = counts.dropFirst(shared.count).firstIndex(where: { $0 > 0 }) {
                return .order(orders[index - shared.count])
            }
            shared = []
        }
        return .nothing
    }

    /// The orders after `next` a message may wait on, as far ahead as one may wait, in looks
    /// of 128 (one round trip each).
    private func windows(after next: Int64) -> [[Int64]] {
        let (limit, overflow) = next.addingReportingOverflow(parkingLimit)
        let last = overflow ? Int64.max - 1 : limit
        guard next < last else { return [] }
        return stride(from: next + 1, through: last, by: 128).map { start in Array(start...min(last, start + 127)) }
    }

    /// Takes the messages waiting from `next` on: those of the first orders that have any
    /// (looked for 128 orders at a time, as far as a message may wait ahead), and any on the
    /// socket's one shared wait channel (a disconnect that came too far ahead, or what earlier
    /// versions parked), where the message of `next` itself may wait.
    private func takeWaiting(from next: Int64) async -> [ParkedMessage] {
        var shared: [String] = [waitChannel]
        for orders in windows(after: next) {
            let found = await take(shared + orders.map(parkingChannel(for:)))
            // What waited on the shared channel may be older than the order (a message parked
            // by an earlier version and run since); those are dropped as the gate drops them.
            let after = found.filter { $0.order >= next }
            dropOlder(found.filter { $0.order < next }, next: next)
            if !after.isEmpty { return after }
            shared = []
        }
        return []
    }

    /// Drops, with a log line each, taken messages whose turn has passed (another turn skipped
    /// past them while they were out).
    private func dropOlder(_ entries: [ParkedMessage], next: Int64) {
        for entry in entries {
            ChannelsMetrics.dropped[.late]?.increment()
            context.logger.warning(
                "dropped a message older than the next order (counted in channels_dropped_total{reason=\"late\"})",
                metadata: ["channel": "\(entry.channel)", "order": "\(entry.order)", "next": "\(next)"])
        }
    }

    /// Parks taken messages again, each on its order's channel; those whose turn has passed
    /// (older than `next`) are dropped with a log line instead of waiting until they expire.
    private func parkAgain(_ entries: [ParkedMessage], next: Int64? = nil) async {
        let current: Int64? = if let next { next } else { try? await storedNext() }
        if let current { dropOlder(entries.filter { $0.order < current }, next: current) }
        for entry in entries where current.map({ entry.order >= $0 }) ?? true {
            do {
                try await retrying(for: context.environment.sendRetry) {
                    try await context.layer.send(entry.message, to: parkingChannel(for: entry.order, next: current ?? entry.order))
                }
            } catch {
                context.logger.error(
                    "could not park a message again; it is lost",
                    metadata: ["channel": "\(entry.channel)", "order": "\(entry.order)", "error": "\(error)"])
            }
        }
    }

    /// `slight` ordering: every parked message is due once the connect ran; takes them all and
    /// runs them, while more come.
    private func drainAll(skippingGapFrom gap: Int64?) async {
        // A connect that never came: once the gap timeout passed, the receives run without it.
        if gap == 0, (try? await storedNext()) == 0 {
            _ = await skipGap(from: 0, to: 1)
        }
        while true {
            guard let next = try? await storedNext(), next >= 1 else { return }
            let entries = await take([waitChannel])
            if entries.isEmpty { return }
            for entry in entries { await run(entry.content, on: entry.channel) }
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

/// A gap watch's lease: the order it last saw due, the watch's own mark, and the note it last
/// wrote (what its release must still find: a newer watch of the socket, in this process or
/// another, writes another mark).
final class WatchLease: Sendable {
    private let state: Mutex<(next: Int64, written: String?)>
    let token = ChannelNames.randomLetters(12)
    /// The layer said it is closed (its process is stopping): the watch ends.
    let layerClosed = Atomic<Bool>(false)

    init(next: Int64) { state = Mutex((next, nil)) }

    var next: Int64 {
        get { state.withLock { $0.next } }
        set { state.withLock { $0.next = newValue } }
    }

    var written: String? {
        get { state.withLock { $0.written } }
        set { state.withLock { $0.written = newValue } }
    }
}
