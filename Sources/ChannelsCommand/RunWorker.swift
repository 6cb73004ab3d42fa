import ASGI
import ArgumentParser
import Channels
import Foundation
import InterfaceServer
import Logging
import NIOPosix
import ServiceLifecycle
import Synchronization

struct RunWorker: ApplicationSubcommand {
    static let configuration = CommandConfiguration(
        commandName: "runworker",
        abstract: "Run consumers for messages from a shared channel layer."
    )

    @OptionGroup var options: LayerOptions
    @Option(
        name: [.customLong("concurrency"), .customLong("threads")],
        help: "Consumers that may run at once (async tasks, not OS threads; --threads is Channels 1.x's name for it).")
    var concurrency = 32
    @Option(
        name: .long, help: "Seconds a consumer may run before it is cancelled and counted (0: no limit; streamed responses are exempt).")
    var consumerTimeout = 60.0
    @Flag(
        name: .long,
        help: """
            Run consumers on Swift's global executor instead of the event loops the Redis connections \
            live on (for consumers that block their thread: synchronous I/O, long computations).
            """)
    var globalExecutor = false
    @Option(name: .long, parsing: .upToNextOption, help: "Only these channels (globs).") var onlyChannels: [String] = []
    @Option(name: .long, parsing: .upToNextOption, help: "Not these channels (globs).") var excludeChannels: [String] = []
    @Option(name: .long, help: "Seconds to let consumers in flight finish after SIGTERM.") var shutdownTimeout = 30.0
    @Option(
        name: .long,
        help: """
            Seconds a streamed response's lease lasts unless this worker renews it: the server cuts             the response that long after the worker died (at least 2).
            """)
    var streamLease = 20.0

    @OptionGroup var metrics: MetricsOptions

    func validate() throws {
        guard streamLease.isFinite, streamLease >= 2, streamLease <= 86_400 else {
            throw ValidationError("--stream-lease must be a number of seconds from 2 to 86400")
        }
    }

    func run(_ app: ChannelsApplication) async throws {
        await ShutdownSignals.trap()
        let logger = options.makeLogger("channels.runworker")
        let metricsEndpoint = try await metrics.start(logger: logger)
        let backend = try options.makeBackend(logger: logger, allowMemory: false)
        let layer = backend.layer
        let router = try Router(app.routing())
        let worker = Worker(
            router: router, layer: layer, concurrency: concurrency, only: onlyChannels,
            exclude: excludeChannels, environment: try await options.makeEnvironment(backend: backend, app: app, logger: logger),
            consumerTimeout: consumerTimeout > 0 ? Duration(secondsValue: consumerTimeout) : nil,
            middleware: app.middleware, hooks: app.hooks, logger: logger,
            // On the loops the layer's connections live on (NIO's shared group): a consumer's
            // round trips to Redis start and end on its own thread. 0.5-0.52 against 0.59-0.66 ms
            // from a relayed message's take to its group send (`scripts/trace-hops.sh`, session 37).
            consumerExecutors: globalExecutor ? [] : MultiThreadedEventLoopGroup.singleton.makeIterator().map(EventLoopTaskExecutor.init),
            streamLeaseDuration: Duration(secondsValue: streamLease))
        // SIGHUP (a log rotation, `systemctl reload`) must not stop it: nothing to reload here.
        ProcessLimits.onHangup { logger.info("SIGHUP: nothing to reload; running on") }
        say("runworker: listening on \(worker.channels.joined(separator: ", "))")
        metricsEndpoint?.setReadiness { await MetricsEndpoint.layerAnswers(layer) }
        await runServices(
            [worker] + app.services(), metrics: metricsEndpoint,
            grace: Duration(secondsValue: shutdownTimeout), logger: logger)
        await layer.close()
    }
}
