import ASGI
import ArgumentParser
import Channels
import Foundation
import InterfaceServer
import Logging
import NIOCore
import ServiceLifecycle
import Synchronization

struct RunServer: ApplicationSubcommand {
    static let configuration = CommandConfiguration(
        commandName: "runserver",
        abstract: "Serve HTTP and WebSocket, with workers in this process unless --noworker."
    )

    @OptionGroup var options: LayerOptions
    @OptionGroup var metrics: MetricsOptions
    @Option(name: .long, help: "Address to bind.") var bind = "127.0.0.1"
    @Option(name: .long, help: "Port to listen on.") var port = 8000
    @Option(name: .long, help: "Listen on a Unix socket instead.") var unixSocket: String?
    @Option(
        name: .long,
        help:
            "The Unix socket's permission bits, in octal (666, as Daphne: a proxy running as another user can connect; 660 or 600 narrow it)."
    )
    var unixSocketMode = "666"
    @Flag(name: .long, help: "Serve the protocol only; workers run elsewhere (runworker).") var noworker = false
    @Option(
        name: [.customLong("concurrency"), .customLong("threads")],
        help: "In-process consumers that may run at once (async tasks; --threads is Channels 1.x's name for it).")
    var concurrency = 32
    @Option(
        name: .long,
        help: "Seconds an in-process consumer may run before it is cancelled and counted (0: no limit; streamed responses are exempt).")
    var consumerTimeout = 60.0
    @Option(name: .long, help: "Seconds to wait for an HTTP response to start before 503 (a started response, e.g. a stream, is not cut).")
    var httpTimeout = 60.0
    @Option(name: .long, help: "Seconds a client has to send a complete request head (408 and close past it).") var headerTimeout = 10.0
    @Option(name: .long, help: "Longest pause in seconds between parts of a request body (408 and close past it).") var bodyTimeout = 30.0
    @Option(name: .long, help: "Bytes a second a request body must average after its first --body-timeout (408 below it; 0: none).")
    var minBodyRate = 240
    @Option(name: .long, help: "Seconds a kept-alive connection may wait idle for its next request.") var keepAliveTimeout = 20.0
    @Option(name: .long, help: "Client connections open at once; past it new ones get 503 and are closed.") var maxConnections = 10_000
    @Option(name: .long, help: "Client connections open at once from one address (default: no cap; leave off behind a proxy).")
    var maxConnectionsPerAddress: Int?
    @Option(name: .long, help: "Bytes of response that may wait for an HTTP client that does not read before it is closed.")
    var maxResponseBuffer = 16 * 1024 * 1024
    @Option(name: .long, help: "Seconds response bytes may wait for a client that reads none of them before it is closed.")
    var writeTimeout = 30.0
    @Option(name: .long, help: "TLS certificate chain (PEM): serve https:// and wss:// (HTTP/2 through ALPN). SIGHUP reloads it.")
    var tlsCert: String?
    @Option(name: .long, help: "TLS private key (PEM) for --tls-cert.") var tlsKey: String?
    @Flag(name: .long, help: "Do not offer HTTP/2 over TLS (HTTP/1.1 only).") var noHttp2 = false
    @Flag(
        name: .long,
        help: "Write group messages' frames through each socket's channel only, never with the server's own send(2).")
    var noDirectWrites = false
    @Flag(
        name: .long,
        help: "Upgrade every WebSocket through NIO's HTTP/1 pipeline, never the server's own handshake handler.")
    var noFastUpgrade = false
    @Option(name: .long, help: "Concurrent HTTP/2 streams per connection.") var http2MaxStreams = 100
    @Option(
        name: .long, help: "Frames a second one WebSocket may send (bursts of a tenth of it); past it reading from it pauses. 0: no limit.")
    var maxFramesPerSecond = 1000
    @Option(name: .long, help: "Seconds to wait for a WebSocket accept.") var websocketConnectTimeout = 5.0
    @Option(name: .long, help: "Maximum WebSocket life in seconds.") var websocketTimeout: Double?
    @Option(name: .long, help: "Seconds between server pings.") var pingInterval = 20.0
    @Option(name: .long, help: "Seconds without a pong before closing (not counted while reading is paused for an unavailable layer).")
    var pingTimeout = 30.0
    @Option(
        name: .long,
        help: "Seconds a socket's presence lasts unless its server renews it (every third): a dead server's sockets leave within 4/3 of it."
    )
    var presenceTTL = 15.0
    @Option(
        name: .long,
        help: "Seconds a server gathers its sockets' presence changes before it tells a group (one diff per group per moment).")
    var presenceWindow = 0.25
    @Option(
        name: .long,
        help:
            "Seconds between checks that the groups this server's sockets follow still exist in the layer (a group set evicted under maxmemory is put back with its followers); 0: no checks."
    )
    var groupCheckInterval = 10.0
    @Option(name: .long, help: "root_path sent to the application.") var rootPath = ""
    @Flag(name: .long, help: "Trust X-Forwarded-For / X-Forwarded-Proto.") var proxyHeaders = false
    @Option(name: .long, help: "WebSocket subprotocol to offer.") var wsProtocol: [String] = []
    @Option(name: .long, help: "Access log file (Daphne-style text), or - for standard output. Default: structured lines in the log.")
    var accessLog: String?
    @Option(
        name: .long, parsing: .upToNextOption,
        help: """
            Host names requests may carry (Django's ALLOWED_HOSTS: 'chat.example.com', '.example.com' for a domain and its \
            subdomains, '*' for any); WebSockets from pages of other hosts are refused. Default: $ALLOWED_HOSTS \
            (comma-separated), else the loopback names and the bound address.
            """)
    var allowedHosts: [String] = []
    @Option(
        name: .long, parsing: .upToNextOption,
        help: "Origins allowed to open WebSockets besides the allowed hosts' (exact, like https://partner.example; '*' for any).")
    var allowedOrigins: [String] = []
    @Option(name: .long, help: "Largest request body in bytes (413 past it).") var maxBodySize = 16 * 1024 * 1024
    @Option(name: .long, help: "Largest request head (request line and headers) in bytes (431 past it).") var maxHeaderSize = 64 * 1024
    @Option(name: .long, help: "Seconds a send to a full channel is retried (client reading paused) before 1013 / 503.")
    var channelFullTimeout = 10.0
    @Option(name: .long, help: "Seconds a WebSocket's frames are held while the layer is unreachable before 1011.") var layerOutageTimeout =
        120.0
    @Option(
        name: .long,
        help:
            "Seconds this server may be cut off from the layer before it closes its sockets with 1012 (they may have missed messages; 0: never)."
    ) var cutOffTimeout = 30.0
    @Option(name: .long, help: "Seconds to let responses in flight and consumers in hand finish after SIGTERM.")
    var shutdownTimeout = 30.0
    @Option(name: .long, help: "Bytes that may wait to be written to one WebSocket client before it is closed (1008) as not reading.")
    var maxQueuedBytes = 4 * 1024 * 1024

