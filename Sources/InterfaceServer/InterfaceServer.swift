import ASGI
import Logging
import NIOCore
import NIOHTTP1
import NIOHTTP2
import NIOPosix
import NIOSSL
import NIOWebSocket
import ServiceLifecycle
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// The interface server (the Daphne role): speaks HTTP/1.1, HTTP/2 and WebSocket to clients and
/// ASGI 1.0 messages to the channel layer. It runs no application code.
///
/// A swift-service-lifecycle `Service`: `run()` serves until the service group's graceful
/// shutdown (or ``shutdown()``), in one task group that holds the reply reader and, spread over
/// 64 task groups of its own, one task per client connection, which owns that connection
/// (cancelling the task closes it). Outside a
/// service group, ``start()`` runs it in a task of its own and ``shutdown()`` stops it.
public final class InterfaceServer: Service, Sendable {
    /// The settings it runs with.
    public let configuration: ServerConfiguration
    private let context: ServerContext
    private let group: any EventLoopGroup
    /// The listening socket, once bound: its connections arrive as a stream `run()` serves.
    private let listener = Mutex<NIOAsyncChannel<AcceptedConnection, Never>?>(nil)
    private let listening = Mutex<(any Channel)?>(nil)
    /// `run()` when `start()` began it.
    private let started = Mutex<Task<Void, Never>?>(nil)
    private let admission: ConnectionAdmission
    /// The certificate and key `https://` and `wss://` are served with; nil without TLS.
    public let tls: TLSCertificateStore?

    /// A server speaking to `layer`; `start()` binds and begins serving. Throws a
    /// `TLSConfigurationError` for a certificate or key it cannot use, an ``AccessLogError`` for an
    /// access log file it cannot append to.
    public init(
        layer: any ChannelLayer, configuration: ServerConfiguration = .init(),
        logger: Logger = Logger(label: "channels.server"), accessLogPath: String? = nil,
        eventLoopGroup: (any EventLoopGroup)? = nil
    ) throws {
        // Frames and body chunks the layer would refuse are refused at the door instead (1009,
        // chunks that fit): a client never has a frame dropped behind an open socket.
        let configuration = configuration.fitted(toLayerLimit: layer.maxMessageSize)
        if configuration.maxWebSocketMessageSize < configuration.requested.maxWebSocketMessageSize
            || configuration.bodyChunkSize < configuration.requested.bodyChunkSize
        {
            logger.notice(
                "the channel layer's message limit is below the frame and chunk sizes; they follow it",
                metadata: [
                    "layer_limit": "\(layer.maxMessageSize)", "max_websocket_message": "\(configuration.maxWebSocketMessageSize)",
                    "body_chunk": "\(configuration.bodyChunkSize)",
                ])
        }
        self.configuration = configuration
        self.admission = ConnectionAdmission(
            maxTotal: configuration.maxConnections, maxPerAddress: configuration.maxConnectionsPerAddress)
        if let certificate = configuration.tlsCertificatePath {
            guard let key = configuration.tlsKeyPath else { throw TLSConfigurationError(.missingKey, path: certificate) }
            self.tls = try TLSCertificateStore(certificatePath: certificate, keyPath: key, http2: configuration.http2)
        } else if let key = configuration.tlsKeyPath {
            throw TLSConfigurationError(.missingCertificate, path: key)
        } else {
            self.tls = nil
        }
        let group = eventLoopGroup ?? MultiThreadedEventLoopGroup.singleton
        let router = ReplyRouter(
            layer: layer, prefix: configuration.replyChannelPrefix, logger: logger,
            registrationInterval: configuration.readerRegistrationInterval, cutOffBound: configuration.cutOffTimeout,
            readLoop: group.next())
        let context = ServerContext(
            layer: layer, router: router, configuration: configuration, logger: logger,
            accessLog: try AccessLog(path: accessLogPath, logger: logger))
        router.whenCutOff { [weak context] _ in
            guard let context else { return }
            context.counters.count(.closedLayerUnavailable, by: context.openSocketCount)
            context.closeAllSockets(code: 1012)
        }
        router.whenStoreLost { [weak context] in
            guard let context else { return }
            context.counters.count(.closedStoreLost, by: context.openSocketCount)
            context.closeAllSockets(code: 1012)
        }
        self.context = context
        // The group belongs to the caller (it is not shut down here); NIO's shared group by default: the Redis layer's connections live there too, so a
        // frame, its send to Redis and the reply can all be handled on one thread.
        self.group = group
    }

