/// Runs `body`, retrying it with growing pauses (10 ms doubling to 500 ms) while it throws a
/// ``ChannelLayerError`` that `retryable` accepts, for at most `limit` in all; then the last
/// error is thrown. For waits on a full channel or a Redis that is restarting: a timer between
/// attempts, never a busy loop.
@inlinable
public func retrying<T>(
    for limit: Duration, when retryable: (ChannelLayerError) -> Bool = ChannelLayerError.isTransient,
    _ body: () async throws -> T
) async throws -> T {
    // The first try is inlined into the caller (and specialized for its type): most calls
    // succeed at once, and this runs for every Redis command of a session or delay store.
    let start = ContinuousClock.now
    do {
        return try await body()
    } catch let error as ChannelLayerError where retryable(error) {
        return try await retryingAfter(error, deadline: start + limit, when: retryable, body)
    }
}

/// Growing pauses between tries: `first`, then doubling up to `cap`. Every retry loop of the
/// package spells its pauses with it (the caps differ: 50 ms for a group send held back, a
/// second for a socket's held sends, five for a presence call).
public struct Backoff: Sendable {
    /// The pause the next ``next()`` returns.
    public private(set) var pause: Duration
    /// The first pause (``reset()`` goes back to it).
    public let first: Duration
    /// The longest pause.
    public let cap: Duration

    /// Pauses from `first`, doubling up to `cap`.
    public init(first: Duration, cap: Duration) {
        self.first = first
        self.cap = cap
        self.pause = first
    }

    /// The pause to wait now; the one after it is twice as long (at most `cap`).
    public mutating func next() -> Duration {
        defer { pause = min(pause * 2, cap) }
        return pause
    }

    /// The next pause is `first` again (the thing waited for came).
    public mutating func reset() { pause = first }
}

/// The tries after a first failure: back-off from 10 ms, doubling to 500 ms, until `deadline`.
@usableFromInline
func retryingAfter<T>(
    _ first: ChannelLayerError, deadline: ContinuousClock.Instant, when retryable: (ChannelLayerError) -> Bool,
    _ body: () async throws -> T
) async throws -> T {
    var backoff = Backoff(first: .milliseconds(10), cap: .milliseconds(500))
    var last = first
    while ContinuousClock.now + backoff.pause < deadline {
        try? await Task.sleep(for: backoff.next())
        if Task.isCancelled { throw last }
        do {
            return try await body()
        } catch let error as ChannelLayerError where retryable(error) {
            last = error
        }
    }
    throw last
}

extension ChannelLayerError {
    /// A failure that may pass by itself: a full channel, a store that cannot be reached, or a
    /// Redis out of memory (until memory frees up).
    public static func isTransient(_ error: ChannelLayerError) -> Bool {
        error.code == .channelFull || error.code == .connectionLost || error.code == .outOfMemory
    }
}

/// The pauses of the loops that read a layer for as long as they run (workers, the interface
/// server's reply reader, the delay server): one back-off for all of them.
public enum Retry {
    /// The pause after `failures` failures in a row: 50 ms more for each, at most a second.
    public static func backoff(after failures: Int) -> Duration {
        .milliseconds(min(1000, 50 * max(1, failures)))
    }
}

/// A layer-reading loop's run of failures in a row: `failed` reports the first and every 30th
/// (so a Redis that is down for an hour does not fill the log) and waits ``Retry/backoff(after:)``;
/// `succeeded` ends the run.
public struct FailureStreak: Sendable {
    /// Failures in a row so far.
    public private(set) var count = 0

    /// A streak of none.
    public init() {}

    /// The loop went through: the next failure starts a new run.
    public mutating func succeeded() { count = 0 }

    /// Counts a failure, calls `report` with the count when it is the first or every 30th, then
    /// waits the back-off (a cancelled task returns at once).
    public mutating func failed(report: (Int) -> Void) async {
        count += 1
        if count == 1 || count % 30 == 0 { report(count) }
        try? await Task.sleep(for: Retry.backoff(after: count))
    }
}
