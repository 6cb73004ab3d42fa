import NIOCore

/// Runs a task's jobs on one NIO event loop: a task that mostly waits on the layer's replies
/// (which arrive on event loops) and hands work to event loops resumes where that work is,
/// instead of first waking a thread of the global executor. The reply router reads on one.
/// The loop must outlive the task: NIO drops a job for a loop that has shut down, and the task
/// would never resume (the server's group belongs to its caller, who shuts it down last).
public final class EventLoopTaskExecutor: TaskExecutor, @unchecked Sendable {
    /// The loop the jobs run on.
    public let loop: any EventLoop

    /// An executor for `loop`'s thread.
    public init(_ loop: any EventLoop) { self.loop = loop }

    /// Runs `job` on the loop.
    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        loop.execute { job.runSynchronously(on: self.asUnownedTaskExecutor()) }
    }
}