    /// The sockets with a tail check due, on the event loops' tail wheels (for tests).
    func socketsOnTailWheels() async -> Int { await context.socketsOnTailWheels() }

    /// What the server counted: held and retried sends, what it gave up on and why.
    public var statistics: ServerStatistics { context.counters.snapshot(unroutable: context.router.unroutableCount) }

    /// WebSockets open now.
    public var openWebSockets: Int { context.openSocketCount }

    /// The process channel every reply of this server goes through.
    public var processChannel: String { context.router.processChannel }

    /// The address the server listens on, once bound.
    public var localAddress: SocketAddress? { listening.withLock { $0?.localAddress } }

    /// Binds the listening socket (once; later calls do nothing). Connections are accepted and
    /// set up from then on, and served once `run()` takes them.
    public func bind() async throws {
        if listening.withLock({ $0 }) != nil { return }
        let context = self.context
        let configuration = self.configuration
        let admission = self.admission
        let tls = self.tls
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            // At the TCP level: `.socketOption(.tcp_nodelay)` is SOL_SOCKET's option 1, `SO_DEBUG`.
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelOption(.maxMessagesPerRead, value: 16)
        let initialize: @Sendable (any Channel) -> EventLoopFuture<AcceptedConnection> = { channel in
            let senders = ConnectionSenders(loop: channel.eventLoop)
            channel.closeFuture.whenComplete { _ in senders.finish() }
            return Self.initialize(
                channel, context: context, configuration: configuration, admission: admission, tls: tls, senders: senders
            )
            .map { AcceptedConnection(channel: channel, senders: senders) }
        }
        let listener: NIOAsyncChannel<AcceptedConnection, Never>
        if let path = configuration.unixSocketPath {
            // A socket file left by a server that ended is replaced; one a running server listens
            // on is not (the second server had unlinked it, and the first, still running, could
            // no longer be reached).
            if Self.someoneListens(onUnixSocket: path) {
                throw ListenError(address: path, reason: "another server listens on it (stop it first, or give another path)")
            }
            // Made with no access for others (owner read and write), and widened to its mode
            // below: made with the umask's mode, it could be reached in between by those the
            // mode is meant to keep out.
            let umaskBefore = umask(0o177)
            defer { umask(umaskBefore) }
            do {
                listener = try await bootstrap.bind(
                    unixDomainSocketPath: path, cleanupExistingSocketFile: true, childChannelInitializer: initialize)
            } catch {
                // NIO's error names the call, not the file (a stale socket another user left, a
                // folder this user cannot write).
                throw ListenError(address: path, reason: "\(error)")
            }
            if let reason = Self.setMode(configuration.unixSocketMode, ofSocketAt: path) {
                try? await listener.channel.close()
                throw ListenError(address: path, reason: reason)
            }
        } else {
            listener = try await bootstrap.bind(
                host: configuration.host, port: configuration.port, childChannelInitializer: initialize)
        }
        self.listener.withLock { $0 = listener }
        listening.withLock { $0 = listener.channel }
        context.logger.info(
            "interface server listening",
            metadata: [
                "address": "\(listener.channel.localAddress.map { "\($0)" } ?? "?")",
                "reply_channel": "\(context.router.processChannel)",
            ])
    }

