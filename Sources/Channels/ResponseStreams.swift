import ASGI
import CoreMetrics
import Synchronization

/// The multi-message HTTP responses a worker is sending, so a client that leaves stops them
/// and a client that reads slowly slows them down.
///
/// Each worker reads one process channel of its own (its inbox, `worker.<letters>!`), in the
/// same receive as its other channels. A response that spans several messages (a stream, or a
/// body larger than one message) names a channel in that inbox as its `disconnect_channel`:
///
/// - the interface server sends `http.disconnect` there when the client goes, and the worker
///   cancels the consumer's task: its `respondChunk` or `Task.sleep` throws `CancellationError`
///   and it ends;
/// - when the request carried `response_credit`, the server also sends `HTTPResponseCredit`
///   (the body bytes written to the client so far) there, and the response waits before a
///   chunk that would put more than the credit in flight: what a slow client has not read
///   waits in the worker's consumer, not in the layer or the server.
public final class ResponseStreams: Sendable {
    /// The worker's inbox (a process channel).
    public let inbox: String
    private let streams = Mutex<[String: Stream]>([:])
    /// The leases of the streams running (until their consumers end), by disconnect channel.
    private let leases = Mutex<[String: LeaseState]>([:])

    /// A lease and its renewal: one at a time per lease (a renewal stuck on a stalled Redis
    /// holds up no other), and its release after any renewal in flight (sent before it, a
    /// renewal would bring a released lease back, and the server would later cut a response
    /// that ended).
    private struct LeaseState {
        let lease: Lease
        var renewing = false
        var ended = false
    }
    private let stopped = Atomic<Int>(0)
    private let malformedCredits = Atomic<Int>(0)

    /// How long a response waits for the server's credit before it fails (the server closes a
    /// client that reads nothing long before: this covers a lost acknowledgement).
    let creditTimeout: Duration

    /// How long a stream's lease (`ResponseStreamLeases`) lasts unless renewed; renewed every
    /// quarter of it. The server serving a stream cuts it this long (and up to its sweep
    /// interval) after this worker stopped.
    public let leaseDuration: Duration

    static let abandoned = Counter(label: "channels_http_streams_abandoned_total")
    static let creditWaits = Counter(label: "channels_http_stream_credit_waits_total")
    static let leaseFailures = Counter(label: "channels_http_stream_lease_failures_total")

    /// A stream's lease: the server's pool, and the reply channel as its note.
    struct Lease: Sendable {
        let pool: String
        let replyChannel: String
    }

    private struct Stream {
        let handle: TaskHandle
        /// Bytes that may be in flight (sent, not yet written to the client); nil: no credit.
        let window: Int?
        var sent = 0
        var written = 0
        var waiter: (needed: Int, continuation: CheckedContinuation<Void, any Error>)?
    }

    /// A registry whose inbox is `<prefix>.<10 letters>!`; `leaseDuration`: see the property
    /// (two seconds at least).
    public init(prefix: String = "worker", creditTimeout: Duration = .seconds(120), leaseDuration: Duration = .seconds(20)) {
        inbox = prefix + "." + ChannelNames.randomLetters(10) + "!"
        self.creditTimeout = creditTimeout
        self.leaseDuration = max(leaseDuration, .seconds(2))
    }

    /// A disconnect channel for the response `handle`'s task is sending; `finished` forgets it.
    /// `window`: the request's `response_credit`; with it (a server of ours, which watches
    /// leases) and a process-specific `replyChannel`, the stream gets a lease
    /// (`ResponseStreamLeases`), taken by ``holdFirstLease(_:on:)`` before the response starts.
    func register(_ handle: TaskHandle, window: Int?, replyChannel: String? = nil) -> String {
        let channel = inbox + ChannelNames.randomLetters(12)
        let lease: Lease? =
            if window != nil, let replyChannel, let pool = ResponseStreamLeases.pool(replyChannel: replyChannel) {
                Lease(pool: pool, replyChannel: replyChannel)
            } else {
                nil
            }
        streams.withLock { $0[channel] = Stream(handle: handle, window: window) }
        if let lease { leases.withLock { $0[channel] = LeaseState(lease: lease) } }
        return channel
    }

