import Logging
import NIOCore
import NIOSSL
import NIOTLS
import Synchronization

/// What one HTTP/1.1 connection's first handler and its HTTP handler share, on its event loop.
final class ConnectionActivity {
    /// The HTTP handler waits for a request: the next bytes start its header deadline.
    var watching = false
    /// Called once per wait, on the loop, when bytes arrive while `watching`.
    var onBytes: (() -> Void)?
    private let upgrade: UpgradeState
    /// A WebSocket upgrade is with the application: reading is paused and what the client
    /// still sends is bounded.
    var upgradeHeld: Bool {
        get { upgrade.held }
        set { upgrade.held = newValue }
    }

    /// The HTTP parser stopped at the request in progress (an upgrade that was not taken, a
    /// `CONNECT`): it reads nothing after it, so what the client sends from here is bounded,
    /// and the connection closes after the response.
    var parserStopped = false

    init(upgrade: UpgradeState) { self.upgrade = upgrade }

    /// Writes bytes straight to the socket (under the HTTP codec) and closes: set by the
    /// first handler. For answers to a request whose head never arrived, which the HTTP
    /// pipeline has no request to attach to.
    var answerRawAndClose: (([UInt8]) -> Void)?

    /// Adds `count` bytes to `total`; past `maxBytesWhileUpgrading`, counts and logs it (the
    /// connection is to close) and returns true.
    static func overBound(_ total: inout Int, _ count: Int, _ when: String, server: ServerContext) -> Bool {
        total += count
        guard total > server.configuration.maxBytesWhileUpgrading else { return false }
        server.counters.count(.closedUpgradeOverflow)
        server.logger.info("client sent too much \(when); closing", metadata: ["bytes": "\(total)"])
        return true
    }

    /// A 408 for a head that did not finish in time.
    static let requestTimeout = Array(
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 18\r\nconnection: close\r\n\r\nRequest timed out\n"
            .utf8)
}

/// The first handler of an HTTP/1.1 connection (before the HTTP decoder): reports the first
/// bytes of each request to the HTTP handler (a head that starts and never ends is then timed
/// out) and bounds the bytes a client sends while its WebSocket upgrade is held.
final class ConnectionActivityHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private let activity: ConnectionActivity
    private let server: ServerContext
    private var bytesWhileHeld = 0
    private var bytesAfterStop = 0

    init(activity: ConnectionActivity, server: ServerContext) {
        self.activity = activity
        self.server = server
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        activity.answerRawAndClose = { bytes in
            let context = bound.value
            let channel = context.channel
            context.writeAndFlush(NIOAny(context.channel.allocator.buffer(bytes: bytes))).whenComplete { _ in
                channel.close(promise: nil)
            }
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        activity.answerRawAndClose = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if activity.watching {
            activity.watching = false
            activity.onBytes?()
        }
        let count = unwrapInboundIn(data).readableBytes
        if activity.parserStopped, overBound(&bytesAfterStop, count, "after a request the HTTP parser stops at (an upgrade not taken)") {
            context.close(promise: nil)
            return
        }
        if activity.upgradeHeld, overBound(&bytesWhileHeld, count, "while its WebSocket upgrade was held") {
            context.close(promise: nil)
            return
        }
        context.fireChannelRead(data)
    }

    private func overBound(_ total: inout Int, _ count: Int, _ when: String) -> Bool {
        ConnectionActivity.overBound(&total, count, when, server: server)
    }
}

/// Counts the open client connections, in all and per client address, and admits a new one
/// only under `--max-connections` (and the per-address cap when set).
final class ConnectionAdmission: Sendable {
    enum Verdict: Equatable {
        case admitted
        case overTotal
        case overPerAddress
    }

    private let maxTotal: Int
    private let maxPerAddress: Int?
    private let state = Mutex<(total: Int, perAddress: [String: Int])>((0, [:]))

    init(maxTotal: Int, maxPerAddress: Int?) {
        self.maxTotal = maxTotal
        self.maxPerAddress = maxPerAddress
    }

    /// Admits (and counts) a connection from `address`, or says which limit refuses it.
    func admit(address: String?) -> Verdict {
        state.withLock { state in
            if state.total >= maxTotal { return .overTotal }
            if let maxPerAddress, let address {
                let current = state.perAddress[address, default: 0]
                if current >= maxPerAddress { return .overPerAddress }
                state.perAddress[address] = current + 1
            }
            state.total += 1
            return .admitted
        }
    }

    /// An admitted connection closed.
    func release(address: String?) {
        state.withLock { state in
            state.total -= 1
            if maxPerAddress != nil, let address {
                let left = state.perAddress[address, default: 1] - 1
                state.perAddress[address] = left > 0 ? left : nil
            }
        }
    }

    var open: Int { state.withLock { $0.total } }
}

/// Answers a connection over a limit at once, without reading its request: a fixed 503 with
/// `Connection: close`, then close. Existing connections are not touched.
final class RefusalHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    static let response = Array(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 30\r\nretry-after: 1\r\nconnection: close\r\n\r\nToo many connections, retry.\r\n"
            .utf8)

    func channelActive(context: ChannelHandlerContext) {
        let buffer = context.channel.allocator.buffer(bytes: Self.response)
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(buffer)).whenComplete { _ in channel.close(promise: nil) }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}
}

/// What the streams of one HTTP/2 connection have waiting to be written: a client that reads
/// none of them is bounded per connection, not per stream. Lives on the connection's loop.
final class ResponseBudget {
    var unwritten = 0
    /// The connection is being closed as a client that does not read.
    var closing = false
}

/// A handler whose work starts once its channel is active: at once when it is added to an
/// active channel, otherwise at `channelActive` (which it passes on).
protocol StartsWhenActive: ChannelInboundHandler {
    func channelStarted(context: ChannelHandlerContext)
}

extension StartsWhenActive {
    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { channelStarted(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        channelStarted(context: context)
        context.fireChannelActive()
    }
}

/// The first handler of a TLS connection: the handshake must complete within `timeout` (the
/// header timeout), or the connection is closed; after it, the HTTP/1.1 or HTTP/2 handlers
/// keep their own deadlines.
final class HandshakeDeadlineHandler: StartsWhenActive, RemovableChannelHandler {
    typealias InboundIn = NIOAny

    private let timeout: TimeAmount
    private let server: ServerContext
    private var deadline: Scheduled<Void>?

    init(timeout: TimeAmount, server: ServerContext) {
        self.timeout = timeout
        self.server = server
    }

    func channelStarted(context: ChannelHandlerContext) {
        guard deadline == nil else { return }
        let channel = context.channel
        let server = self.server
        deadline = context.eventLoop.scheduleTask(in: timeout) {
            server.counters.count(.timedOutHeader)
            channel.close(promise: nil)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // Passed on first: the ALPN handler after this one configures the protocol on it.
        context.fireUserInboundEventTriggered(event)
        if case TLSUserEvent.handshakeCompleted = event {
            deadline?.cancel()
            deadline = nil
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        deadline?.cancel()
        deadline = nil
        context.fireChannelInactive()
    }
}
