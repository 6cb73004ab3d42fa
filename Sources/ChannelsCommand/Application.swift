import ASGI
import ArgumentParser
import Channels
import Dispatch
import Foundation
import InterfaceServer
import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle
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
    public var sessionConfiguration: SessionConfiguration
    /// Around every consumer of this application's workers, the first outermost.
    public var middleware: [ConsumerMiddleware] = []
    /// Called when a worker is ready and around each consumer.
    public var hooks = WorkerHooks()
    /// The application's own background services (a job queue, a poller, a cache warmer), made
    /// by `runserver` (with workers) and `runworker`, run in the command's service group: started
    /// with it, told of its graceful shutdown, and awaited before the process exits.
    public var services: @Sendable () -> [any Service] = { [] }

    /// Creates an application from its routing and settings; `main()` then runs the subcommand
    /// given on the command line.
    public init(
        name: String, users: (any UserProvider)? = nil, sessionConfiguration: SessionConfiguration = .init(),
        routing: @escaping @Sendable () throws -> [RoutingEntry]
    ) {
        self.name = name
        self.routing = routing
        self.users = users
        self.sessionConfiguration = sessionConfiguration
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
            LogOutput.flush()  // the lines before the failure, before its message
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
    #if Redis
        static let commands: [any ParsableCommand.Type] = [RunServer.self, RunWorker.self, RunDelay.self, Stats.self]
    #else
        // The delay server keeps its schedule in Redis.
        static let commands: [any ParsableCommand.Type] = [RunServer.self, RunWorker.self, Stats.self]
    #endif

    static let configuration = CommandConfiguration(
        commandName: "app",
        abstract: "A Channels application: interface server, workers and operations.",
        subcommands: ApplicationCommand.commands
    )
}

/// Options every command shares.
struct LayerOptions: ParsableArguments {
    @Option(
        name: .long,
        help: """
            Channel layer: redis://, rediss:// (TLS), unix:// or redis+sentinel:// URLs, comma-separated for shards. \
            None = in-memory. Default: $CHANNEL_LAYER, or the file named by $CHANNEL_LAYER_FILE.
            """)
    var layer: String?

    @Option(name: .long, help: "Read the layer URL from this file (keeps its password off the command line).")
    var layerFile: String?

    @Option(name: .long, help: "Session store: redis://host:port/db or memory. Default: the layer's first Redis server, or memory.")
    var sessionStore: String?

    @Option(
        name: .long,
        help: """
            File holding the deployment's secret (channel-session keys, CSRF tokens). Default: $CHANNELS_SECRET_KEY, \
            the file named by $CHANNELS_SECRET_KEY_FILE, or one generated and kept in the layer's Redis.
            """)
    var secretKeyFile: String?

    @Flag(name: .shortAndLong, help: "Log debug messages.")
    var verbose = false

    @Option(name: .long, help: "Seconds ordered messages wait for a missing earlier one (lost with a killed worker) before skipping it.")
    var orderingGapTimeout = 10.0

    @Option(name: .long, help: "Log lines as text or json (one object per line). Default: $LOG_FORMAT or text.")
    var logFormat: String?

    func validate() throws {
        guard orderingGapTimeout.isFinite, orderingGapTimeout > 0 else {
            throw ValidationError("--ordering-gap-timeout must be a number of seconds > 0")
        }
    }

    /// The layer URL and where it came from (for the start-up line), or nil for the embedded layer.
    func layerURL() throws -> (url: String, source: String)? {
        let environment = ProcessInfo.processInfo.environment
        if let layer, !layer.isEmpty { return (layer, "--layer") }
        if let layerFile { return (try Secrets.read(file: layerFile, what: "--layer-file"), "--layer-file") }
        if let url = environment["CHANNEL_LAYER"], !url.isEmpty { return (url, "CHANNEL_LAYER") }
        if let file = environment["CHANNEL_LAYER_FILE"], !file.isEmpty {
            return (try Secrets.read(file: file, what: "CHANNEL_LAYER_FILE"), "CHANNEL_LAYER_FILE")
        }
        return nil
    }

    /// The layer as a start-up line shows it: the URL without its secrets, and its source.
    func layerDescription() -> String {
        guard let found = try? layerURL() else { return "in-memory" }
        if found.url == "memory" || found.url == "memory://" { return "in-memory (from \(found.source))" }
        return "\(Redaction.redact(found.url)) (from \(found.source))"
    }

