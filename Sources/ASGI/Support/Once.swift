import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Resumes a continuation with the first value it is given; later ones are ignored. For a wait
/// that several things may end (a value, a timer, a shutdown), whichever comes first.
package final class ResumeOnce<Value: Sendable>: Sendable {
    private let resumed = Atomic<Bool>(false)
    private let continuation: CheckedContinuation<Value, Never>

    /// Guards `continuation`.
    package init(_ continuation: CheckedContinuation<Value, Never>) { self.continuation = continuation }

    /// Resumes with `value` if nothing did before; returns whether this call did.
    @discardableResult
    package func resume(_ value: Value) -> Bool {
        guard !resumed.exchange(true, ordering: .acquiringAndReleasing) else { return false }
        continuation.resume(returning: value)
        return true
    }
}

/// The wall clock, read in one place. Only for what is shared with other processes or people
/// (a group member's score as asgi_redis writes it, a session's issue time, a page's
/// timestamp); durations and deadlines use `ContinuousClock`.
package enum WallClock {
    /// Seconds since 1970, with a fraction.
    package static var seconds: Double {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    /// Whole milliseconds since 1970, rounded.
    package static var milliseconds: Int64 { Int64((seconds * 1000).rounded()) }

    /// Whole seconds since 1970.
    package static var wholeSeconds: Int64 { Int64(seconds) }
}
