import ASGI
import Foundation

/// What `work` returns, or `fallback` when `timeout` ends first. The loser is not waited for
/// (work that ignores cancellation, a connect to a dead Redis, must not hold the caller).
func racingTimeout<T: Sendable>(_ timeout: Duration, fallback: T, _ work: @escaping @Sendable () async -> T) async -> T {
    await withCheckedContinuation { (continuation: CheckedContinuation<T, Never>) in
        let once = ResumeOnce(continuation)
        let resume: @Sendable (T) -> Void = { _ = once.resume($0) }
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
