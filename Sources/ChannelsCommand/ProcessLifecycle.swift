import ASGI
import Channels
import Foundation
import InterfaceServer
import Logging
import ServiceLifecycle
import Synchronization
import UnixSignals

/// Runs a command's parts as services of one `ServiceGroup` until SIGTERM or SIGINT, which
/// starts a graceful shutdown that stops them in the reverse of the order given (the public side
/// first, the metrics port last), all within one `grace`; past it the group cancels what is
/// left, and five seconds after that the command stops waiting (a consumer that ignores
/// cancellation does not keep the process alive). `/readyz` turns 503 as the shutdown begins.
func runServices(_ services: [any Service], metrics: MetricsEndpoint?, grace: Duration, logger: Logger) async {
    let finished = await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
        let once = ResumeOnce(continuation)
        let finish: @Sendable (Bool) -> Void = { _ = once.resume($0) }
        var parts: [any Service] = []
        if let metrics { parts.append(MetricsService(endpoint: metrics)) }
        parts += services
        // The outer bound starts when the shutdown does: grace, then a little for cancellation.
        parts.append(
            ReadinessGate(endpoint: metrics, logger: logger, grace: grace) {
                Task {
                    try? await Task.sleep(for: grace + .seconds(5))
                    finish(false)
                }
            })
        // Signals trapped since the command began (before it listened) start the graceful
        // shutdown too, even one that came while it was still starting.
        let early = ShutdownSignals.take()
        var configuration = ServiceGroupConfiguration(
            services: parts, gracefulShutdownSignals: early == nil ? [.sigterm, .sigint] : [], logger: logger)
        configuration.maximumGracefulShutdownDuration = grace
        let group = ServiceGroup(configuration: configuration)
        if let early {
            Task {
                for await _ in early { await group.triggerGracefulShutdown() }
            }
        }
        Task {
            do {
                try await group.run()
            } catch {
                logger.error("stopped on an error", metadata: ["error": "\(error)"])
            }
            finish(true)
        }
    }
    if !finished { logger.warning("gave up waiting for work in hand after the grace period") }
}

/// The last service of every command: the first told of a shutdown, it turns `/readyz` to 503
/// (load balancers stop sending work here) before the others begin to stop.
private struct ReadinessGate: Service, CustomStringConvertible {
    let endpoint: MetricsEndpoint?
    let logger: Logger
    let grace: Duration
    let shutdownBegan: @Sendable () -> Void
    var description: String { "readiness" }

    func run() async throws {
        try? await gracefulShutdown()
        shutdownBegan()
        endpoint?.markShuttingDown()
        logger.info("stopping: finishing what is in hand", metadata: ["grace_s": "\(grace.seconds)"])
    }
}

/// The operators' port: up until every other part has stopped.
private struct MetricsService: Service, CustomStringConvertible {
    let endpoint: MetricsEndpoint
    var description: String { "metrics" }

    func run() async throws {
        try? await gracefulShutdown()
        await endpoint.close()
    }
}