    /// Serves until the graceful shutdown of the service group it runs in (or ``shutdown()``),
    /// then stops as ``shutdown()`` says; cancelled (the group's grace is over), it closes every
    /// connection at once.
    public func run() async throws {
        try await bind()
        guard
            let listener = listener.withLock({ state in
                defer { state = nil }; return state
            })
        else { return }
        let context = self.context
        await withDiscardingTaskGroup { group in
            group.addTask { await context.router.run() }
            group.addTask { await PresenceKeeper(server: context).run() }
            group.addTask { await GroupKeeper(server: context).run() }
            group.addTask { await StreamLeaseKeeper(server: context).run() }
            // Connections' tasks go to lanes, each a task group of its own: a task group's child
            // that ends is unlinked by a walk of the group's children (the Swift runtime keeps
            // them in a singly linked list), so in one group of N connections every close cost
            // O(N), and a reconnect storm O(N²) (20,000 connections closed in random order:
            // 1.85 s in the unlinking alone, against 0.11 s in opening order).
            let lanes = (0..<Self.connectionLanes).map { _ in AsyncStream.makeStream(of: AcceptedConnection.self) }
            for lane in lanes {
                group.addTask {
                    await withDiscardingTaskGroup { connections in
                        for await connection in lane.stream {
                            connections.addTask { await Self.own(connection) }
                        }
                    }
                }
            }
            await withGracefulShutdownHandler {
                do {
                    try await listener.executeThenClose { connections in
                        var next = 0
                        for try await connection in connections {
                            // A lane ends early only when the server is cancelled: the
                            // connection it can no longer take is closed, not left open unserved.
                            if case .terminated = lanes[next].continuation.yield(connection) {
                                connection.channel.close(promise: nil)
                            }
                            next = (next + 1) % lanes.count
                        }
                    }
                } catch {
                    context.logger.error("the listening socket failed", metadata: ["error": "\(error)"])
                }
            } onGracefulShutdown: {
                self.stopAccepting()
            }
            for lane in lanes { lane.continuation.finish() }
            await finishWorkInHand()
            // What is left (connections, the reply reader) ends now.
            group.cancelAll()
        }
        await context.accessLog?.flush()
        context.logger.info("interface server stopped")
    }

