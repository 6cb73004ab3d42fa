import Dispatch
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Writes on a queue of its own, so the thread that produced a line (an event loop) never waits
/// on a disk or a pipe: the access log and the process's own log lines.
///
/// At most `limit` lines wait; past that (the disk or the pipe stalls) lines are dropped and
/// counted rather than held without bound, and the writer says so: a `gapLine` written where
/// the lines are missing, a `report` (at most once a minute) from the thread that dropped one,
/// or both. The sink is handed every line of a few milliseconds (and every line that came while
/// it was busy) in one call, so a burst costs one write and one wake-up, not one per line.
package final class BackgroundWriter<Line: Sendable>: Sendable {
    private let queue: DispatchQueue
    private let sink: @Sendable ([Line]) -> Void
    private let limit: Int
    private let gapLine: (@Sendable (_ dropped: Int) -> Line)?
    private let report: (@Sendable (_ droppedTotal: Int) -> Void)?
    private let onDrop: (@Sendable () -> Void)?
    private let dropped = Atomic<Int>(0)
    private let lastReport = Mutex<ContinuousClock.Instant?>(nil)

    /// Lines waiting, lines being written, whether the writer is at work (woken once for as many
    /// lines as come meanwhile: a wake-up per line would cost more than the line), and the drop
    /// count the last gap line covered.
    private enum Outcome { case queued, wake, full }

    private struct Backlog {
        var lines: [Line] = []
        var writing = 0
        var draining = false
        var droppedWritten = 0
    }
    private let backlog = Mutex(Backlog())

    package init(
        label: String, limit: Int = 10_000, gapLine: (@Sendable (_ dropped: Int) -> Line)? = nil,
        report: (@Sendable (_ droppedTotal: Int) -> Void)? = nil, onDrop: (@Sendable () -> Void)? = nil,
        sink: @escaping @Sendable ([Line]) -> Void
    ) {
        self.queue = DispatchQueue(label: label)
        self.limit = limit
        self.gapLine = gapLine
        self.report = report
        self.onDrop = onDrop
        self.sink = sink
    }

    /// Lines dropped because the writer fell `limit` lines behind.
    package var droppedLines: Int { dropped.load(ordering: .relaxed) }

    /// Queues `line`; never waits. An `urgent` line (an error) is written at once, not after
    /// the gathering pause: a crash right after it does not take it along.
    package func submit(_ line: Line, urgent: Bool = false) {
        // A drop is counted under the lock: a drain that ends in between sees it.
        let outcome = backlog.withLock { backlog -> Outcome in
            guard backlog.lines.count + backlog.writing < limit else {
                dropped.add(1, ordering: .relaxed)
                return .full
            }
            backlog.lines.append(line)
            if backlog.draining { return .queued }
            backlog.draining = true
            return .wake
        }
        switch outcome {
        case .queued:
            if urgent { queue.async { self.drain() } }
        case .wake:
            if urgent {
                queue.async { self.drain() }
            } else {
                // Lines that come in the next few milliseconds go in the same write: one
                // wake-up of the writer per gathering, not one per line (which cost more than
                // the line). A relative pause on the writer's own thread, not a Dispatch timer:
                // those take an absolute deadline, which a process whose clock is shifted
                // (`faketime`, 30 s ahead) set 30 s into the real future.
                queue.async {
                    Self.gather()
                    self.drain()
                }
            }
        case .full:
            onDrop?()
            guard let report else { return }
            let total = dropped.load(ordering: .relaxed)
            let now = ContinuousClock.now
            let due = lastReport.withLock { last -> Bool in
                guard last.map({ now - $0 >= .seconds(60) }) ?? true else { return false }
                last = now
                return true
            }
            if due { report(total) }
        }
    }

    /// On the queue: writes what has come, in order, until nothing is left; where lines were
    /// dropped since the last take, the gap line after the lines taken before them.
    private func drain() {
        while true {
            let (lines, gap) = backlog.withLock { backlog -> ([Line], Int) in
                backlog.writing = 0
                let droppedNow = dropped.load(ordering: .relaxed)
                let gap = droppedNow - backlog.droppedWritten
                backlog.droppedWritten = droppedNow
                guard !backlog.lines.isEmpty else {
                    backlog.draining = false
                    return ([], gap)
                }
                let taken = backlog.lines
                backlog.lines.removeAll(keepingCapacity: true)
                backlog.writing = taken.count
                return (taken, gap)
            }
            // Dropped lines came after the ones taken here (nothing is queued once it is full).
            if !lines.isEmpty { sink(lines) }
            if gap > 0, let gapLine { sink([gapLine(gap)]) }
            if lines.isEmpty { return }
        }
    }

    /// The first line of a quiet spell waits this long (5 ms) for others to go out with it.
    private static func gather() {
        var pause = timespec(tv_sec: 0, tv_nsec: 5_000_000)
        var left = timespec()
        while nanosleep(&pause, &left) != 0 && errno == EINTR { pause = left }
    }

    /// Waits until every line given so far is written (at shutdown).
    package func flush() { queue.sync { drain() } }

    /// Waits until every line given so far is written, or `timeout` went by (at exit, when the
    /// output may be a pipe nobody reads any more). Whether everything was written.
    @discardableResult
    package func flush(timeout: Duration) -> Bool {
        let done = DispatchSemaphore(value: 0)
        queue.async {
            self.drain()
            done.signal()
        }
        let nanoseconds = timeout.components.seconds * 1_000_000_000 + timeout.components.attoseconds / 1_000_000_000
        return done.wait(timeout: .now() + .nanoseconds(Int(nanoseconds))) == .success
    }

    /// ``flush(timeout:)`` from async code: the wait blocks a thread of Dispatch's, never the
    /// caller's (an event loop).
    @discardableResult
    package func flushed(within timeout: Duration) async -> Bool {
        await withCheckedContinuation { continuation in
            DispatchQueue.global().async { continuation.resume(returning: self.flush(timeout: timeout)) }
        }
    }
}

/// Whole writes to a file descriptor (standard output or error) from a writer's queue.
package enum StandardStream {
    /// Writes all of `text` to `fd`: again after a signal, after waiting for room when the
    /// descriptor is non-blocking and full; stops at any other error (a closed pipe). Whether
    /// all of it was written.
    @discardableResult
    package static func write(_ text: String, to fd: Int32) -> Bool {
        var text = text
        return text.withUTF8 { bytes -> Bool in
            guard var next = bytes.baseAddress else { return true }
            var left = bytes.count
            while left > 0 {
                let written = systemWrite(fd, next, left)
                if written > 0 {
                    next += written
                    left -= written
                } else if written < 0 && errno == EINTR {
                    continue
                } else if written < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) {
                    var room = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                    _ = poll(&room, 1, 1000)
                } else {
                    return false
                }
            }
            return true
        }
    }

    private static func systemWrite(_ fd: Int32, _ bytes: UnsafePointer<UInt8>, _ count: Int) -> Int {
        #if canImport(Darwin)
            Darwin.write(fd, bytes, count)
        #else
            Glibc.write(fd, bytes, count)
        #endif
    }
}
