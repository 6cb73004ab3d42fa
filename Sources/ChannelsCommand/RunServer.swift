import ArgumentParser
import ASGI
import Channels
import Foundation
import InterfaceServer
import Logging
import RedisChannelLayer
import Synchronization

struct RunServer: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "runserver",
        abstract: "Serve HTTP and WebSocket, with workers in this process unless --noworker."
    )

    @OptionGroup var options: LayerOptions
    @Option(name: .long, help: "Address to bind.") var bind = "127.0.0.1"
    @Option(name: .long, help: "Port to listen on.") var port = 8000
    @Option(name: .long, help: "Listen on a Unix socket instead.") var unixSocket: String?
    @Flag(name: .long, help: "Serve the protocol only; workers run elsewhere (runworker).") var noworker = false
    @Option(name: .long, help: "In-process worker loops.") var threads = 4
    @Option(name: .long, help: "Seconds to wait for an HTTP response before 503.") var httpTimeout = 60.0
    @Option(name: .long, help: "Seconds to wait for a WebSocket accept.") var websocketConnectTimeout = 5.0
    @Option(name: .long, help: "Maximum WebSocket life in seconds.") var websocketTimeout: Double?
    @Option(name: .long, help: "Seconds between server pings.") var pingInterval = 20.0
    @Option(name: .long, help: "Seconds without a pong before closing.") var pingTimeout = 30.0
    @Option(name: .long, help: "root_path sent to the application.") var rootPath = ""
    @Flag(name: .long, help: "Trust X-Forwarded-For / X-Forwarded-Proto.") var proxyHeaders = false
    @Option(name: .long, help: "WebSocket subprotocol to offer.") var wsProtocol: [String] = []
    @Option(name: .long, help: "Access log file (Daphne-style text), or - for standard output. Default: structured lines in the log.") var accessLog: String?
    @Option(name: .long, parsing: .upToNextOption, help: "Origins allowed to open WebSockets (all when empty).") var allowedOrigins: [String] = []
    @Option(name: .long, help: "Largest request body in bytes (413 past it).") var maxBodySize = 16 * 1024 * 1024
    @Option(name: .long, help: "Largest request head (request line and headers) in bytes (431 past it).") var maxHeaderSize = 64 * 1024

    func run() async throws {
        let logger = options.makeLogger("channels.runserver")
        let layer = try options.makeLayer(logger: logger, allowMemory: true)
        let app = ChannelsApplication.get()
        let router = try Router(app.routing())
        var configuration = ServerConfiguration(host: bind, port: port)
        configuration.unixSocketPath = unixSocket
        configuration.httpTimeout = Duration(secondsValue: httpTimeout)
        configuration.websocketConnectTimeout = Duration(secondsValue: websocketConnectTimeout)
        configuration.websocketTimeout = websocketTimeout.map { Duration(secondsValue: $0) }
        configuration.pingInterval = pingInterval > 0 ? Duration(secondsValue: pingInterval) : nil
        configuration.pingTimeout = Duration(secondsValue: pingTimeout)
        configuration.rootPath = rootPath
        configuration.proxyHeaders = proxyHeaders
        configuration.websocketProtocols = wsProtocol
        configuration.allowedOrigins = allowedOrigins
        configuration.maxBodySize = maxBodySize
        configuration.maxHeaderSize = maxHeaderSize
        let server = InterfaceServer(layer: layer, configuration: configuration, logger: logger, accessLogPath: accessLog)
        try await server.start()
        let worker = noworker ? nil : Worker(router: router, layer: layer, concurrency: threads,
                                             environment: try options.makeEnvironment(layer: layer),
                                             logger: options.makeLogger("channels.worker"))
        let workerTask = worker.map { worker in Task { await worker.run() } }
        // On the in-memory layer nothing else could run a delay server: run one here.
        let delay = !noworker && layer is InMemoryChannelLayer
            ? DelayServer(layer: layer, store: InMemoryDelayStore(), logger: options.makeLogger("channels.delay")) : nil
        let delayTask = delay.map { delay in Task { await delay.run() } }
        let address = server.localAddress.map { "\($0)" } ?? bind
        say("\(app.name): serving on http://\(bind):\(server.localAddress?.port ?? port)/ (\(noworker ? "no workers" : "\(threads) workers in process"), layer: \(options.layer ?? "in-memory"))  [\(address)]")
        await Signals.wait()
        logger.info("shutting down")
        await server.shutdown()
        worker?.stop()
        delay?.stop()
        await workerTask?.value
        await delayTask?.value
        await layer.close()
    }
}

/// Runs a loop until SIGTERM/SIGINT, then asks it to stop and waits for what it holds to
/// finish, at most `grace`: a consumer that hangs does not keep the process alive forever.
func runUntilSignal(logger: Logger, grace: Duration = .seconds(30), run: @escaping @Sendable () async -> Void,
                    stop: @Sendable () -> Void) async {
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
        Task { await task.value; resume(true) }
        Task { try? await Task.sleep(for: grace); resume(false) }
    }
    if !finished { logger.warning("gave up waiting for work in hand after the grace period") }
}

