import ASGI
import Synchronization

/// Counts attempts per key in fixed windows: what a login endpoint uses to say `429 Too Many
/// Requests`. In memory by default; on the layer's Redis (``ConsumerEnvironment/rateLimiter``
/// there) every worker shares the counts.
public protocol RateLimiter: Sendable {
    /// Counts one attempt for `key` in the current window of `window` seconds; returns the
    /// attempts counted in it (this one included) and the seconds until it ends.
    func hit(_ key: String, window: Int) async throws -> (count: Int, resetIn: Int)
    /// The attempts counted for `key` in its current window, without counting one.
    func peek(_ key: String) async throws -> (count: Int, resetIn: Int)
}

/// Counts in this process's memory; expired windows are dropped as they are passed.
public final class InMemoryRateLimiter: RateLimiter {
    private struct Window {
        var count: Int
        var ends: ContinuousClock.Instant
    }

    private let windows = Mutex<[String: Window]>([:])

    /// An empty limiter.
    public init() {}

    /// Counts one attempt for `key`.
    public func hit(_ key: String, window: Int) async throws -> (count: Int, resetIn: Int) {
        let now = ContinuousClock.now
        return windows.withLock { windows in
            if windows.count > 10_000 { windows = windows.filter { $0.value.ends > now } }
            var current = windows[key].flatMap { $0.ends > now ? $0 : nil } ?? Window(count: 0, ends: now + .seconds(window))
            current.count += 1
            windows[key] = current
            return (current.count, Self.seconds(until: current.ends, from: now))
        }
    }

    /// The attempts counted for `key` now.
    public func peek(_ key: String) async throws -> (count: Int, resetIn: Int) {
        let now = ContinuousClock.now
        return windows.withLock { windows in
            guard let current = windows[key], current.ends > now else { return (0, 0) }
            return (current.count, Self.seconds(until: current.ends, from: now))
        }
    }

    private static func seconds(until end: ContinuousClock.Instant, from now: ContinuousClock.Instant) -> Int {
        let left = now.duration(to: end).components
        return max(1, Int(left.seconds) + (left.attoseconds > 0 ? 1 : 0))
    }
}
