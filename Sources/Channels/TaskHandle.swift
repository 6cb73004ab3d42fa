import Synchronization

/// A running task that another may cancel: a consumer streaming a response (cancelled when its
/// client leaves) or a worker's receive loop (cancelled by `stop()`), and nothing else of the
/// task that runs it.
///
/// The task is attached inside `withUnsafeCurrentTask` and detached before that closure
/// returns, both under the lock `cancel()` takes, so the task reference is only used while the
/// task is alive and running the body. A `cancel()` before the attach cancels the body as it
/// starts. No task of its own.
final class TaskHandle: Sendable {
    private let state = Mutex<(task: UnsafeCurrentTask?, cancelled: Bool)>((nil, false))

    /// Runs `body` in the current task, cancellable through `cancel()` until it returns.
    func running<T, E: Error>(_ body: () async throws(E) -> T) async throws(E) -> T {
        // `withUnsafeCurrentTask` rethrows untyped errors: the typed error goes around it.
        let result: Result<T, E> = await withUnsafeCurrentTask { task in
            attach(task)
            defer { detach() }
            do throws(E) { return .success(try await body()) } catch { return .failure(error) }
        }
        return try result.get()
    }

    private func attach(_ task: UnsafeCurrentTask?) {
        state.withLock { state in
            state.task = task
            if state.cancelled { task?.cancel() }
        }
    }

    private func detach() {
        state.withLock { $0.task = nil }
    }

    /// True once `cancel()` was called.
    var cancelled: Bool { state.withLock { $0.cancelled } }

    /// Cancels the body running now, or the next one to start.
    func cancel() {
        state.withLock { state in
            state.cancelled = true
            state.task?.cancel()
        }
    }
}