struct RunDelay: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rundelay",
        abstract: "Run the delay server: messages sent to asgi.delay go to their channel when due."
    )

    @OptionGroup var options: LayerOptions
    @Option(name: .long, help: "The Redis sorted set that holds scheduled messages.") var delayKey = "asgi-delay:scheduled"

    func run() async throws {
        let logger = options.makeLogger("channels.rundelay")
        let layer = try options.makeLayer(logger: logger, allowMemory: false)
        guard let redis = layer as? RedisChannelLayer, let first = redis.configuration.hosts.first else {
            throw ValidationError("rundelay needs a Redis layer")
        }
        let client = RedisClient(endpoint: first)
        let server = DelayServer(layer: layer, store: RedisDelayStore(client: client, key: delayKey), logger: logger)
        say("rundelay: waiting for messages on \(DelayServer.channel), scheduled in \(delayKey) on \(first)")
        await runUntilSignal(logger: logger, run: server.run, stop: server.stop)
        await client.close()
        await layer.close()
    }
}

struct RunWorker: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "runworker",
        abstract: "Run consumers for messages from a shared channel layer."
    )

    @OptionGroup var options: LayerOptions
    @Option(name: .long, help: "Concurrent consumers, each with its own blocking receive.") var threads = 4
    @Option(name: .long, parsing: .upToNextOption, help: "Only these channels (globs).") var onlyChannels: [String] = []
    @Option(name: .long, parsing: .upToNextOption, help: "Not these channels (globs).") var excludeChannels: [String] = []
    @Option(name: .long, help: "Seconds to let consumers in flight finish after SIGTERM.") var shutdownTimeout = 30.0

    func run() async throws {
        let logger = options.makeLogger("channels.runworker")
        let layer = try options.makeLayer(logger: logger, allowMemory: false)
        let router = try Router(ChannelsApplication.get().routing())
        let worker = Worker(router: router, layer: layer, concurrency: threads, only: onlyChannels,
                            exclude: excludeChannels, environment: try options.makeEnvironment(layer: layer), logger: logger)
        say("runworker: listening on \(worker.channels.joined(separator: ", "))")
        await runUntilSignal(logger: logger, grace: Duration(secondsValue: shutdownTimeout), run: worker.run, stop: worker.stop)
        await layer.close()
    }
}

struct Stats: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show channel and layer statistics.")

    @OptionGroup var options: LayerOptions
    @Flag(name: .long, help: "Print JSON.") var json = false
    @Option(name: .long, help: "Refresh every N seconds until interrupted.") var watch: Double?
    @Argument(help: "Channels to show (default: the routed ones and every channel with messages).") var channels: [String] = []

    func run() async throws {
        let logger = options.makeLogger("channels.stats")
        let layer = try options.makeLayer(logger: logger, allowMemory: false)
        defer { Task { await layer.close() } }
        guard let watch, watch > 0 else {
            try await show(layer)
            return
        }
        while !Task.isCancelled {
            say("\u{1b}[2J\u{1b}[H" + Date().description)
            try await show(layer)
            // A refresh of a display, on a timer.
            try await Task.sleep(for: Duration(secondsValue: watch))
        }
    }

    private func show(_ layer: any ChannelLayer) async throws {
        var names = Set(channels)
        if names.isEmpty {
            names = try Router(ChannelsApplication.get().routing()).channels
            if let redis = layer as? RedisChannelLayer {
                names.formUnion(try await redis.pendingChannels())
            }
        }
        var groups: [(String, Int)] = []
        if let redis = layer as? RedisChannelLayer {
            for group in try await redis.groups() { groups.append((group, try await layer.groupChannels(group).count)) }
        }
        let global = try await layer.globalStatistics()
        var rows: [(String, ChannelStatistics)] = []
        for name in names.sorted() {
            rows.append((name, try await layer.channelStatistics(name)))
        }
        if json {
            var object: [String: Any] = ["messages_count": global.messagesCount, "channel_full_count": global.channelFullCount]
            object["channels"] = Dictionary(uniqueKeysWithValues: rows.map { ($0.0, [
                "messages_count": $0.1.messagesCount, "channel_full_count": $0.1.channelFullCount,
                "messages_pending": $0.1.messagesPending, "messages_max_age": $0.1.messagesMaxAge,
            ] as [String: Any]) })
            object["groups"] = Dictionary(uniqueKeysWithValues: groups.map { ($0.0, $0.1) })
            let data = try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .prettyPrinted])
            print(String(decoding: data, as: UTF8.self))
        } else {
            print("channel".padding(toLength: 40, withPad: " ", startingAt: 0) + "  pending   oldest(s)   sent   full")
            for (name, s) in rows {
                print(name.padding(toLength: 40, withPad: " ", startingAt: 0)
                      + String(format: "  %7d   %9.1f   %4d   %4d", s.messagesPending, s.messagesMaxAge, s.messagesCount, s.channelFullCount))
            }
            print("total sent \(global.messagesCount), channel full \(global.channelFullCount)")
            if !groups.isEmpty {
                print("")
                print("group".padding(toLength: 40, withPad: " ", startingAt: 0) + "  members")
                for (name, size) in groups {
                    print(name.padding(toLength: 40, withPad: " ", startingAt: 0) + String(format: "  %7d", size))
                }
            }
        }
    }
}

/// A line on standard output, written at once (not held in a buffer when stdout is a pipe).
func say(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}