    /// The response at `channel` ended (or its consumer did): forgotten, its lease given up
    /// (after the renewal in flight, if one is).
    func finished(_ channel: String, layer: any ChannelLayer) {
        let waiter = streams.withLock { $0.removeValue(forKey: channel)?.waiter }
        waiter?.continuation.resume(throwing: CancellationError())
        if let lease = leaseToRelease(channel, ending: true) { release(lease, of: channel, on: layer) }
    }

    /// The lease to give up now for `channel`: on its end (`ending`) when no renewal is in
    /// flight, or when the renewal in flight comes back after its end.
    private func leaseToRelease(_ channel: String, ending: Bool) -> Lease? {
        leases.withLock { all -> Lease? in
            guard var state = all[channel] else { return nil }
            if ending { state.ended = true }
            state.renewing = ending && state.renewing
            guard state.ended, !state.renewing else {
                all[channel] = state
                return nil
            }
            all[channel] = nil
            return state.lease
        }
    }

    /// Takes the lease of the stream at `channel` (if it has one) before its response starts: a
    /// worker killed from then on leaves a lease that lapses. Not fatal when the layer fails
    /// (the response's own send fails too, or the stream runs unwatched; counted).
    func holdFirstLease(_ channel: String, on layer: any ChannelLayer) async {
        guard let lease = leases.withLock({ $0[channel]?.lease }) else { return }
        await hold(lease, of: channel, on: layer)
    }

    private func hold(_ lease: Lease, of channel: String, on layer: any ChannelLayer) async {
        guard let leases = layer.leases else { return }
        do {
            try await leases.holdLease(channel, in: lease.pool, note: lease.replyChannel, for: leaseDuration)
        } catch {
            Self.leaseFailures.increment()
        }
    }

    private func release(_ lease: Lease, of channel: String, on layer: any ChannelLayer) {
        guard let leases = layer.leases else { return }
        Task {
            do {
                try await leases.releaseLease(channel, in: lease.pool, ifNote: lease.replyChannel)
            } catch {
                // It lapses: the server then sends its cut to a reply channel nobody reads.
                Self.leaseFailures.increment()
            }
        }
    }

    /// Renews the leases of the streams running, every quarter of `leaseDuration`, until
    /// cancelled (the worker runs it beside its inbox). Each renewal runs on its own: one that
    /// waits on a stalled Redis shard holds up neither the others nor the next rounds (its
    /// lease is not renewed again until it is back), and a round never waits for the last.
    func keepLeases(on layer: any ChannelLayer) async {
        guard layer.leases != nil else { return }
        await withDiscardingTaskGroup { group in
            while !Task.isCancelled {
                guard (try? await Task.sleep(for: leaseDuration / 4)) != nil else { break }
                let due = leases.withLock { all -> [(String, Lease)] in
                    var due: [(String, Lease)] = []
                    for (channel, state) in all where !state.renewing && !state.ended {
                        all[channel]?.renewing = true
                        due.append((channel, state.lease))
                    }
                    return due
                }
                for (channel, lease) in due {
                    group.addTask {
                        await self.hold(lease, of: channel, on: layer)
                        if let ended = self.leaseToRelease(channel, ending: false) { self.release(ended, of: channel, on: layer) }
                    }
                }
            }
            group.cancelAll()
        }
    }

    /// A message on the inbox: a credit, or the client of the response at `channel` left.
    func received(_ received: ReceivedMessage) {
        if HTTPResponseCredit.isCredit(received.message) {
            guard let credit = try? HTTPResponseCredit(received.message) else {
                // Not ours to guess at: dropped, and counted with the other malformed messages.
                ChannelsMetrics.dropped[.malformed]?.increment()
                malformedCredits.add(1, ordering: .relaxed)
                return
            }
            credited(received.channel, written: credit.written)
        } else {
            clientLeft(received.channel)
        }
    }

