import ASGI
import CHiredis
import CoreMetrics
import DequeModule
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// One non-blocking connection to Redis on a SwiftNIO event loop; replies are parsed by
/// hiredis's protocol reader.
///
/// Any number of callers may use it at once: each call writes its commands and waits for
/// its replies, which Redis answers in order. Writes made in the same event-loop tick go out
/// in one `write(2)` and the replies of many callers come back in one read, so concurrent
/// callers pipeline automatically without waiting on each other. A connection that fails or
/// times out is closed and fails every call still waiting; the owner opens a new one.
final class RedisConnection: Sendable {
    /// The TCP option for the idle time before keepalive probes: `TCP_KEEPIDLE` on Linux,
    /// `TCP_KEEPALIVE` on Darwin.
    static var keepaliveIdleOption: Int32 {
        #if canImport(Darwin)
            TCP_KEEPALIVE
        #else
            TCP_KEEPIDLE
        #endif
    }

    let endpoint: RedisEndpoint
    private let channel: any Channel
    /// Requests go to the handler directly (on its event loop), not through the pipeline: no
    /// promise, no future, no boxing per command.
    private let handler: NIOLoopBound<RedisProtocolHandler>
    private let commandTimeout: Duration
    private let metrics: RedisMetrics
    /// The server's id for this connection: 0 not asked yet, -1 refused (see ``clientID()``).
    private let knownClientID = Atomic<Int>(0)

    private init(
        endpoint: RedisEndpoint, channel: any Channel, handler: NIOLoopBound<RedisProtocolHandler>, commandTimeout: Duration,
        metrics: RedisMetrics
    ) {
        self.endpoint = endpoint
        self.channel = channel
        self.handler = handler
        self.commandTimeout = commandTimeout
        self.metrics = metrics
    }

    var isActive: Bool { channel.isActive }

    /// The server's `CLIENT ID` for this connection (asked once, then remembered), which
    /// another connection can name in `CLIENT UNBLOCK`; nil when the server refuses `CLIENT`
    /// (an ACL without it, a proxy that does not pass it).
    func clientID() async throws(ChannelLayerError) -> Int? {
        let known = knownClientID.load(ordering: .relaxed)
        if known != 0 { return known > 0 ? known : nil }
        let reply = try await command([RedisArgument.text("CLIENT"), .text("ID")])
        guard let id = reply.integer, id > 0 else {
            knownClientID.store(-1, ordering: .relaxed)
            return nil
        }
        knownClientID.store(Int(id), ordering: .relaxed)
        return Int(id)
    }
    /// Completes once the connection has closed.
    var closeFuture: EventLoopFuture<Void> { channel.closeFuture }
    var eventLoop: any EventLoop { channel.eventLoop }

