import CoreMetrics
import DequeModule
import Synchronization

/// The embedded channel layer: everything lives in this process's memory.
///
/// It has the semantics of the Redis layer (capacity, expiry, groups, `!` and `?`
/// channels, statistics) so that an application can run with no services at all, and so
/// the upper layers can be tested without a server. A blocking ``receive(channels:timeout:)``
/// parks a continuation that a ``send(_:to:)`` resumes directly; nothing polls.
public final class InMemoryChannelLayer: ChannelLayerInspection, ChannelLayerCapacities, ChannelLayerPendingCounts {
    /// Expiry, capacity and size limits.
    public struct Configuration: Sendable {
        /// How long a message waits before it is dropped.
        public var expiry: Duration
        /// How long a group member stays without being re-added.
        public var groupExpiry: Duration
        /// Messages one channel may hold.
        public var capacity: Int
        /// Per-channel capacities by glob pattern; the first match wins.
        public var channelCapacities: [(String, Int)]
        /// The largest encoded message accepted by a send.
        public var maxMessageSize: Int
        /// How long a group send offers again a server's share (one entry for all its sockets)
        /// that its full process channel refused, before dropping it (counted); plain members
        /// are never waited for.
        public var groupFullWait: Duration = .seconds(2)

        /// A configuration; every argument has asgi_redis's default.
        public init(
            expiry: Duration = .seconds(60),
            groupExpiry: Duration = .seconds(86400),
            capacity: Int = 100,
            channelCapacities: [(String, Int)] = [],
            maxMessageSize: Int = 16 * 1024 * 1024
        ) {
            self.expiry = expiry
            self.groupExpiry = groupExpiry
            self.capacity = capacity
            self.channelCapacities = channelCapacities
            self.maxMessageSize = maxMessageSize
        }
    }

    struct Entry {
        var channel: String
        /// More members of a bundled group send on the same process channel, handed out
        /// one by one after `channel`; the entry counts once against the capacity.
        var more: ArraySlice<String> = []
        var message: Message
        var sentAt: ContinuousClock.Instant
        var expiresAt: ContinuousClock.Instant
    }

    struct Waiter {
        var keys: [String]
        var continuation: CheckedContinuation<ReceivedMessage?, Never>
        var timer: Task<Void, Never>?
    }

    struct Counters {
        var messages = 0
        var full = 0
    }

    struct State {
        var queues: [String: Deque<Entry>] = [:]
        var groups: [String: [String: ContinuousClock.Instant]] = [:]
        var waiters: [UInt64: Waiter] = [:]
        /// Waiter ids per queue key, oldest first, so the longest waiter is served first.
        var waitersByKey: [String: Deque<UInt64>] = [:]
        var counters: [String: Counters] = [:]
        var global = Counters()
        var nextWaiterID: UInt64 = 0
        var operationsSinceSweep = 0
        var closed = false
        /// Messages dropped unread at their expiry (bundled members each count).
        var expired = 0

        mutating func removeWaiter(_ id: UInt64) -> Waiter? {
            guard let waiter = waiters.removeValue(forKey: id) else { return nil }
            for key in waiter.keys {
                waitersByKey[key]?.removeAll { $0 == id }
                if waitersByKey[key]?.isEmpty == true { waitersByKey[key] = nil }
            }
            return waiter
        }

        mutating func popLive(_ key: String, now: ContinuousClock.Instant) -> Entry? {
            while var queue = queues[key], var first = queue.popFirst() {
                if first.expiresAt > now, let next = first.more.popFirst() {
                    // A bundle: give out its first member, keep the rest at the front.
                    var rest = first
                    rest.channel = next
                    queue.prepend(rest)
                    first.more = []
                }
                queues[key] = queue.isEmpty ? nil : queue
                if first.expiresAt > now { return first }
                expired += 1 + first.more.count
                LayerMetrics.expired.increment(by: 1 + first.more.count)
            }
            return nil
        }

        mutating func purge(_ key: String, now: ContinuousClock.Instant) {
            guard var queue = queues[key] else { return }
            while let first = queue.first, first.expiresAt <= now {
                queue.removeFirst()
                expired += 1 + first.more.count
                LayerMetrics.expired.increment(by: 1 + first.more.count)
            }
            queues[key] = queue.isEmpty ? nil : queue
        }

        mutating func sweep(now: ContinuousClock.Instant) {
            for key in Array(queues.keys) { purge(key, now: now) }
        }
    }

    /// Its expiry, capacity and size limits.
    public let configuration: Configuration
    private let capacities: CapacityTable

