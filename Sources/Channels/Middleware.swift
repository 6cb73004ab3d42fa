import ASGI

/// Code around every consumer of a worker, in order: each gets the context and the rest of the
/// chain (`next`), and may act before and after it, or answer itself and not call `next` (a
/// short-circuit: an authorization check, a maintenance switch). The first in the list runs
/// outermost.
///
/// ```swift
/// let timing: ConsumerMiddleware = { context, next in
///     let start = ContinuousClock.now
///     try await next(context)
///     context.logger.debug("took \(ContinuousClock.now - start)")
/// }
/// ```
public typealias ConsumerMiddleware = @Sendable (ConsumerContext, _ next: Consumer) async throws -> Void

/// Points in a worker's life an application can hook (Channels 1.x's `worker_ready`,
/// `consumer_started` and `consumer_finished` signals). Each is called once per event.
public struct WorkerHooks: Sendable {
    /// The worker listens (once, before the first message).
    public var ready: (@Sendable () async -> Void)?
    /// A consumer is about to run for a message.
    public var consumerStarted: (@Sendable (ConsumerContext) async -> Void)?
    /// A consumer returned (`nil`) or threw (the error), its sends flushed.
    public var consumerFinished: (@Sendable (ConsumerContext, (any Error)?) async -> Void)?

    /// Hooks; the ones not given do nothing.
    public init(
        ready: (@Sendable () async -> Void)? = nil, consumerStarted: (@Sendable (ConsumerContext) async -> Void)? = nil,
        consumerFinished: (@Sendable (ConsumerContext, (any Error)?) async -> Void)? = nil
    ) {
        self.ready = ready
        self.consumerStarted = consumerStarted
        self.consumerFinished = consumerFinished
    }
}

extension Array where Element == ConsumerMiddleware {
    /// `consumer` wrapped in the middleware, the first outermost.
    func wrapping(_ consumer: @escaping Consumer) -> Consumer {
        reversed().reduce(consumer) { next, middleware in
            { context in try await middleware(context, next) }
        }
    }
}