    /// Connects (over TLS when `tls` is given), authenticates and selects the database.
    /// `endpoint` must be a TCP or Unix-socket endpoint (Sentinel ones are resolved first).
    /// Every failure names the endpoint; TLS failures surface here, not at the first command.
    static func connect(
        to endpoint: RedisEndpoint, on eventLoop: any EventLoop, connectTimeout: Duration,
        commandTimeout: Duration, tls: NIOSSLContext? = nil, metrics: RedisMetrics? = nil
    ) async throws(ChannelLayerError) -> RedisConnection {
        let channel: any Channel
        let added = NIOLockedValueBox<NIOLoopBound<RedisProtocolHandler>?>(nil)
        do {
            var bootstrap = ClientBootstrap(group: eventLoop)
                .connectTimeout(TimeAmount(endpoint.connectTimeout ?? connectTimeout))
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        if let tls {
                            try channel.pipeline.syncOperations.addHandler(
                                NIOSSLClientHandler(context: tls, serverHostname: Self.serverName(for: endpoint)))
                        }
                        let handler = RedisProtocolHandler(endpoint: endpoint)
                        try channel.pipeline.syncOperations.addHandler(handler)
                        added.withLockedValue { $0 = NIOLoopBound(handler, eventLoop: channel.eventLoop) }
                    }
                }
            switch endpoint.address {
            case .tcp(let host, let port):
                // At the TCP level (`.socketOption(.tcp_nodelay)` would set `SO_DEBUG`).
                bootstrap = bootstrap.channelOption(.tcpOption(.tcp_nodelay), value: 1)
                    .channelOption(.socketOption(.so_keepalive), value: endpoint.keepalive ? 1 : 0)
                if endpoint.keepalive, let idle = endpoint.keepaliveIdle {
                    bootstrap = bootstrap.channelOption(
                        ChannelOptions.Types.SocketOption(level: .tcp, name: NIOBSDSocket.Option(rawValue: Self.keepaliveIdleOption)),
                        value: SocketOptionValue(idle))
                }
                channel = try await bootstrap.connect(host: host, port: port).get()
            case .unixSocket(let path):
                channel = try await bootstrap.connect(unixDomainSocketPath: path).get()
            case .sentinel:
                throw ChannelLayerError(.invalidConfiguration, "\(endpoint) must be resolved through its sentinels first")
            }
        } catch let error as ChannelLayerError {
            throw error
        } catch {
            throw ChannelLayerError(.connectionLost, "cannot connect to \(endpoint): \(error)", underlying: error)
        }
        guard let handler = added.withLockedValue({ $0 }) else {
            channel.close(promise: nil)
            throw ChannelLayerError(.connectionLost, "connection to \(endpoint) has no Redis handler")
        }
        let connection = RedisConnection(
            endpoint: endpoint, channel: channel, handler: handler, commandTimeout: endpoint.commandTimeout ?? commandTimeout,
            metrics: metrics ?? RedisMetrics(endpoint: endpoint))
        var setup: [[RedisArgument]] = []
        // As redis-py: AUTH only with a password; a user name alone sends nothing.
        if let password = endpoint.password {
            var args: [RedisArgument] = ["AUTH"]
            if let user = endpoint.username { args.append(.text(user)) }
            args.append(.text(password))
            setup.append(args)
        }
        if endpoint.database != 0 { setup.append(["SELECT", .integer(endpoint.database)]) }
        // Always one round trip before any command: over TLS a failed handshake is reported by
        // connect, and a connection is known to reach a Redis before a command is written on it
        // (an overdue reply is waited for only from a Redis that answered: see
        // `RedisConnectionStateMachine.timerFired`; a connection opened while Redis is stopped
        // fails holding only this PING, never a command that would run later).
        // Any reply to that PING will do (an ACL that does not grant it, a Redis still loading
        // its data): it came from a Redis; the commands' own replies say the rest.
        let pingOnly = setup.isEmpty
        if setup.isEmpty { setup.append(["PING"]) }
        if !setup.isEmpty {
            let replies: [RedisReply]
            do {
                replies = try await connection.pipeline(setup)
            } catch {
                connection.close()
                if tls != nil {
                    throw ChannelLayerError(
                        .connectionLost,
                        "TLS connection to \(endpoint) failed (is it a TLS port, and is its certificate trusted?): \(error.message)",
                        underlying: error)
                }
                throw error
            }
            if !pingOnly || tls != nil, let bad = replies.first(where: { $0.errorMessage != nil }), let message = bad.errorMessage {
                connection.close()
                if setup[0][0] == "AUTH", replies[0].errorMessage != nil {
                    let who = endpoint.username.map { "user '\($0)'" } ?? "the default user"
                    throw ChannelLayerError(.invalidConfiguration, "Redis at \(endpoint) refused AUTH for \(who): \(message)")
                }
                throw ChannelLayerError(.backendError, "Redis at \(endpoint) refused the connection set-up: \(message)")
            }
        }
        return connection
    }

    /// The name sent as SNI and checked against the certificate: `ssl_server_name`, else the
    /// host when it is a name; nil for an address (NIOSSL then checks the peer's IP address).
    static func serverName(for endpoint: RedisEndpoint) -> String? {
        if let name = endpoint.tls?.serverName { return name }
        guard case .tcp(let host, _) = endpoint.address else { return nil }
        let isAddress = host.contains(":") || host.allSatisfy { $0.isNumber || $0 == "." }
        return isAddress ? nil : host
    }

    /// Sends the commands and returns their replies in order. `wait` extends the reply
    /// timeout for blocking commands (BLPOP) by their own duration.
    func pipeline(_ commands: [[RedisArgument]], wait: Duration = .zero) async throws(ChannelLayerError) -> [RedisReply] {
        guard !commands.isEmpty else { return [] }
        return try await send(RedisCommandEncoding.encode(commands), commands: commands.count, wait: wait)
    }

    func command(_ args: [RedisArgument], wait: Duration = .zero) async throws(ChannelLayerError) -> RedisReply {
        try await send(RedisCommandEncoding.encode(args), commands: 1, wait: wait)[0]
    }

    /// Writes `encoded` (`commands` commands, already in RESP) and returns their replies in order.
    func send(_ encoded: ByteBuffer, commands: Int, wait: Duration = .zero) async throws(ChannelLayerError) -> [RedisReply] {
        let started = wait == .zero ? ContinuousClock.now : nil
        let timeout = commandTimeout + wait
        do {
            let replies = try await withUnsafeThrowingContinuation { (continuation: UnsafeContinuation<[RedisReply], any Error>) in
                let request = RedisRequest(bytes: encoded, commands: commands, waiter: .continuation(continuation), timeout: timeout)
                if handler.eventLoop.inEventLoop {
                    handler.value.enqueue(request)
                } else {
                    handler.eventLoop.execute { self.handler.value.enqueue(request) }
                }
            }
            if let started { metrics.roundTrip.recordNanoseconds((ContinuousClock.now - started).nanoseconds) }
            return replies
        } catch let error as ChannelLayerError {
            metrics.failedRequests.increment()
            throw error
        } catch {
            metrics.failedRequests.increment()
            throw ChannelLayerError(.connectionLost, "Redis at \(endpoint): \(error)")
        }
    }

    func close() {
        channel.close(promise: nil)
    }
}
