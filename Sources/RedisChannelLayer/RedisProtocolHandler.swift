import ASGI
import CHiredis
import NIOCore

#if canImport(Glibc)
    import Glibc
#endif

/// Commands on their way to Redis, and who waits for their replies.
struct RedisRequest {
    /// The commands, encoded.
    let bytes: ByteBuffer
    let commands: Int
    let waiter: RedisWaiter
    let timeout: Duration
}

/// Who a request's replies go to: a suspended task (``RedisConnection``), or a promise (a
/// caller on the event loop, and the handler's tests).
enum RedisWaiter {
    case continuation(UnsafeContinuation<[RedisReply], any Error>)
    case promise(EventLoopPromise<[RedisReply]>)

    func succeed(_ replies: [RedisReply]) {
        switch self {
        case .continuation(let continuation): continuation.resume(returning: replies)
        case .promise(let promise): promise.succeed(replies)
        }
    }

    func fail(_ error: ChannelLayerError) {
        switch self {
        case .continuation(let continuation): continuation.resume(throwing: error)
        case .promise(let promise): promise.fail(error)
        }
    }
}

/// Encodes requests as RESP, feeds what comes back to a hiredis reader and completes the
/// waiting requests in order. The bookkeeping (who waits, the reply timer, failure) is
/// ``RedisConnectionStateMachine``; this handler only does the I/O it asks for.
final class RedisProtocolHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = RedisRequest
    typealias OutboundOut = ByteBuffer

    private var reader: UnsafeMutablePointer<redisReader>?
    private var machine: RedisConnectionStateMachine<RedisWaiter>
    private var timer: Scheduled<Void>?
    private var flushScheduled = false
    /// Set while the handler is in the pipeline: requests that ``enqueue(_:)`` takes are
    /// written through it.
    private var context: ChannelHandlerContext?
    /// The end-of-tick flush, made once (scheduling it allocates nothing); it holds the
    /// handler, so it is dropped when the handler leaves the pipeline.
    private var flushAtEndOfTick: (() -> Void)?

    init(endpoint: RedisEndpoint) {
        self.reader = redisReaderCreate()
        self.machine = RedisConnectionStateMachine(endpoint: endpoint, now: .now())
    }

    deinit {
        if let reader { redisReaderFree(reader) }
    }

    func handlerAdded(context: ChannelHandlerContext) {
        machine.bytesRead(now: context.eventLoop.now)
        self.context = context
        flushAtEndOfTick = {
            self.flushScheduled = false
            self.context?.flush()
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        flushAtEndOfTick = nil
        // A request taken after this would never be answered: fail what waits, and what comes.
        perform(machine.closed(), context: context, close: false)
    }

    /// Takes a request on the event loop: writes it (flushed at the end of this tick, with
    /// every other request of the tick), or fails it at once if the connection has failed or
    /// closed.
    func enqueue(_ request: RedisRequest) {
        guard let context else {
            request.waiter.fail(machine.failure ?? ChannelLayerError(.connectionLost, "the Redis connection is closed"))
            return
        }
        guard take(request, context: context, promise: nil) else { return }
        scheduleFlush(context: context)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        take(unwrapOutboundIn(data), context: context, promise: promise)
    }

    /// Hands the request to the state machine and writes it; false if it was failed instead.
    @discardableResult
    private func take(_ request: RedisRequest, context: ChannelHandlerContext, promise: EventLoopPromise<Void>?) -> Bool {
        let action = machine.write(
            commands: request.commands, waiter: request.waiter, timeout: TimeAmount(request.timeout),
            now: context.eventLoop.now)
        switch action {
        case .fail(let error):
            request.waiter.fail(error)
            promise?.fail(error)
            return false
        case .write(let armTimer):
            if let armTimer { arm(context: context, at: armTimer) }
            context.write(wrapOutboundOut(request.bytes), promise: promise)
            return true
        }
    }

    /// Flushes once per event-loop tick: the writes of every caller that ran in this tick
    /// leave in one system call.
    func flush(context: ChannelHandlerContext) {
        scheduleFlush(context: context)
    }

    private func scheduleFlush(context: ChannelHandlerContext) {
        guard !flushScheduled, let flushAtEndOfTick else { return }
        flushScheduled = true
        context.eventLoop.assumeIsolatedUnsafeUnchecked().execute(flushAtEndOfTick)
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
        _ action: RedisConnectionStateMachine<RedisWaiter>.ReplyAction,
        context: ChannelHandlerContext, close: Bool = true
    ) {
        switch action {
        case .none:
            break
        case .succeed(let waiter, let replies):
            waiter.succeed(replies)
        case .succeedThenRetire(let waiter, let replies, let error, let waiters):
            waiter.succeed(replies)
            perform(.failConnection(error, waiters), context: context, close: close)
        case .failConnection(let error, let waiters):
            timer?.cancel()
            timer = nil
            for waiter in waiters { waiter.fail(error) }
            if close { context.close(promise: nil) }
        }
    }

    private func arm(context: ChannelHandlerContext, at deadline: NIODeadline) {
        timer = context.eventLoop.assumeIsolatedUnsafeUnchecked().scheduleTask(deadline: deadline) {
            self.timer = nil
            let peer = self.machine.peerProbed ? Self.peerReport(context.channel) : .unknown
            switch self.machine.timerFired(now: context.eventLoop.now, armedFor: deadline, peer: peer) {
            case .none:
                break
            case .rearm(let next):
                self.arm(context: context, at: next)
            case .failConnection(let error, let waiters):
                self.perform(.failConnection(error, waiters), context: context)
            case .probePeer:
                let done = Self.probePeer(context.channel)
                switch self.machine.peerProbeSet(done, now: context.eventLoop.now) {
                case .rearm(let next): self.arm(context: context, at: next)
                case .failConnection(let error, let waiters): self.perform(.failConnection(error, waiters), context: context)
                case .none, .probePeer: break
                }
            }
        }
    }

    /// Sets the socket to probe its peer: a keepalive probe after 1 s of silence, then every
    /// second, the connection closed after 2 unanswered. A Redis host that is there answers
    /// the probes even while its Redis is stopped; one cut off does not, and the kernel closes
    /// the socket. (No `TCP_USER_TIMEOUT`: it also bounds how long a peer may keep its receive
    /// window shut, which a stopped Redis does once its buffer is full.) A Unix socket has no
    /// host to lose: nothing to set. False when the options cannot be set.
    static func probePeer(_ channel: any Channel) -> Bool {
        if case .unixDomainSocket? = channel.remoteAddress { return true }
        #if os(Linux)
            guard let options = channel.syncOptions else { return false }
            func tcp(_ name: Int32) -> ChannelOptions.Types.SocketOption {
                ChannelOptions.Types.SocketOption(level: .tcp, name: NIOBSDSocket.Option(rawValue: name))
            }
            do {
                try options.setOption(.socketOption(.so_keepalive), value: 1)
                try options.setOption(tcp(RedisConnection.keepaliveIdleOption), value: 1)
                try options.setOption(tcp(Int32(TCP_KEEPINTVL)), value: 1)
                try options.setOption(tcp(Int32(TCP_KEEPCNT)), value: 2)
                return true
            } catch {
                return false
            }
        #else
            return false
        #endif
    }

    /// What `TCP_INFO` says of the peer: data unacknowledged for a probe window or more is a
    /// host that is cut off; everything acknowledged (or an acknowledgement within the window)
    /// is a host that is there.
    static func peerReport(_ channel: any Channel) -> RedisConnectionStateMachine<RedisWaiter>.PeerReport {
        #if os(Linux)
            guard let provider = channel as? any SocketOptionProvider else { return .unknown }
            var report = RedisConnectionStateMachine<RedisWaiter>.PeerReport.unknown
            let window = UInt32(RedisConnectionStateMachine<RedisWaiter>.probeWindow.nanoseconds / 1_000_000)
            // On the channel's event loop the option is read at once and the future is done.
            provider.getTCPInfo().assumeIsolated().whenSuccess { info in
                report = info.tcpi_unacked > 0 && info.tcpi_last_ack_recv >= window ? .notAcknowledging : .acknowledging
            }
            return report
        #else
            return .unknown
        #endif
    }
}
