import ASGI
import ArgumentParser
import Channels
import Foundation
import Logging
import Synchronization

/// Runs a loop until SIGTERM/SIGINT, then asks it to stop and waits for what it holds to
/// finish, at most `grace`: a consumer that hangs does not keep the process alive forever.
func runUntilSignal(
    logger: Logger, grace: Duration = .seconds(30), run: @escaping @Sendable () async -> Void,
    stop: @Sendable () -> Void
) async {
    let task = Task { await run() }
    await Signals.wait()
    logger.info("stopping: finishing what is in hand", metadata: ["grace_s": "\(grace.seconds)"])
    stop()
    // The process is about to exit: work still running after the grace is left behind.
    let finished = await racingTimeout(grace, fallback: false) {
        await task.value
        return true
    }
    if !finished { logger.warning("gave up waiting for work in hand after the grace period") }
}

/// What `work` returns, or `fallback` when `timeout` ends first. The loser is not waited for
/// (work that ignores cancellation, a connect to a dead Redis, must not hold the caller).
func racingTimeout<T: Sendable>(_ timeout: Duration, fallback: T, _ work: @escaping @Sendable () async -> T) async -> T {
    await withCheckedContinuation { (continuation: CheckedContinuation<T, Never>) in
        let resumed = Mutex(false)
        let resume: @Sendable (T) -> Void = { value in
            let first = resumed.withLock { done -> Bool in
                defer { done = true }
                return !done
            }
            if first { continuation.resume(returning: value) }
        }
        let timer = Task {
            try? await Task.sleep(for: timeout)
            resume(fallback)
        }
        Task {
            resume(await work())
            timer.cancel()
        }
    }
}

/// A line on standard output, written at once (not held in a buffer when stdout is a pipe).
func say(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}