    /// The capacity a send to `channel` is held to.
    public func capacity(for channel: String) -> Int { capacities.capacity(for: channel) }
    let state = Mutex(State())
    /// Per pool, the leases held: until when, and the holder's note (``ChannelLayerLeases``).
    let leaseState = Mutex<[String: [String: (until: ContinuousClock.Instant, note: String)]]>([:])
    /// Group histories (see ``ChannelLayerHistory``), apart from the queues' lock.
    let histories = Mutex(InMemoryHistories())
    /// Group presence (see ``ChannelLayerPresence``).
    let presence = Mutex([String: InMemoryPresence]())
    let membersMissed = Atomic<Int>(0)
    /// Process channels that stayed full for a whole group-full wait, skipped until the instant.
    let stalledProcessChannels = Mutex<[String: ContinuousClock.Instant]>([:])
    let groupSendsHeld = Atomic<Int>(0)

    /// An empty layer.
    public init(configuration: Configuration = .init()) {
        self.configuration = configuration
        self.capacities = CapacityTable(
            defaultCapacity: configuration.capacity,
            patterns: configuration.channelCapacities)
    }

    static let closedError = ChannelLayerError(.closed, "the in-memory layer is closed")

    /// Queues `message` on `channel`; throws `channelFull` at capacity and `messageTooLarge` over
    /// the size limit.
    public func send(_ message: Message, to channel: String) async throws(ChannelLayerError) {
        try ChannelNames.validateChannel(channel)
        try sendValidated(message, to: channel)
    }

    func sendValidated(_ message: Message, to channel: String, more: ArraySlice<String> = []) throws(ChannelLayerError) {
        if message[asgiChannelKey] != nil {
            throw ChannelLayerError(.invalidMessage, "messages must not contain the reserved key '\(asgiChannelKey)'")
        }
        let size = MsgPackEncoder.encodedSize(message)
        if size > configuration.maxMessageSize {
            throw ChannelLayerError.messageTooLarge(channel, size: size, limit: configuration.maxMessageSize)
        }
        let key = ChannelNames.nonLocalName(channel)
        let capacity = capacities.capacity(for: channel)
        let now = ContinuousClock.now
        let entry = Entry(channel: channel, more: more, message: message, sentAt: now, expiresAt: now + configuration.expiry)
        enum Outcome { case queued, full, closed, handoff(Waiter, ReceivedMessage) }
        let outcome: Outcome = state.withLock { state in
            if state.closed { return .closed }
            state.purge(key, now: now)
            state.operationsSinceSweep += 1
            if state.operationsSinceSweep >= 10_000 {
                state.operationsSinceSweep = 0
                state.sweep(now: now)
            }
            if (state.queues[key]?.count ?? 0) >= capacity {
                state.counters[key, default: Counters()].full += 1
                state.global.full += 1
                return .full
            }
            state.counters[key, default: Counters()].messages += 1
            state.global.messages += 1
            if let id = state.waitersByKey[key]?.first, let waiter = state.removeWaiter(id) {
                if var rest = more.isEmpty ? nil : entry, let next = rest.more.popFirst() {
                    rest.channel = next
                    state.queues[key, default: Deque()].append(rest)
                }
                return .handoff(waiter, ReceivedMessage(channel: channel, message: message))
            }
            state.queues[key, default: Deque()].append(entry)
            return .queued
        }
        switch outcome {
        case .queued: return
        case .full: throw ChannelLayerError.channelFull(channel)
        case .closed: throw Self.closedError
        case .handoff(let waiter, let received):
            waiter.timer?.cancel()
            waiter.continuation.resume(returning: received)
        }
    }