    @Flag(
        name: .long,
        help: "Serve the live operations page at /admin/ on the metrics port (needs --metrics-port; off loopback it needs --admin-token)."
    )
    var admin = false
    @Option(
        name: .long,
        help:
            "Token the operations page asks for (?token= or Authorization: Bearer). Default: $CHANNELS_ADMIN_TOKEN or the file $CHANNELS_ADMIN_TOKEN_FILE."
    )
    var adminToken: String?
    @Option(name: .long, help: "Read the operations page's token from this file.") var adminTokenFile: String?

    func validate() throws {
        guard unixSocketMode.allSatisfy({ ("0"..."7").contains($0) }), let mode = UInt16(unixSocketMode, radix: 8), mode <= 0o777
        else {
            throw ValidationError("--unix-socket-mode \(unixSocketMode): permission bits in octal, such as 666, 660 or 600")
        }
        if resolvedAllowedHosts.isEmpty {
            throw ValidationError(
                "--bind \(bind) answers any address: give the host names clients use with --allowed-hosts (or ALLOWED_HOSTS; '*' for any)")
        }
        if let adminTokenFile { _ = try Secrets.read(file: adminTokenFile, what: "--admin-token-file") }
        if let file = ProcessInfo.processInfo.environment["CHANNELS_ADMIN_TOKEN_FILE"], !file.isEmpty, adminToken == nil {
            _ = try Secrets.read(file: file, what: "CHANNELS_ADMIN_TOKEN_FILE")
        }
        guard admin else { return }
        guard metrics.metricsPort != nil else { throw ValidationError("--admin serves on the metrics port: give --metrics-port PORT") }
        let loopback = ["127.0.0.1", "::1", "localhost"].contains(metrics.metricsBind) || metrics.metricsBind.hasPrefix("127.")
        if !loopback && resolvedAdminToken == nil {
            throw ValidationError("--admin on \(metrics.metricsBind) (not loopback) needs --admin-token or CHANNELS_ADMIN_TOKEN")
        }
    }

