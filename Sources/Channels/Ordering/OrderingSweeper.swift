import ASGI
import CoreMetrics
import Logging

/// Takes over the ordered sockets whose every watching worker died.
///
/// A message that comes before its turn is parked in the layer, and the worker that parked it
/// watches the socket's gap (``OrderingGate``): when the message that was due never comes (lost
/// with a worker killed while holding it), the watch skips it and runs what waits. If every
/// worker that parked or watched that socket is dead too (all killed at once: an OOM kill of
/// their container, a lost host, or the only worker restarted), nothing would bring a gate back
/// to the socket until it sends again, and its parked messages would expire unseen.
///
/// So a watch holds a lease on its wait channel in the layer (``ChannelLayerLeases``), renewed at
/// every look and released when nothing waits any more, with the order it last saw as its note.
/// Every worker runs a sweeper that, twice per gap timeout, claims the leases that lapsed (their
/// holders stopped renewing them) and resumes each socket: it takes the first message waiting
/// and sends it back on the channel it first came on. The worker that receives it meets it
/// as any message that arrives early: it parks it again and watches the gap, so the gap is
/// skipped (counted) and everything after it runs in order, as if the socket had sent a frame.
/// A lease lapses on the layer's clock (Redis `TIME`), never on two hosts' clocks.
struct OrderingSweeper {
    /// The pool of the watches' leases.
    static let pool = "ordering"

    /// How long a watch's lease lasts unless renewed: two gap timeouts and two seconds (a watch
    /// renews it at every look and every half gap timeout).
    static func leaseDuration(_ timeout: Duration) -> Duration { timeout * 2 + .seconds(2) }

    /// How often a watch renews its lease besides its looks (a tenth of a second at least).
    static func renewal(_ timeout: Duration) -> Duration { max(timeout / 2, .milliseconds(100)) }

    /// A watch's note: the order it last saw due (none for `slight` ordering) and the watch's
    /// own mark (a release removes the lease only while it is still that watch's).
    static func note(next: Int64?, holder: String) -> String { (next.map(String.init) ?? "slight") + " " + holder }

    /// The order a note says was due; nil for `slight` ordering (or a note of another form).
    static func next(in note: String) -> Int64? { note.split(separator: " ").first.flatMap { Int64($0) } }

    let layer: any ChannelLayer
    let environment: ConsumerEnvironment
    let logger: Logger

    /// Looks for lapsed leases twice per gap timeout until cancelled.
    func run() async {
        guard layer.leases != nil else { return }
        let timeout = environment.orderingGapTimeout
        while !Task.isCancelled {
            // A little jitter: workers started together do not look in step.
            try? await Task.sleep(for: timeout / 2 + .milliseconds(Int.random(in: 0...200)))
            if Task.isCancelled { return }
            _ = await sweep()
        }
    }

    /// One look: claims the lapsed leases and resumes their sockets (several at once, and more
    /// claims while they come full, for up to a second), returns how many it resumed.
    func sweep() async -> Int {
        guard let leases = layer.leases else { return 0 }
        let started = ContinuousClock.now
        var resumed = 0
        while true {
            let claimed: [ChannelLayerLease]
            do {
                claimed = try await leases.claimLapsedLeases(
                    in: Self.pool, max: Self.claimBatch, for: Self.leaseDuration(environment.orderingGapTimeout))
            } catch {
                logger.warning("could not look for ordered sockets left without a watch", metadata: ["error": "\(error)"])
                return resumed
            }
            resumed += await withTaskGroup(of: Bool.self) { group in
                var running = 0
                var count = 0
                for lease in claimed {
                    // A socket a watch of this process covers is not left without one: its
                    // lease lapsed while the watch was held up (its beat renews it).
                    if environment.orderingGaps.isWatched(lease.name) { continue }
                    if running == 16, let done = await group.next() {
                        running -= 1
                        if done { count += 1 }
                    }
                    group.addTask { await resume(lease, leases: leases) }
                    running += 1
                }
                for await done in group where done { count += 1 }
                return count
            }
            if claimed.count < Self.claimBatch || ContinuousClock.now - started > .seconds(1) { return resumed }
        }
    }

    /// Leases claimed at a time.
    static let claimBatch = 64