    /// The oldest unexpired message on any of `channels` (in random order between them), waiting up
    /// to `timeout`.
    public func receive(channels: [String], timeout: Duration) async throws(ChannelLayerError) -> ReceivedMessage? {
        for channel in channels { try ChannelNames.validateChannel(channel, for: .receive) }
        guard !channels.isEmpty else { return nil }
        // In random order (no channel starves another), a connection's last message last.
        let keys = channels.filter { !ChannelNames.isDeferredInBatches($0) }.shuffled() + channels.filter(ChannelNames.isDeferredInBatches)

        let (closed, immediate): (Bool, ReceivedMessage?) = state.withLock { state in
            if state.closed { return (true, nil) }
            let now = ContinuousClock.now
            for key in keys {
                if let entry = state.popLive(key, now: now) {
                    return (false, ReceivedMessage(channel: entry.channel, message: entry.message))
                }
            }
            return (false, nil)
        }
        if closed { throw Self.closedError }
        if let immediate { return immediate }
        guard timeout > .zero else { return nil }

        let id = state.withLock { state -> UInt64 in
            state.nextWaiterID &+= 1
            return state.nextWaiterID
        }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<ReceivedMessage?, Never>) in
                let result: ReceivedMessage?? = state.withLock { state in
                    if state.closed || Task.isCancelled { return .some(nil) }
                    let now = ContinuousClock.now
                    for key in keys {
                        if let entry = state.popLive(key, now: now) {
                            return .some(ReceivedMessage(channel: entry.channel, message: entry.message))
                        }
                    }
                    state.waiters[id] = Waiter(keys: keys, continuation: continuation, timer: nil)
                    for key in keys { state.waitersByKey[key, default: Deque()].append(id) }
                    return .none
                }
                if let result {
                    continuation.resume(returning: result)
                    return
                }
                let timer = Task { [weak self] in
                    try? await Task.sleep(for: timeout)
                    guard !Task.isCancelled else { return }
                    self?.wake(id)
                }
                state.withLock { state in
                    if state.waiters[id] != nil { state.waiters[id]!.timer = timer } else { timer.cancel() }
                }
            }
        } onCancel: {
            wake(id)
        }
    }

    /// One wait like ``receive(channels:timeout:)``, then whatever else is queued, up to `max`,
    /// fairly: each channel first up to an equal share of the batch (from a channel chosen at
    /// random), then whatever room is left. A flood on one channel does not take every batch from
    /// the others. A connection's last message (`*.disconnect`) gets no share: it fills what room
    /// the others leave. The batch keeps the channels' order, each channel's messages in queue
    /// order.
    public func receiveBatch(channels: [String], max: Int, timeout: Duration) async throws(ChannelLayerError) -> [ReceivedMessage] {
        guard let first = try await receive(channels: channels, timeout: timeout) else { return [] }
        guard max > 1 else { return [first] }
        let firstIndex =
            channels.firstIndex { $0 == first.channel || ($0.hasSuffix("!") && first.channel.hasPrefix($0)) } ?? 0
        let deferred = channels.map(ChannelNames.isDeferredInBatches)
        let sharing = deferred.allSatisfy { $0 } ? channels.indices.map { _ in true } : deferred.map { !$0 }
        return state.withLock { state -> [ReceivedMessage] in
            var taken = Array(repeating: [ReceivedMessage](), count: channels.count)
            taken[firstIndex] = [first]
            if state.closed { return [first] }
            let now = ContinuousClock.now
            let share = (max + sharing.count { $0 } - 1) / sharing.count { $0 }
            let start = Int.random(in: 0..<channels.count)
            var count = 1
            for pass in 0..<3 {
                for step in 0..<channels.count where count < max {
                    let index = (start + step) % channels.count
                    // Shares, then the room left to the sharing channels, then to the others.
                    guard pass == 2 ? !sharing[index] : sharing[index] else { continue }
                    let want = pass == 0 ? Swift.min(share - taken[index].count, max - count) : max - count
                    var got = 0
                    while got < want, let entry = state.popLive(channels[index], now: now) {
                        taken[index].append(ReceivedMessage(channel: entry.channel, message: entry.message))
                        got += 1
                    }
                    count += got
                }
            }
            return taken.flatMap { $0 }
        }
    }

    /// Ends a wait with no message (timeout, cancellation or close).
    private func wake(_ id: UInt64) {
        let waiter = state.withLock { $0.removeWaiter(id) }
        if let waiter {
            waiter.timer?.cancel()
            waiter.continuation.resume(returning: nil)
        }
    }

    /// A new unique channel name for `pattern` (ending in `!` or `?`).
    public func newChannel(_ pattern: String) async throws(ChannelLayerError) -> String {
        try ChannelNames.validatePattern(pattern)
        return state.withLock { state in
            while true {
                let name = pattern + ChannelNames.randomLetters(12)
                if state.queues[name] == nil { return name }
            }
        }
    }

    /// Group members skipped because their channel was full.
    public var groupMembersMissed: Int { membersMissed.load(ordering: .relaxed) }
    /// Times a group send waited because a process channel was full and offered its share again.
    public var groupSendsHeldBack: Int { groupSendsHeld.load(ordering: .relaxed) }

    /// Messages dropped unread at their expiry so far (also `channels_dropped_total{reason="expired"}`).
    public var messagesExpired: Int { state.withLock { $0.expired } }

    /// The configured size limit.
    public var maxMessageSize: Int { configuration.maxMessageSize }

    /// `groups`, `flush` and `statistics`.
    public var extensions: Set<String> { standardLayerExtensions }

    /// Removes every message and group.
    public func flush() async throws(ChannelLayerError) {
        state.withLock { state in
            state.queues.removeAll()
            state.groups.removeAll()
            state.counters.removeAll()
            state.global = Counters()
        }
        histories.withLock { $0 = InMemoryHistories() }
        presence.withLock { $0.removeAll() }
    }

    /// Says where the messages live: this process.
    public var location: String { "in-memory (this process)" }

    /// Wakes every waiting receive with nothing; later calls fail with `closed`.
    public func close() async {
        let waiters = state.withLock { state -> [Waiter] in
            state.closed = true
            let all = Array(state.waiters.values)
            state.waiters.removeAll()
            state.waitersByKey.removeAll()
            return all
        }
        for waiter in waiters {
            waiter.timer?.cancel()
            waiter.continuation.resume(returning: nil)
        }
    }
}
