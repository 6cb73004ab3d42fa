import ASGI
import CHiredis
import CoreMetrics
import DequeModule
import NIOCore
import NIOPosix
import NIOSSL

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
    let endpoint: RedisEndpoint
    private let channel: any Channel
    private let commandTimeout: Duration
    private let metrics: RedisMetrics

    private init(endpoint: RedisEndpoint, channel: any Channel, commandTimeout: Duration, metrics: RedisMetrics) {
        self.endpoint = endpoint
        self.channel = channel
        self.commandTimeout = commandTimeout
        self.metrics = metrics
    }

    var isActive: Bool { channel.isActive }
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
        do {
            var bootstrap = ClientBootstrap(group: eventLoop)
                .connectTimeout(TimeAmount(endpoint.connectTimeout ?? connectTimeout))
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        if let tls {
                            try channel.pipeline.syncOperations.addHandler(
                                NIOSSLClientHandler(context: tls, serverHostname: Self.serverName(for: endpoint)))
                        }
                        try channel.pipeline.syncOperations.addHandler(RedisProtocolHandler(endpoint: endpoint))
                    }
                }
            switch endpoint.address {
            case .tcp(let host, let port):
                bootstrap = bootstrap.channelOption(.socketOption(.tcp_nodelay), value: 1)
                    .channelOption(.socketOption(.so_keepalive), value: endpoint.keepalive ? 1 : 0)
                if endpoint.keepalive, let idle = endpoint.keepaliveIdle {
                    bootstrap = bootstrap.channelOption(
                        ChannelOptions.Types.SocketOption(level: .tcp, name: NIOBSDSocket.Option(rawValue: TCP_KEEPIDLE)),
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
        let connection = RedisConnection(
            endpoint: endpoint, channel: channel, commandTimeout: endpoint.commandTimeout ?? commandTimeout,
            metrics: metrics ?? RedisMetrics(endpoint: endpoint))
        var setup: [[[UInt8]]] = []
        // As redis-py: AUTH only with a password; a user name alone sends nothing.
        if let password = endpoint.password {
            var args: [[UInt8]] = [Array("AUTH".utf8)]
            if let user = endpoint.username { args.append(Array(user.utf8)) }
            args.append(Array(password.utf8))
            setup.append(args)
        }
        if endpoint.database != 0 { setup.append([Array("SELECT".utf8), Array(String(endpoint.database).utf8)]) }
        // Over TLS, one round trip now, so a failed handshake is reported by connect.
        if setup.isEmpty, tls != nil { setup.append([Array("PING".utf8)]) }
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
            if let bad = replies.first(where: { $0.errorMessage != nil }), let message = bad.errorMessage {
                connection.close()
                if setup[0][0] == Array("AUTH".utf8), replies[0].errorMessage != nil {
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
    func pipeline(_ commands: [[[UInt8]]], wait: Duration = .zero) async throws(ChannelLayerError) -> [RedisReply] {
        guard !commands.isEmpty else { return [] }
        return try await send(RedisCommandEncoding.encode(commands), commands: commands.count, wait: wait)
    }

    func command(_ args: [[UInt8]], wait: Duration = .zero) async throws(ChannelLayerError) -> RedisReply {
        try await send(RedisCommandEncoding.encode([args]), commands: 1, wait: wait)[0]
    }

    func command(_ args: [RedisArgument], wait: Duration = .zero) async throws(ChannelLayerError) -> RedisReply {
        try await send(RedisCommandEncoding.encode(args), commands: 1, wait: wait)[0]
    }

    func command(_ args: [String]) async throws(ChannelLayerError) -> RedisReply {
        try await command(args.map { Array($0.utf8) })
    }

    /// Writes `encoded` (`commands` commands, already in RESP) and returns their replies in order.
    func send(_ encoded: ByteBuffer, commands: Int, wait: Duration = .zero) async throws(ChannelLayerError) -> [RedisReply] {
        let promise = channel.eventLoop.makePromise(of: [RedisReply].self)
        let request = RedisRequest(bytes: encoded, commands: commands, promise: promise, timeout: commandTimeout + wait)
        // A write that fails before the handler has taken the request (the channel closed and
        // its pipeline is gone) must fail the caller too, or it would wait forever. Failing a
        // promise the handler already completed does nothing.
        let written = channel.eventLoop.makePromise(of: Void.self)
        written.futureResult.whenFailure { error in
            promise.fail(ChannelLayerError(.connectionLost, "Redis at \(self.endpoint): write failed: \(error)"))
        }
        let started = wait == .zero ? ContinuousClock.now : nil
        channel.writeAndFlush(request, promise: written)
        do {
            let replies = try await promise.futureResult.get()
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

struct RedisRequest {
    /// The commands, encoded.
    let bytes: ByteBuffer
    let commands: Int
    let promise: EventLoopPromise<[RedisReply]>
    let timeout: Duration
}

/// Encodes requests as RESP, feeds what comes back to a hiredis reader and completes the
/// waiting requests in order. The bookkeeping (who waits, the reply timer, failure) is
/// ``RedisConnectionStateMachine``; this handler only does the I/O it asks for.
final class RedisProtocolHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = RedisRequest
    typealias OutboundOut = ByteBuffer

    private var reader: UnsafeMutablePointer<redisReader>?
    private var machine: RedisConnectionStateMachine<EventLoopPromise<[RedisReply]>>
    private var timer: Scheduled<Void>?
    private var flushScheduled = false

    init(endpoint: RedisEndpoint) {
        self.reader = redisReaderCreate()
        self.machine = RedisConnectionStateMachine(endpoint: endpoint, now: .now())
    }

    deinit {
        if let reader { redisReaderFree(reader) }
    }

    func handlerAdded(context: ChannelHandlerContext) {
        machine.bytesRead(now: context.eventLoop.now)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let request = unwrapOutboundIn(data)
        let action = machine.write(
            commands: request.commands, waiter: request.promise, timeout: TimeAmount(request.timeout),
            now: context.eventLoop.now)
        switch action {
        case .fail(let error):
            request.promise.fail(error)
            promise?.fail(error)
        case .write(let armTimer):
            if let armTimer { arm(context: context, at: armTimer) }
            context.write(wrapOutboundOut(request.bytes), promise: promise)
        }
    }

    /// Flushes once per event-loop tick: the writes of every caller that ran in this tick
    /// leave in one system call.
    func flush(context: ChannelHandlerContext) {
        guard !flushScheduled else { return }
        flushScheduled = true
        context.eventLoop.assumeIsolatedUnsafeUnchecked().execute {
            self.flushScheduled = false
            context.flush()
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let reader else { return }
        machine.bytesRead(now: context.eventLoop.now)
        let buffer = unwrapInboundIn(data)
        let fed = buffer.withUnsafeReadableBytes { bytes in
            redisReaderFeed(reader, bytes.baseAddress?.assumingMemoryBound(to: CChar.self), bytes.count)
        }
        guard fed == REDIS_OK else { return perform(machine.fail("unreadable reply"), context: context) }
        while true {
            var raw: UnsafeMutableRawPointer? = nil
            guard redisReaderGetReply(reader, &raw) == REDIS_OK else {
                return perform(machine.fail("protocol error"), context: context)
            }
            guard let raw else { break }
            let reply = RedisReply(raw.assumingMemoryBound(to: redisReply.self))
            freeReplyObject(raw)
            let action = machine.replyReceived(reply)
            perform(action, context: context)
            switch action {
            case .failConnection, .succeedThenRetire: return
            case .none, .succeed: continue
            }
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        perform(machine.closed(), context: context, close: false)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        perform(machine.fail("\(error)"), context: context)
    }

    private func perform(
        _ action: RedisConnectionStateMachine<EventLoopPromise<[RedisReply]>>.ReplyAction,
        context: ChannelHandlerContext, close: Bool = true
    ) {
        switch action {
        case .none:
            break
        case .succeed(let promise, let replies):
            promise.succeed(replies)
        case .succeedThenRetire(let promise, let replies, let error, let waiters):
            promise.succeed(replies)
            perform(.failConnection(error, waiters), context: context, close: close)
        case .failConnection(let error, let waiters):
            timer?.cancel()
            timer = nil
            for promise in waiters { promise.fail(error) }
            if close { context.close(promise: nil) }
        }
    }

    private func arm(context: ChannelHandlerContext, at deadline: NIODeadline) {
        timer = context.eventLoop.assumeIsolatedUnsafeUnchecked().scheduleTask(deadline: deadline) {
            self.timer = nil
            switch self.machine.timerFired(now: context.eventLoop.now) {
            case .none:
                break
            case .rearm(let next):
                self.arm(context: context, at: next)
            case .failConnection(let error, let waiters):
                self.perform(.failConnection(error, waiters), context: context)
            }
        }
    }
}
