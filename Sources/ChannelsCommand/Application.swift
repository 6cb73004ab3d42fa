import ASGI
import ArgumentParser
import Channels
import ChannelsRedis
import Dispatch
import Foundation
import InterfaceServer
import Logging
import NIOCore
import NIOPosix
import RedisChannelLayer
import Synchronization

/// An application: its routing, declared once, and the commands it gets from it
/// (`runserver`, `runworker`, `stats`), like `manage.py` in Django.
public struct ChannelsApplication: Sendable {
    /// The application's name, shown in logs and `--help`.
    public var name: String
    /// Builds the routing table; called once per process that runs consumers.
    public var routing: @Sendable () throws -> [RoutingEntry]
    /// How users are loaded by id (for the `...User` session wrappers); nil: everyone is anonymous.
    public var users: (any UserProvider)?
    /// Session cookie and lifetime settings for the session and auth wrappers.
    public var sessionSettings: SessionSettings

    /// Creates an application from its routing and settings; `main()` then runs the subcommand
    /// given on the command line.
    public init(
        name: String, users: (any UserProvider)? = nil, sessionSettings: SessionSettings = .init(),
        routing: @escaping @Sendable () throws -> [RoutingEntry]
    ) {
        self.name = name
        self.routing = routing
        self.users = users
        self.sessionSettings = sessionSettings
    }

    /// Parses the command line and runs the chosen subcommand with this application.
    ///
    /// Swift concurrency's jobs run on NIO's event loops (where the sockets and the Redis
    /// connections are), so an awaited reply resumes its task on the thread that read it
    /// instead of waking another: set `CHANNELS_EXECUTOR=default` to keep Swift's own pool.
    @MainActor
    public func main() async {
        if ProcessInfo.processInfo.environment["CHANNELS_EXECUTOR"] != "default" {
            NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor()
        }
        do {
            var command = try ApplicationCommand.parseAsRoot()
            if var subcommand = command as? any ApplicationSubcommand {
                try await subcommand.run(self)
            } else {
                try command.run()
            }
        } catch {
            ApplicationCommand.exit(withError: error)
        }
    }
}

/// A command that runs with the application that parsed it (handed over, not looked up in a global).
protocol ApplicationSubcommand: AsyncParsableCommand {
    mutating func run(_ app: ChannelsApplication) async throws
}

extension ApplicationSubcommand {
    /// Commands run through ``ChannelsApplication/main()``, which passes the application.
    mutating func run() async throws {
        throw ValidationError("run this command through ChannelsApplication.main()")
    }
}

struct ApplicationCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "app",
        abstract: "A Channels application: interface server, workers and operations.",
        subcommands: [RunServer.self, RunWorker.self, RunDelay.self, Stats.self]
    )
}

/// Options every command shares.
struct LayerOptions: ParsableArguments {
    @Option(
        name: .long,
        help: """
            Channel layer: redis://, rediss:// (TLS), unix:// or redis+sentinel:// URLs, comma-separated for shards. \
            None = in-memory.
            """)
    var layer: String?

    @Option(name: .long, help: "Session store: redis://host:port/db or memory. Default: the layer's first Redis server, or memory.")
    var sessionStore: String?

    @Flag(name: .shortAndLong, help: "Log debug messages.")
    var verbose = false

    @Option(name: .long, help: "Seconds ordered messages wait for a missing earlier one (lost with a killed worker) before skipping it.")
    var orderingGapTimeout = 10.0

    @Option(name: .long, help: "Log lines as text or json (one object per line). Default: $LOG_FORMAT or text.")
    var logFormat: String?

    /// Sessions and users for the consumers.
    func makeEnvironment(backend: Backend, app: ChannelsApplication) throws -> ConsumerEnvironment {
        let url = sessionStore ?? ProcessInfo.processInfo.environment["SESSION_STORE"]
        let store: any SessionStore
        if let url, !url.isEmpty, url != "memory", url != "memory://" {
            store = RedisSessionStore(client: RedisClient(endpoint: try RedisEndpoint(url: url)))
        } else if url == nil || url == "", let redis = backend.redis {
            store = RedisSessionStore(client: RedisClient(endpoint: redis))
        } else {
            store = InMemorySessionStore()
        }
        return ConsumerEnvironment(
            sessionStore: store, sessionSettings: app.sessionSettings, users: app.users,
            orderingGapTimeout: Duration(secondsValue: orderingGapTimeout))
    }

    func makeLogger(_ label: String) -> Logger {
        LogSetup.bootstrap(format: logFormat ?? ProcessInfo.processInfo.environment["LOG_FORMAT"] ?? "text")
        var logger = Logger(label: label)
        logger.logLevel = verbose ? .debug : .info
        return logger
    }

    /// The layer from `--layer` / `CHANNEL_LAYER` (the embedded one when neither is set), counted
    /// (``MeteredChannelLayer``), with where its Redis-backed companions (sessions, delays) go. Chosen here, once: nothing later
    /// casts the layer back to a concrete type.
    func makeBackend(logger: Logger, allowMemory: Bool) throws -> Backend {
        let url = layer ?? ProcessInfo.processInfo.environment["CHANNEL_LAYER"]
        guard let url, !url.isEmpty else {
            guard allowMemory else {
                throw ValidationError(
                    "this command needs a shared layer: --layer redis://host:port/0 (the in-memory layer lives in one process)")
            }
            return Backend(layer: MeteredChannelLayer(InMemoryChannelLayer()), redis: nil)
        }
        if url == "memory" || url == "memory://" {
            guard allowMemory else { throw ValidationError("the in-memory layer cannot be shared between processes") }
            return Backend(layer: MeteredChannelLayer(InMemoryChannelLayer()), redis: nil)
        }
        let redis = try RedisChannelLayer(
            urls: RedisChannelLayerConfiguration.splitURLList(url), environment: ProcessInfo.processInfo.environment, logger: logger)
        return Backend(layer: MeteredChannelLayer(redis), redis: redis.configuration.hosts.first)
    }
}

/// The layer a command runs on and where the stores that go with it live.
struct Backend: Sendable {
    let layer: any ChannelLayer
    /// The first Redis server of the layer's ring: the default home of sessions and delayed
    /// messages. Nil on the embedded layer, whose companions live in this process.
    let redis: RedisEndpoint?

    /// The layer lives in this process (nothing else can serve it).
    var isEmbedded: Bool { redis == nil }
}

extension Duration {
    init(secondsValue: Double) {
        self = .nanoseconds(Int64((secondsValue * 1e9).rounded()))
    }
}