    /// The server said the client of the response at `channel` left: stop its consumer (its
    /// lease goes when the consumer ends, ``finished(_:layer:)``).
    func clientLeft(_ channel: String) {
        guard let stream = streams.withLock({ $0.removeValue(forKey: channel) }) else { return }
        stopped.add(1, ordering: .relaxed)
        Self.abandoned.increment()
        stream.handle.cancel()
        stream.waiter?.continuation.resume(throwing: CancellationError())
    }

    private func credited(_ channel: String, written: Int) {
        let waiter = streams.withLock { streams -> CheckedContinuation<Void, any Error>? in
            guard var stream = streams[channel] else { return nil }
            stream.written = max(stream.written, written)
            var resumed: CheckedContinuation<Void, any Error>?
            if let waiter = stream.waiter, Self.fits(waiter.needed, in: stream) {
                stream.waiter = nil
                stream.sent += waiter.needed
                resumed = waiter.continuation
            }
            streams[channel] = stream
            return resumed
        }
        waiter?.resume()
    }

    /// Whether `bytes` more may be sent: within the window, or nothing in flight at all (a chunk
    /// larger than the window still goes, alone).
    private static func fits(_ bytes: Int, in stream: Stream) -> Bool {
        guard let window = stream.window else { return true }
        let inFlight = stream.sent - stream.written
        return inFlight <= 0 || inFlight + bytes <= window
    }

    /// Waits until `bytes` more body bytes of the response at `channel` may be sent, then counts
    /// them as sent. Throws `CancellationError` when the client left (or the task is cancelled)
    /// and ``ConsumerContextError`` (`noCredit`) when no credit came within `creditTimeout`.
    /// While it waits, `lending`'s slot serves other messages (a reader that stalls holds none).
    func reserve(_ bytes: Int, on channel: String, lending lease: SlotLease? = nil) async throws {
        // A stream no longer registered was stopped: its client left.
        let ready = streams.withLock { streams -> Bool? in
            guard var stream = streams[channel] else { return nil }
            guard Self.fits(bytes, in: stream) else { return false }
            stream.sent += bytes
            streams[channel] = stream
            return true
        }
        guard let ready else { throw CancellationError() }
        if ready { return }
        Self.creditWaits.increment()
        lease?.lend()
        try await waitForCredit(bytes, on: channel)
        try await lease?.reclaim()
    }

    private func waitForCredit(_ bytes: Int, on channel: String) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                try await withTaskCancellationHandler {
                    try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                        let resumeNow = self.streams.withLock { streams -> Bool? in
                            guard var stream = streams[channel] else { return nil }
                            if Self.fits(bytes, in: stream) {
                                stream.sent += bytes
                                streams[channel] = stream
                                return true
                            }
                            stream.waiter = (bytes, continuation)
                            streams[channel] = stream
                            return false
                        }
                        switch resumeNow {
                        case true?: continuation.resume()
                        case nil: continuation.resume(throwing: CancellationError())
                        case false?: break
                        }
                    }
                } onCancel: {
                    self.cancelWait(on: channel)
                }
            }
            group.addTask {
                try await Task.sleep(for: self.creditTimeout)
                throw ConsumerContextError(
                    .noCredit, "no credit from the server for \(self.creditTimeout) (an acknowledgement was lost)")
            }
            defer { group.cancelAll() }
            try await group.next()
        }
    }

    private func cancelWait(on channel: String) {
        let waiter = streams.withLock { streams -> CheckedContinuation<Void, any Error>? in
            guard var stream = streams[channel], let waiter = stream.waiter else { return nil }
            stream.waiter = nil
            streams[channel] = stream
            return waiter.continuation
        }
        waiter?.resume(throwing: CancellationError())
    }

    /// Credit messages that could not be read (a `written` that is not an int >= 0): dropped.
    public var malformedCreditCount: Int { malformedCredits.load(ordering: .relaxed) }

    /// Responses stopped because their client left.
    public var abandonedCount: Int { stopped.load(ordering: .relaxed) }
    /// Responses that can be stopped now.
    public var activeCount: Int { streams.withLock { $0.count } }
}