    /// Whether a server accepts connections on the Unix socket at `path` now (a connection
    /// attempt that does not wait: one refused, or no socket there, is a no).
    static func someoneListens(onUnixSocket path: String) -> Bool {
        var address = sockaddr_un()
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return false }
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (index, byte) in bytes.enumerated() { raw[index] = byte }
        }
        #if os(Linux)
            let descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        #else
            let descriptor = socket(AF_UNIX, SOCK_STREAM, 0)
        #endif
        guard descriptor >= 0 else { return false }
        defer { close(descriptor) }
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        // EAGAIN: it listens, its backlog full.
        return result == 0 || errno == EAGAIN || errno == EINPROGRESS
    }

    /// Sets the permission bits of the socket file this server just bound at `path`; nil when
    /// done, else why not. Only that socket's: the path must still be a socket owned by this
    /// user, and a symbolic link is never followed (someone who can write the folder may have
    /// swapped the file since the bind; as root, a chmod through a link would open any file).
    static func setMode(_ mode: UInt16, ofSocketAt path: String) -> String? {
        var info = stat()
        guard lstat(path, &info) == 0 else { return "it vanished after the bind: \(String(cString: strerror(errno)))" }
        guard info.st_mode & S_IFMT == S_IFSOCK, info.st_uid == geteuid() else {
            return "it is no longer the socket this server made (replaced after the bind); its mode was not set"
        }
        guard fchmodat(AT_FDCWD, path, mode_t(mode), AT_SYMLINK_NOFOLLOW) == 0 else {
            return "cannot set its mode to \(String(mode, radix: 8)): \(String(cString: strerror(errno)))"
        }
        return nil
    }

    /// Opens the access log's file again, after a log rotation moved it (`runserver` does this
    /// on SIGHUP): lines go to the new file from then on. False when the access log goes to no
    /// file; throws ``AccessLogError`` when the file cannot be opened (lines keep going to the
    /// previous one).
    public func reopenAccessLog() throws(AccessLogError) -> Bool {
        try context.accessLog?.reopen() ?? false
    }

    /// Task groups the connections' tasks are spread over (see ``run()``).
    static let connectionLanes = 256

    /// One connection's task: runs its senders' loops until the connection has closed and
    /// they sent what they held; cancelled, closes the connection and stops them.
    private static func own(_ connection: AcceptedConnection) async {
        await withTaskCancellationHandler {
            await connection.senders.run()
        } onCancel: {
            connection.channel.close(promise: nil)
        }
    }

    /// Stops accepting (the connection stream ends; `run()` goes on to finish what is in hand).
    private func stopAccepting() {
        context.shuttingDown.store(true, ordering: .relaxed)
        listening.withLock { $0 }?.close(promise: nil)
    }

    /// Closes WebSockets with 1001 (telling the application) and waits, up to `shutdownGrace`,
    /// for HTTP responses in flight and every message already taken to reach the layer.
    private func finishWorkInHand() async {
        context.shuttingDown.store(true, ordering: .relaxed)
        context.closeAllSockets(code: 1001)
        guard !Task.isCancelled else { return }
        let drained = await context.router.workInHand.drained(within: configuration.shutdownGrace, on: group.next())
        if !drained {
            context.logger.warning(
                "shutdown grace over with work in hand",
                metadata: ["in_hand": "\(context.router.workInHand.current)", "grace_s": "\(configuration.shutdownGrace)"])
        }
    }

    /// Binds and serves in a task of its own; returns once listening. For use outside a service
    /// group (tests, an application that runs the server itself); ``shutdown()`` stops it.
    public func start() async throws {
        try await bind()
        let task = Task { _ = try? await self.run() }
        started.withLock { $0 = task }
    }

    /// Stops accepting, closes WebSockets with 1001 (telling the application), lets HTTP
    /// responses in flight finish and every message already taken reach the layer, for up to
    /// `shutdownGrace` (woken when the last one is done), then closes what is left; returns
    /// when `run()` has.
    public func shutdown() async {
        stopAccepting()
        await started.withLock { $0 }?.value
    }

    /// What happens to each accepted connection: a fast refusal over a cap, otherwise TLS (and
    /// ALPN) when configured, then HTTP/1.1 or HTTP/2.
    private static func initialize(
        _ channel: any Channel, context: ServerContext, configuration: ServerConfiguration,
        admission: ConnectionAdmission, tls: TLSCertificateStore?, senders: ConnectionSenders
    ) -> EventLoopFuture<Void> {
        // Over a cap, a fast refusal; the connections already open are not touched.
        let address = channel.remoteAddress?.ipAddress
        switch admission.admit(address: address) {
        case .admitted:
            break
        case let refusal:
            context.counters.count(refusal == .overTotal ? .refusedMaxConnections : .refusedPerAddress)
            return channel.eventLoop.makeCompletedFuture {
                if tls == nil {
                    try channel.pipeline.syncOperations.addHandler(RefusalHandler())
                } else {
                    channel.close(promise: nil)
                }
            }
        }
        channel.closeFuture.whenComplete { _ in admission.release(address: address) }
        guard let tls else {
            return configure(channel: channel, context: context, configuration: configuration, senders: senders)
        }
        return channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls.context))
            // The handshake must be done within the header timeout (after the TLS
            // handler: it sees the handshake's completion event).
            try channel.pipeline.syncOperations.addHandler(
                HandshakeDeadlineHandler(timeout: TimeAmount(configuration.headerTimeout), server: context))
        }.flatMap {
            guard configuration.http2 else {
                return configure(channel: channel, context: context, configuration: configuration, senders: senders)
            }
            return channel.configureHTTP2SecureUpgrade(
                h2ChannelConfigurator: { channel in
                    configureHTTP2(channel: channel, context: context, configuration: configuration, senders: senders)
                },
                http1ChannelConfigurator: { channel in
                    configure(channel: channel, context: context, configuration: configuration, senders: senders)
                })
        }
    }

    /// Sets up an HTTP/2 connection (negotiated through ALPN): each stream gets the HTTP/1
    /// translation and its own ``HTTPHandler``, so a stream is one ASGI request with
    /// `http_version` "2". Concurrent streams and header lists are bounded in the settings
    /// we announce; resets and errors are rate-limited (a rapid-reset flood, CVE-2023-44487,
    /// closes the connection).
    static func configureHTTP2(
        channel: any Channel, context: ServerContext, configuration: ServerConfiguration, senders: ConnectionSenders? = nil
    ) -> EventLoopFuture<Void> {
        channel.eventLoop.makeCompletedFuture {
            var connection = NIOHTTP2Handler.ConnectionConfiguration()
            connection.initialSettings = [
                HTTP2Setting(parameter: .maxConcurrentStreams, value: configuration.http2MaxConcurrentStreams),
                HTTP2Setting(parameter: .maxHeaderListSize, value: configuration.maxHeaderSize),
                HTTP2Setting(parameter: .initialWindowSize, value: 1 << 20),
            ]
            var stream = NIOHTTP2Handler.StreamConfiguration()
            stream.targetWindowSize = 1 << 20
            stream.streamResetFrameRateLimit.maximumCount = configuration.http2MaxResetsPerWindow
            stream.streamResetFrameRateLimit.windowLength = .seconds(10)
            // Idle connections (no open stream) close after the keep-alive timeout, including one
            // that never sends its preface; a graceful close gets 5 s for its streams to end.
            let manager = NIOHTTP2ServerConnectionManagementHandler(
                eventLoop: channel.eventLoop,
                configuration: .init(
                    maxIdleTime: TimeAmount(configuration.keepAliveTimeout), maxAge: nil, maxGraceTime: .seconds(5),
                    keepalive: nil))
            let budget = NIOLoopBound(ResponseBudget(), eventLoop: channel.eventLoop)
            let handler = NIOHTTP2Handler(
                mode: .server, eventLoop: channel.eventLoop, connectionConfiguration: connection,
                streamConfiguration: stream, streamDelegate: manager.http2StreamDelegate
            ) { stream in
                stream.eventLoop.makeCompletedFuture {
                    let sync = stream.pipeline.syncOperations
                    try sync.addHandler(HTTP2FramePayloadToHTTP1ServerCodec())
                    try sync.addHandler(
                        HTTPHandler(
                            server: context, upgrade: UpgradeState(), activity: nil, budget: budget.value, senders: senders))
                }
            }
            try channel.pipeline.syncOperations.addHandler(handler)
            try channel.pipeline.syncOperations.addHandler(manager)
        }
    }

    /// Sets up one client connection's pipeline: the fast WebSocket upgrade for its first
    /// request (see ``WebSocketFastUpgradeHandler``), which hands anything else to HTTP/1.1 with
    /// the WebSocket upgrade and the ASGI handlers. Internal so tests can run it on a testing channel.
    static func configure(
        channel: any Channel, context: ServerContext, configuration: ServerConfiguration, senders: ConnectionSenders? = nil
    ) -> EventLoopFuture<Void> {
        channel.eventLoop.makeCompletedFuture {
            let sync = channel.pipeline.syncOperations
            if configuration.fastWebSocketUpgrade {
                try sync.addHandler(WebSocketFastUpgradeHandler(server: context, configuration: configuration, senders: senders))
            } else {
                try addHTTP1Handlers(
                    sync, context: context, configuration: configuration, senders: senders, upgrade: UpgradeState(),
                    firstUpgradeRefused: false, openedAt: nil)
            }
        }
    }

    /// The HTTP/1.1 pipeline with the WebSocket upgrade, then the ASGI handlers, added at the
    /// end of the pipeline. `firstUpgradeRefused`: the connection's first request is a
    /// handshake the application already refused (through the fast path), which its upgrader
    /// declines without asking again; `openedAt`: when the connection opened, where its first
    /// header deadline runs from.
    static func addHTTP1Handlers(
        _ sync: ChannelPipeline.SynchronousOperations, context: ServerContext, configuration: ServerConfiguration,
        senders: ConnectionSenders?, upgrade: UpgradeState, firstUpgradeRefused: Bool, openedAt: NIODeadline?
    ) throws {
        let activity = ConnectionActivity(upgrade: upgrade)
        let loop = sync.eventLoop
        let boundActivity = NIOLoopBound(activity, eventLoop: loop)
        let boundUpgrade = NIOLoopBound(upgrade, eventLoop: loop)
        let sessionBox = NIOLoopBoundBox<WebSocketSession?>(nil, eventLoop: loop)
        let refusedBox = NIOLoopBoundBox(firstUpgradeRefused, eventLoop: loop)
        let upgrader = NIOWebSocketServerUpgrader(
            maxFrameSize: configuration.maxWebSocketMessageSize,
            // Our frame handler answers decoder errors itself, so the application is told
            // the close code it sent.
            automaticErrorHandling: false,
            shouldUpgrade: { channel, head in
                let promise = channel.eventLoop.makePromise(of: HTTPHeaders?.self)
                if refusedBox.value {
                    // Refused already (the upgrade state says how): answered by the HTTP handler.
                    refusedBox.value = false
                    promise.succeed(nil)
                    return promise.futureResult
                }
                if context.shuttingDown.load(ordering: .relaxed) {
                    promise.succeed(nil)
                    boundUpgrade.value.rejected = true
                    return promise.futureResult
                }
                // The parser must see the upgrade too, or what follows the head would reach
                // the frame decoder as parsed HTTP and crash the process. A handshake is a GET
                // without a body (RFC 6455): one that announces a body would wait for it with
                // reading paused, and no deadline, for ever.
                guard head.method == .GET, WebSocketUpgradeHead.parserSeesUpgrade(head),
                    head.headers["transfer-encoding"].isEmpty, head.headers["content-length"].allSatisfy({ $0 == "0" })
                else {
                    context.logger.info(
                        "WebSocket handshake refused: not a GET without a body whose Connection names upgrade",
                        metadata: [
                            "method": "\(head.method)",
                            "connection": "\(head.headers["connection"].joined(separator: ", ").prefix(200))",
                        ])
                    boundUpgrade.value.rejected = true
                    boundUpgrade.value.rejectionStatus = .badRequest
                    promise.succeed(nil)
                    return promise.futureResult
                }
                // The application has the handshake: read nothing more meanwhile (what was already
                // read is bounded by `maxBytesWhileUpgrading`).
                boundActivity.value.upgradeHeld = true
                _ = channel.setOption(ChannelOptions.autoRead, value: false)
                let session = WebSocketSession(
                    server: context, channel: channel, head: head,
                    upgrade: boundUpgrade.value, promise: promise, senders: senders)
                sessionBox.value = session
                session.start(head: head)
                return promise.futureResult
            },
            upgradePipelineHandler: { channel, _ in
                boundActivity.value.upgradeHeld = false
                _ = channel.setOption(ChannelOptions.autoRead, value: true)
                guard let session = sessionBox.value else { return channel.close() }
                return channel.eventLoop.makeCompletedFuture {
                    try addWebSocketHandlers(channel.pipeline.syncOperations, session: session, configuration: configuration)
                }
            })
        try sync.addHandler(ConnectionActivityHandler(activity: activity, server: context), name: "asgi-activity")
        try sync.configureHTTPServerPipeline(
            withPipeliningAssistance: true,
            withServerUpgrade: (
                upgraders: [upgrader],
                completionHandler: { upgraded in
                    // The WebSocket handlers take over; the HTTP side must not see frames.
                    upgraded.pipeline.removeHandler(name: "asgi-http", promise: nil)
                    upgraded.pipeline.removeHandler(name: "asgi-activity", promise: nil)
                }
            ),
            withErrorHandling: true)
        try sync.addHandler(
            HTTPHandler(server: context, upgrade: upgrade, activity: activity, senders: senders, openedAt: openedAt), name: "asgi-http")
    }

    /// What a socket's frames go through once the upgrade is done (behind NIO's frame encoder
    /// and decoder): whole messages from fragments, then the session's frame handler.
    static func addWebSocketHandlers(
        _ sync: ChannelPipeline.SynchronousOperations, session: WebSocketSession, configuration: ServerConfiguration
    ) throws {
        try sync.addHandler(
            NIOWebSocketFrameAggregator(
                minNonFinalFragmentSize: 0, maxAccumulatedFrameCount: 1024,
                maxAccumulatedFrameSize: configuration.maxWebSocketMessageSize))
        try sync.addHandler(WebSocketFrameHandler(session: session))
    }
}

/// An accepted connection and the loops that send its messages to the layer (run by its task).
struct AcceptedConnection: Sendable {
    let channel: any Channel
    let senders: ConnectionSenders
}

/// The server could not listen where it was told to.
public struct ListenError: Error, CustomStringConvertible {
    /// The Unix socket's path (or the host and port).
    public let address: String
    /// What went wrong.
    public let reason: String

    /// What went wrong, with the address.
    public var description: String { "cannot listen on \(address): \(reason)" }
}