    private var resolvedAdminToken: String? {
        let environment = ProcessInfo.processInfo.environment
        if let adminToken, !adminToken.isEmpty { return adminToken }
        if let adminTokenFile { return try? Secrets.read(file: adminTokenFile, what: "--admin-token-file") }
        if let token = environment["CHANNELS_ADMIN_TOKEN"], !token.isEmpty { return token }
        if let file = environment["CHANNELS_ADMIN_TOKEN_FILE"], !file.isEmpty {
            return try? Secrets.read(file: file, what: "CHANNELS_ADMIN_TOKEN_FILE")
        }
        return nil
    }

    /// `--allowed-hosts`, else `ALLOWED_HOSTS`, else the loopback names (and the bound address
    /// when it is one address); empty for a wildcard bind without either, which is refused.
    var resolvedAllowedHosts: [String] {
        if !allowedHosts.isEmpty { return allowedHosts }
        if let hosts = ProcessInfo.processInfo.environment["ALLOWED_HOSTS"], !hosts.isEmpty {
            return hosts.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        }
        if ["0.0.0.0", "::", "[::]", ""].contains(bind) { return unixSocket != nil ? AllowedHosts.loopbackNames : [] }
        return AllowedHosts.loopbackNames + (AllowedHosts.loopbackNames.contains(bind) ? [] : [bind])
    }

    /// The server's configuration from the options (the secret, and the connection cap as the
    /// process's file limit allows it, are filled in by `run`). Internal for the tests.
    func serverConfiguration() -> ServerConfiguration {
        var configuration = ServerConfiguration(host: bind, port: port)
        configuration.unixSocketPath = unixSocket
        configuration.unixSocketMode = UInt16(unixSocketMode, radix: 8) ?? 0o666
        configuration.httpTimeout = Duration(secondsValue: httpTimeout)
        configuration.websocketConnectTimeout = Duration(secondsValue: websocketConnectTimeout)
        configuration.websocketTimeout = websocketTimeout.map { Duration(secondsValue: $0) }
        configuration.pingInterval = pingInterval > 0 ? Duration(secondsValue: pingInterval) : nil
        configuration.pingTimeout = Duration(secondsValue: pingTimeout)
        configuration.presenceTTL = Duration(secondsValue: max(0.3, presenceTTL))
        configuration.presenceWindow = Duration(secondsValue: min(10, max(0, presenceWindow)))
        configuration.groupCheckInterval = groupCheckInterval <= 0 ? .zero : Duration(secondsValue: max(0.2, groupCheckInterval))
        configuration.rootPath = rootPath
        configuration.proxyHeaders = proxyHeaders
        configuration.websocketProtocols = wsProtocol
        configuration.allowedHosts = resolvedAllowedHosts
        configuration.allowedOrigins = allowedOrigins
        configuration.maxBodySize = maxBodySize
        configuration.maxHeaderSize = maxHeaderSize
        configuration.channelFullTimeout = Duration(secondsValue: channelFullTimeout)
        configuration.layerOutageTimeout = Duration(secondsValue: layerOutageTimeout)
        configuration.cutOffTimeout = cutOffTimeout > 0 ? Duration(secondsValue: cutOffTimeout) : nil
        configuration.shutdownGrace = Duration(secondsValue: shutdownTimeout)
        configuration.maxQueuedBytesPerSocket = maxQueuedBytes
        configuration.headerTimeout = Duration(secondsValue: headerTimeout)
        configuration.bodyTimeout = Duration(secondsValue: bodyTimeout)
        configuration.minBodyRate = max(0, minBodyRate)
        configuration.keepAliveTimeout = Duration(secondsValue: keepAliveTimeout)
        configuration.maxConnections = maxConnections
        configuration.maxConnectionsPerAddress = maxConnectionsPerAddress
        configuration.maxResponseBufferBytes = maxResponseBuffer
        configuration.writeTimeout = Duration(secondsValue: writeTimeout)
        configuration.tlsCertificatePath = tlsCert
        configuration.tlsKeyPath = tlsKey
        configuration.http2 = !noHttp2
        configuration.directWrites = !noDirectWrites
        configuration.fastWebSocketUpgrade = !noFastUpgrade
        configuration.http2MaxConcurrentStreams = http2MaxStreams
        configuration.maxFramesPerSecond = maxFramesPerSecond
        return configuration
    }