    /// Sends the first message waiting on the lease's wait channel back on its channel; releases
    /// the lease when nothing waits. Left claimed (looked at again when it lapses) when the
    /// layer could not be read.
    private func resume(_ lease: ChannelLayerLease, leases: any ChannelLayerLeases) async -> Bool {
        let waitChannel = lease.name
        guard waitChannel.hasPrefix(CapacityTable.waitChannelPrefix),
            (try? ChannelNames.validateChannel(waitChannel, for: .receive)) != nil
        else {
            logger.warning("released a watch lease that names no wait channel", metadata: ["lease": "\(waitChannel)"])
            try? await leases.releaseLease(waitChannel, in: Self.pool, ifNote: lease.note)
            return false
        }
        for channels in looks(waitChannel, note: lease.note) {
            let counts: [Int]
            do {
                counts = try await layer.messagesPending(in: channels)
            } catch {
                logger.warning("could not look at a wait channel left without a watch", metadata: ["error": "\(error)"])
                return false
            }
            for (channel, count) in zip(channels, counts) where count > 0 {
                switch await sendBack(from: channel) {
                case .sent(let order):
                    ChannelsMetrics.orderingResumed.increment()
                    logger.warning(
                        "resumed an ordered socket whose watching workers stopped: sent its first waiting message back (counted in channels_ordering_resumed_total)",
                        metadata: ["wait_channel": "\(waitChannel)", "order": "\(order)"])
                    return true
                case .leftWaiting:
                    // Kept claimed: looked at again when the claim lapses, until it expires.
                    return false
                case .nothing:
                    continue
                }
            }
        }
        // Nothing waits: what was parked ran, or expired. Released only if nobody took the
        // lease since this claim (a watch that just started writes a note of its own).
        try? await leases.releaseLease(waitChannel, in: Self.pool, ifNote: lease.note)
        return false
    }

    /// The channels to look at, in looks of one round trip: the shared wait channel (where a
    /// `slight` socket's messages and a far-ahead disconnect wait), then the channels of the
    /// orders from the one the watch last saw due, as far ahead as a message may wait (twice
    /// that: the order may have moved after the watch's last look).
    private func looks(_ waitChannel: String, note: String) -> [[String]] {
        guard let next = Self.next(in: note), next >= 0 else { return [[waitChannel]] }
        let limit = Int64(layer.configuredCapacity(for: waitChannel) ?? CapacityTable.waitChannelCapacity(defaultCapacity: 100))
        let (end, overflow) = next.addingReportingOverflow(limit * 2)
        let last = overflow ? Int64.max - 1 : end
        guard next <= last else { return [[waitChannel]] }
        let windows = stride(from: next, through: last, by: 128).map { start in
            (start...min(last, start + 127)).map { waitChannel + "." + String($0) }
        }
        return [[waitChannel]] + windows
    }

    enum SendBack { case sent(Int64), nothing, leftWaiting }

    /// Takes one message from `channel` and sends it back on the channel it first came on. One
    /// that cannot be sent (or came on a process channel) is put back where it waited.
    private func sendBack(from channel: String) async -> SendBack {
        let taken: [ReceivedMessage]
        do {
            taken = try await layer.receiveBatch(channels: [channel], max: 1, timeout: .zero)
        } catch {
            logger.warning("could not take a message left without a watch", metadata: ["error": "\(error)"])
            return .leftWaiting
        }
        guard let received = taken.first else { return .nothing }
        guard let entry = ParkedMessage(received.message), entry.order < Int64.max else {
            ChannelsMetrics.dropped[.malformed]?.increment()
            logger.warning(
                "dropped a malformed parked message (counted in channels_dropped_total{reason=\"malformed\"})",
                metadata: ["wait_channel": "\(channel)", "keys": "\(received.message.fieldNames)"])
            return .nothing
        }
        // Sent back only on a channel any worker reads: a process channel's (`!`) process may be
        // the one that died, and one of a live process would hand a parked message to it
        // outside the routing it came through.
        guard !ChannelNames.isProcessSpecific(entry.channel) else {
            logger.warning(
                "left a parked message of a process channel where it waits (not sent back)",
                metadata: ["channel": "\(entry.channel)", "order": "\(entry.order)"])
            await putBack(received.message, on: channel, entry: entry)
            return .leftWaiting
        }
        do {
            try await retrying(for: environment.sendRetry) { try await layer.send(entry.content, to: entry.channel) }
            return .sent(entry.order)
        } catch {
            logger.warning(
                "could not send a waiting message back; it waits on", metadata: ["channel": "\(entry.channel)", "error": "\(error)"])
            await putBack(received.message, on: channel, entry: entry)
            return .leftWaiting
        }
    }

    /// Parks a taken message again where it waited (counted and logged if even that fails).
    private func putBack(_ message: Message, on channel: String, entry: ParkedMessage) async {
        do {
            try await retrying(for: environment.sendRetry) { try await layer.send(message, to: channel) }
        } catch {
            ChannelsMetrics.dropped[.retriesExhausted]?.increment()
            logger.error(
                "could not park a waiting message again; it is lost (counted in channels_dropped_total{reason=\"retries_exhausted\"})",
                metadata: ["channel": "\(entry.channel)", "order": "\(entry.order)", "error": "\(error)"])
        }
    }
}