    /// Sessions and users for the consumers, with the deployment's secret and the layer's encryption.
    func makeEnvironment(backend: Backend, app: ChannelsApplication, logger: Logger) async throws -> ConsumerEnvironment {
        let url = sessionStore ?? ProcessInfo.processInfo.environment["SESSION_STORE"]
        let store: any SessionStore
        if let url, !url.isEmpty, url != "memory", url != "memory://" {
            #if Redis
                store = try redisSessionStore(url: url, prefix: backend.prefix + "session:")
            #else
                throw ValidationError("--session-store \(Redaction.redact(url)): \(Self.noRedis)")
            #endif
        } else if url == nil || url == "", let companions = backend.companions {
            store = companions.sessionStore()
        } else {
            store = InMemorySessionStore()
        }
        var settings = app.sessionConfiguration
        settings.secret = try await deploymentSecret(backend: backend, logger: logger)
        if settings.cipher == nil { settings.cipher = backend.companions?.cipher }
        let limiter: any RateLimiter = backend.companions?.rateLimiter() ?? InMemoryRateLimiter()
        let environment = ProcessInfo.processInfo.environment
        func pem(_ variable: String) throws -> String? {
            try environment[variable].flatMap { $0.isEmpty ? nil : try Secrets.read(file: $0, what: variable) }
        }
        let tokens: TokenAuthenticator
        do {
            tokens = try await TokenAuthenticator(
                hmacSecret: settings.secret.mac("jwt-hs256", ""),
                rsaPublicKeyPEM: try pem("CHANNELS_JWT_RSA_PUBLIC_KEY_FILE"),
                ecdsaPublicKeyPEM: try pem("CHANNELS_JWT_ECDSA_PUBLIC_KEY_FILE"),
                audience: environment["CHANNELS_JWT_AUDIENCE"].flatMap { $0.isEmpty ? nil : $0 },
                issuer: environment["CHANNELS_JWT_ISSUER"].flatMap { $0.isEmpty ? nil : $0 })
        } catch let error as ValidationError {
            throw error
        } catch {
            throw ValidationError("a JWT public key file is not a PEM public key: \(error)")
        }
        return ConsumerEnvironment(
            sessionStore: store, sessionConfiguration: settings, users: app.users,
            orderingGapTimeout: Duration(secondsValue: orderingGapTimeout), rateLimiter: limiter, tokens: tokens)
    }

    /// The deployment's secret: configured (`--secret-key-file`, `CHANNELS_SECRET_KEY`,
    /// `CHANNELS_SECRET_KEY_FILE`), else random for the embedded layer, else one generated once
    /// and kept in the layer's Redis (`<prefix>secret`) so every process of the deployment shares it.
    func deploymentSecret(backend: Backend, logger: Logger) async throws -> DeploymentSecret {
        let environment = ProcessInfo.processInfo.environment
        if let secretKeyFile { return DeploymentSecret(Array(try Secrets.read(file: secretKeyFile, what: "--secret-key-file").utf8)) }
        if let secret = environment["CHANNELS_SECRET_KEY"], !secret.isEmpty { return DeploymentSecret(Array(secret.utf8)) }
        if let file = environment["CHANNELS_SECRET_KEY_FILE"], !file.isEmpty {
            return DeploymentSecret(Array(try Secrets.read(file: file, what: "CHANNELS_SECRET_KEY_FILE").utf8))
        }
        guard let companions = backend.companions else { return .random() }
        return try await companions.generatedSecret(logger: logger)
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
        let backend = try chooseBackend(logger: logger, allowMemory: allowMemory)
        // `Channel`, `Group` and `Presence` outside consumers (background services, hooks) use it.
        ChannelLayers.default = backend.layer
        return backend
    }

    private func chooseBackend(logger: Logger, allowMemory: Bool) throws -> Backend {
        guard let (url, _) = try layerURL() else {
            guard allowMemory else {
                throw ValidationError(
                    "this command needs a shared layer: --layer redis://host:port/0 (the in-memory layer lives in one process)")
            }
            return Backend(layer: MeteredChannelLayer(InMemoryChannelLayer()), companions: nil)
        }
        if url == "memory" || url == "memory://" {
            guard allowMemory else { throw ValidationError("the in-memory layer cannot be shared between processes") }
            return Backend(layer: MeteredChannelLayer(InMemoryChannelLayer()), companions: nil)
        }
        #if Redis
            return try makeRedisBackend(url: url, logger: logger)
        #else
            throw ValidationError("--layer \(Redaction.redact(url)): \(Self.noRedis)")
        #endif
    }

    /// What a build without the `Redis` trait says when asked for Redis.
    static let noRedis = "this application was built without the package's Redis trait: only the in-memory layer (memory://) is available"
}

/// Secrets read from files (Docker and Kubernetes secrets), so they stay off command lines.
enum Secrets {
    /// The file's text without its trailing newline; a clear error when it cannot be read or is empty.
    static func read(file: String, what: String) throws -> String {
        guard let data = FileManager.default.contents(atPath: file) else {
            throw ValidationError("\(what): cannot read '\(file)'")
        }
        let text = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard !text.isEmpty else { throw ValidationError("\(what): '\(file)' is empty") }
        return text
    }
}

/// The layer a command runs on and where the stores that go with it live.
struct Backend: Sendable {
    let layer: any ChannelLayer
    /// The stores that go with a shared layer; nil on the embedded layer, whose sessions and
    /// limits live in this process.
    let companions: (any LayerCompanions)?

    /// The layer lives in this process (nothing else can serve it).
    var isEmbedded: Bool { companions == nil }
    /// The layer's key prefix, under which what goes with it is kept ("asgi:" when embedded).
    var prefix: String { companions?.prefix ?? "asgi:" }
}

/// What a shared layer brings along: where sessions, rate limits and the deployment's generated
/// secret live, and the keys that seal them.
protocol LayerCompanions: Sendable {
    /// The layer's key prefix.
    var prefix: String { get }
    /// Where they live, for logs (no passwords).
    var location: String { get }
    /// The layer's encryption, applied to sessions too.
    var cipher: (any SessionCipher)? { get }
    func sessionStore() -> any SessionStore
    func rateLimiter() -> any RateLimiter
    /// The secret every process of the deployment shares when none is configured.
    func generatedSecret(logger: Logger) async throws -> DeploymentSecret
}

extension Duration {
    init(secondsValue: Double) {
        self = .nanoseconds(Int64((secondsValue * 1e9).rounded()))
    }
}