    func run(_ app: ChannelsApplication) async throws {
        await ShutdownSignals.trap()
        let logger = options.makeLogger("channels.runserver")
        let metricsEndpoint = try await metrics.start(logger: logger)
        let backend = try options.makeBackend(logger: logger, allowMemory: true)
        let layer = backend.layer
        let router = try Router(app.routing())
        // One secret for the server's log tags and the in-process workers' sessions.
        let environment = try await options.makeEnvironment(backend: backend, app: app, logger: logger)
        var configuration = serverConfiguration()
        configuration.secret = environment.sessionConfiguration.secret
        configuration.maxConnections = try ProcessLimits.raiseOpenFiles(toServe: maxConnections, logger: logger)
        let server: InterfaceServer
        do {
            server = try InterfaceServer(layer: layer, configuration: configuration, logger: logger, accessLogPath: accessLog)
        } catch {
            throw ValidationError("\(error)")
        }
        try await server.bind()
        // SIGHUP (a log rotation's `postrotate`, `systemctl reload`): the access log's file is
        // opened again, and the certificate and key read again (new connections get them, open
        // ones keep theirs). The process goes on serving either way.
        ProcessLimits.onHangup {
            var reloaded = false
            if let tls = server.tls {
                reloaded = true
                do {
                    try tls.reload()
                    logger.info("TLS certificate reloaded", metadata: ["certificate": "\(tls.certificatePath)"])
                } catch {
                    logger.error("TLS certificate reload failed; serving the previous one", metadata: ["error": "\(error)"])
                }
            }
            do {
                if try server.reopenAccessLog() {
                    reloaded = true
                    logger.info("access log reopened", metadata: ["path": "\(accessLog ?? "")"])
                }
            } catch {
                reloaded = true
                logger.error("access log reopen failed; writing to the previous file", metadata: ["error": "\(error)"])
            }
            if !reloaded { logger.info("SIGHUP: nothing to reload (no TLS certificate, no access log file); serving on") }
        }
        let worker =
            noworker
            ? nil
            : Worker(
                router: router, layer: layer, concurrency: concurrency,
                environment: environment, finishQueuedOnShutdown: true,
                consumerTimeout: consumerTimeout > 0 ? Duration(secondsValue: consumerTimeout) : nil,
                middleware: app.middleware, hooks: app.hooks, logger: options.makeLogger("channels.worker"))
        // On the in-memory layer nothing else could run a delay server: run one here.
        let delay =
            !noworker && backend.isEmbedded
            ? DelayServer(layer: layer, store: InMemoryDelayStore(), logger: options.makeLogger("channels.delay")) : nil
        let address = server.localAddress.map { "\($0)" } ?? bind
        say(
            "\(app.name): serving on \(server.tls == nil ? "http" : "https")://\(bind):\(server.localAddress?.port ?? port)/ (\(noworker ? "no workers" : "\(concurrency) consumers at once in process"), layer: \(options.layerDescription()))  [\(address)]"
        )
        metricsEndpoint?.setReadiness { await MetricsEndpoint.layerAnswers(layer) }
        // Stopped in reverse: the server first (its responses in flight and its sockets'
        // disconnects reach the layer), then the workers take what is queued, then the delay server.
        var services: [any Service] = []
        if let delay { services.append(delay) }
        if let worker {
            services.append(worker)
            services += app.services()
        }
        if admin, let metricsEndpoint {
            let routed = router.channels.union([ASGIChannel.httpRequest] + ASGIChannel.websocket)
            let page = AdminPage(layer: layer, routed: routed, tallies: metricsEndpoint.tallies, token: resolvedAdminToken)
            metricsEndpoint.setAdmin(page)
            services.append(AdminSampler(page: page))
            say("operations page: http://\(metrics.metricsBind):\(metricsEndpoint.port)/admin/")
        }
        services.append(server)
        await runServices(services, metrics: metricsEndpoint, grace: Duration(secondsValue: shutdownTimeout), logger: logger)
        await layer.close()
    }
}
