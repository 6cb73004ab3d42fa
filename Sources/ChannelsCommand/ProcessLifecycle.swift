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
    // A race between the work and a timer; whichever ends first resumes us (the other is left
    // behind: the process is about to exit).
    let finished = await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
        let resumed = Mutex(false)
        let resume: @Sendable (Bool) -> Void = { value in
            let first = resumed.withLock { done -> Bool in
                defer { done = true }
                return !done
            }
            if first { continuation.resume(returning: value) }
        }
        Task {
            await task.value; resume(true)
        }
        Task {
            try? await Task.sleep(for: grace); resume(false)
        }
    }
    if !finished { logger.warning("gave up waiting for work in hand after the grace period") }
}

/// A line on standard output, written at once (not held in a buffer when stdout is a pipe).
func say(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}
