import ASGI
import CoreMetrics
import DequeModule
import Logging
import NIOCore
import NIOHTTP1
import NIOSSL
import NIOWebSocket
import Synchronization

/// One WebSocket, from the held-open upgrade to the disconnect. Lives on its channel's
/// event loop. Replies that arrive before the upgrade completes are kept and written after.
///
/// What happens is decided by a ``WebSocketConnectionStateMachine``; this class does it (timers,
/// writes, the layer, the access log).
final class WebSocketSession: ReplyReceiver, PingedSocket {
    let server: ServerContext
    let replyChannel: String
    let path: String
    let client: String
    let channel: any Channel
    var machine: WebSocketConnectionStateMachine
    /// The held-open handshake, answered by the accept or the refusal.
    private var handshake: EventLoopPromise<HTTPHeaders?>?
    private var pending: [Message] = []
    var context: ChannelHandlerContext?
    /// We sent a close frame: the client's close frame completes the handshake.
    var closeFrameSent: Bool { machine.closeFrameSent }
    private var connectTimeout: Scheduled<Void>?
    var lifetime: Scheduled<Void>?
    /// Where this socket sits on its event loop's ``PingWheel`` (bucket, index), while it does.
    var pingPlace: (bucket: Int, index: Int)?
    /// That wheel, while the socket is on it.
    var pingWheel: PingWheel<WebSocketSession>?
    /// Its place on its event loop's tail-check wheel, while a followed group's check is due.
    var tailPlace: (bucket: Int, index: Int)?
    /// This socket's messages to the layer, in order, held and retried when the layer is full or down.
    let sender: LayerSender
    /// Closed as a client that does not read (once).
    var closedAsSlow = false
    /// While the router hands over a batch: the batch's shared frames; they are written and
    /// flushed once at its end.
    private var batchPayloads: ReplyPayloads?
    /// Frames of the batch written and not flushed yet, and their bytes.
    var flushHeld = false
    var heldBytes = 0
    /// A batch flushes a socket's frames early once they hold this many bytes: the bound of
    /// unwritten bytes then sees them (over TLS too, where bytes reach the channel only when
    /// flushed), and a reading client is never closed for a batch it was not yet offered.
    static let flushWithinBatch = 256 * 1024
    /// The frame encoder's place in the pipeline: frames encoded once per batch are written
    /// there, past the encoder.
    private var encodedFrames: ChannelHandlerContext?
    var encodedFramesContext: ChannelHandlerContext? { encodedFrames }
    /// The socket's descriptor for a batch's direct send (-1: through the channel only; set to
    /// -1 by its ``DirectSocket`` handler when the channel closes), whether a write entered the
    /// channel since it last held nothing (set by that handler), and the batch's frames held for
    /// the send: the first here, any others in `directMore`.
    var directDescriptor: CInt = -1
    var channelEntered = true
    var directFirst: ByteBuffer?
    var directMore: [ByteBuffer] = []
    /// The channel the frames are written to and its allocator, kept at attach: a group
    /// message's hand-over to hundreds of sockets does not walk each pipeline to find them.
    private(set) var frameChannel: (any Channel)?
    private var frameAllocator = ByteBufferAllocator()
    let upgrade: UpgradeState
    /// Followed groups and presence (see `WebSocketSession+Subscriptions.swift`).
    var subscriptions = SessionSubscriptions()

    init(
        server: ServerContext, channel: any Channel, head: HTTPRequestHead, upgrade: UpgradeState,
        promise: EventLoopPromise<HTTPHeaders?>, senders: ConnectionSenders? = nil
    ) {
        self.server = server
        self.channel = channel
        self.upgrade = upgrade
        self.replyChannel = server.router.newReplyChannel()
        self.path = PercentCoding.splitTarget(head.uri).path
        self.client = RequestTranslation.clientDescription(
            head: head, remote: channel.remoteAddress,
            proxyHeaders: server.configuration.proxyHeaders)
        self.machine = WebSocketConnectionStateMachine(now: Self.uptime())
        self.handshake = promise
        self.sender = server.makeSender(
            on: channel, owner: senders, outageTimeout: server.configuration.layerOutageTimeout)
        let bound = NIOLoopBound(self, eventLoop: channel.eventLoop)
        sender.onGiveUp = { reason in bound.value.senderGaveUp(reason) }
        sender.setReading = { reading in
            bound.value.senderReading = reading
            bound.value.updateReading()
        }
        // The sender's callbacks and the pipeline's contexts hold this session, which holds
        // them: they are let go when the connection closes (the sender finishes what it holds,
        // the disconnect included, without them), or every session would outlive its socket.
        channel.closeFuture.whenComplete { _ in
            let session = bound.value
            session.sender.onGiveUp = nil
            session.sender.setReading = nil
            // The frame handler's context holds the frame handler, which holds this session.
            session.context = nil
            session.encodedFrames = nil
            session.frameChannel = nil
        }
        server.counters.sessionsAlive.wrappingAdd(1, ordering: .relaxed)
        if server.configuration.maxFramesPerSecond > 0 {
            limiter = FrameRateLimiter(
                perSecond: server.configuration.maxFramesPerSecond, burst: max(10, server.configuration.maxFramesPerSecond / 10),
                now: .now())
        }
    }

    deinit { server.counters.sessionsAlive.wrappingSubtract(1, ordering: .relaxed) }

    /// This socket's share of the layer: frames a second (nil: no limit).
    var limiter: FrameRateLimiter?
    /// The sender wants reading (nothing held past its bound).
    private var senderReading = true
    /// The socket is past its frame rate; reading resumes when its waiting frames went.
    var ratePaused = false
    /// Frames read past the socket's share, waiting for tokens (bounded by what one read
    /// brings, since reading pauses).
    var paced = Deque<WebSocketReceiveMessage>()
    var pacingTimer: Scheduled<Void>?
    /// Why this server closed the socket, when the close drops what the client still sends.
    var closeDropReason: DropReason?
    private var reading = true

    func updateReading() {
        // Once our close frame is out, reading resumes whatever is held: the client's answer
        // must be read for the close to complete (else the connection waits out the 5 s
        // fallback), and its data frames from then on are dropped by the state machine, so
        // nothing more reaches the sender.
        let wanted = machine.closeFrameSent || (senderReading && !ratePaused)
        guard wanted != reading else { return }
        reading = wanted
        _ = channel.setOption(ChannelOptions.autoRead, value: wanted)
    }

    /// The monotonic time the state machine's ping deadlines are measured on.
    private static func uptime() -> Duration { .nanoseconds(Int64(NIODeadline.now().uptimeNanoseconds)) }

    /// The layer stayed full or unreachable for the whole bound: the socket cannot go on.
    private func senderGaveUp(_ reason: LayerSender.GiveUp) {
        switch machine.state {
        case .connecting:
            server.counters.count(.httpUnavailable)
            refuseHandshake(.unavailable)
        case .open:
            server.counters.count(reason == .full ? .closedChannelFull : .closedLayerUnavailable)
            closeDropReason = reason == .full ? .channelFull : .retriesExhausted
            server.logger.warning(
                reason == .full
                    ? "websocket.receive stayed full; closing with 1013"
                    : "channel layer stayed unavailable; closing with 1011",
                metadata: ["socket": "\(server.configuration.secret.socketTag(replyChannel))"])
            close(code: reason == .full ? 1013 : 1011)
        case .closing, .closed:
            break
        }
    }

    private var subprotocol: String?

    /// Sends `websocket.connect` and waits for the application's answer.
    func start(head: HTTPRequestHead) {
        let loop = channel.eventLoop
        // Subprotocol: the first the client offers that --ws-protocol allows; none otherwise.
        let offered = head.headers[canonicalForm: "sec-websocket-protocol"].map { String($0) }
        subprotocol = offered.first { server.configuration.websocketProtocols.contains($0) }
        let bound = NIOLoopBound(self, eventLoop: loop)
        guard server.hostAllowed(head) else {
            refuseHandshake(.host)
            return
        }
        // A browser always sends the page's Origin: one that is not an allowed host is a
        // foreign page riding on the user's cookies (cross-site WebSocket hijacking). Clients
        // that are not browsers send none, and are let through.
        if let origin = head.headers.first(name: "origin"), !server.allowedHosts.allows(origin: origin) {
            server.counters.count(.refusedOrigin)
            server.logger.info("WebSocket origin refused", metadata: ["origin": "\(origin.prefix(200))"])
            refuseHandshake(.origin)
            return
        }
        server.router.register(replyChannel, self, on: loop)
        // The application's time to answer starts when the connect reaches the layer: in a join
        // storm the connects wait their turn (backpressure) without losing it. A connect that
        // cannot be sent at all is refused by the sender's own bound (503).
        // A connect the layer refused for good (larger than its limit): refused now, not held.
        sender.onDropped = { channel in
            if channel == ASGIChannel.websocketConnect { bound.value.refuseHandshake(.unavailable) }
        }
        sender.onSent = { channel in
            guard channel == ASGIChannel.websocketConnect else { return }
            let session = bound.value
            session.sender.onSent = nil
            session.connectTimeout = loop.scheduleTask(in: TimeAmount(session.server.configuration.websocketConnectTimeout)) {
                bound.value.refuseHandshake(.timeout)
            }
        }
        // A client that leaves before the application answered: the application, which may have
        // stored a session or joined a group on connect, hears of it as of any other close.
        // One that leaves after the accept but before the upgrade is done (no frame handler yet
        // to see it) is a closed socket: the application hears of it once either way.
        channel.closeFuture.whenComplete { _ in
            bound.value.refuseHandshake(.clientGone)
            bound.value.clientClosed(code: 1006)
        }
        let query = PercentCoding.splitTarget(head.uri).query
        let (clientAddress, secure) = RequestTranslation.client(
            head: head, remote: channel.remoteAddress,
            proxyHeaders: server.configuration.proxyHeaders)
        let message = WebSocketConnectMessage(
            replyChannel: ReplyChannelName(trusted: replyChannel), scheme: secure ? "wss" : "ws", path: path, queryString: query,
            rootPath: server.configuration.rootPath, headers: RequestTranslation.headers(head.headers),
            client: clientAddress, server: RequestTranslation.address(channel.localAddress), order: 0
        ).message
        sender.send(message, to: ASGIChannel.websocketConnect)
    }

    /// Refuses the handshake, when it is still held open.
    private func refuseHandshake(_ why: WebSocketConnectionStateMachine.Refusal) {
        perform(machine.refuseHandshake(why), reply: nil)
    }

    /// Refuses the handshake with `why`'s status; with `disconnectOrder`, the application (which
    /// was sent the connect) also gets `websocket.disconnect` (1006).
    func refused(_ why: WebSocketConnectionStateMachine.Refusal, disconnectOrder: Int64?) {
        connectTimeout?.cancel()
        sender.onSent = nil
        sender.onDropped = nil
        server.router.unregister(replyChannel)
        upgrade.rejected = true
        upgrade.held = false
        // The refusal is an HTTP answer: the request's end (already read) goes to the HTTP handler.
        _ = channel.setOption(ChannelOptions.autoRead, value: true)
        upgrade.rejectionStatus =
            why.status == 503 ? .serviceUnavailable : why.status == 400 ? .badRequest : .forbidden
        if why.status == 503 { upgrade.retryAfter = Int.random(in: 1...5) }
        server.accessLog?.websocket(client: client, event: "REJECT", path: path, detail: why.rawValue)
        handshake?.succeed(nil)
        handshake = nil
        if let disconnectOrder {
            sender.send(
                WebSocketDisconnectMessage(
                    replyChannel: ReplyChannelName(trusted: replyChannel), code: 1006, path: path, order: disconnectOrder
                ).message,
                to: ASGIChannel.websocketDisconnect, outlivesGiveUp: true)
        }
    }

    private func accepted() {
        connectTimeout?.cancel()
        sender.onSent = nil
        sender.onDropped = nil
        server.accessLog?.websocket(client: client, event: "CONNECT", path: path)
        var headers = HTTPHeaders()
        if let subprotocol { headers.add(name: "sec-websocket-protocol", value: subprotocol) }
        handshake?.succeed(headers)
        handshake = nil
    }

    /// Called by the frame handler once the upgrade is done.
    func attached(context: ChannelHandlerContext) {
        self.context = context
        encodedFrames = try? context.pipeline.syncOperations.context(handlerType: WebSocketFrameEncoder.self)
        frameChannel = context.channel
        if server.configuration.directWrites, encodedFrames != nil,
            (try? context.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self)) == nil
        {
            if let descriptor = DirectSocket.descriptor(of: context.channel),
                (try? context.pipeline.syncOperations.addHandler(DirectSocket(session: self), position: .first)) != nil
            {
                directDescriptor = descriptor
            }
        }
        frameAllocator = context.channel.allocator
        boundUnwrittenBytes(context.channel)
        machine.attached()
        guard case .open(attached: true) = machine.state else {
            // Closed between the accept and the upgrade's end (the layer gave up on its sender,
            // the client left): the application already has its disconnect. Nothing to track,
            // to ping or to keep open.
            context.channel.close(promise: nil)
            return
        }
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        server.trackSocket(ObjectIdentifier(self)) { code in
            bound.eventLoop.execute { bound.value.close(code: code) }
        }
        if let life = server.configuration.websocketTimeout {
            lifetime = context.eventLoop.scheduleTask(in: TimeAmount(life)) {
                bound.value.close(code: 1000)
            }
        }
        pingWheel = server.pingWheel(on: context.eventLoop)
        pingWheel?.add(self)
        let queued = pending
        pending = []
        for reply in queued { receiveReply(reply) }
    }

    /// Called by the loop's ``PingWheel`` about once per ping interval.
    func ping() {
        guard let context else { return }
        if !senderReading {
            // Reading is paused while frames are held for the layer (Redis slow or gone, up to
            // --layer-outage-timeout): the client's pong waits unread behind them. Its silence
            // is this server's, not the client's: the pong deadline starts again from now.
            machine.pongReceived(now: Self.uptime())
            return
        }
        switch machine.pingDue(now: Self.uptime(), timeout: server.configuration.pingTimeout) {
        case .none:
            break
        case .closeUnresponsive:
            close(code: 1011)
        case .sendPing:
            sendHeldFrames()
            let frame = WebSocketFrame(fin: true, opcode: .ping, data: context.channel.allocator.buffer(capacity: 0))
            context.writeAndFlush(NIOAny(frame), promise: nil)
        }
    }

    func pongReceived() {
        machine.pongReceived(now: Self.uptime())
    }

    /// The server closes every socket with 1012 when the layer lost its data (groups, sessions).
    func replyStoreLost() {}

    func receiveReply(_ reply: Message) {
        if reply.count == 1, let group = reply[Self.tailCheckControl]?.stringValue {
            // The server's own word (``GroupKeeper``), never written to the client.
            return checkTailSoon(StringInterner.names.intern(group))
        }
        guard reply["follow"] != nil || reply["presence"] != nil || reply["publication"] != nil else {
            return deliverReply(reply)
        }
        // An accept (and its first frame) that carries the socket's subscriptions: the accept as
        // any other, then the subscriptions.
        var reply = reply
        if reply["publication"] == nil, reply.keys.contains(where: { WebSocketSendMessage.keys.contains($0) }) {
            var send = Message()
            for key in reply.keys where WebSocketSendMessage.keys.contains(key) {
                send[key] = reply.removeValue(forKey: key)
            }
            deliverReply(send)
        }
        switch machine.state {
        case .connecting, .open(attached: false):
            // Handled once frames can be written (replayed by `attached`).
            pending.append(reply)
        case .open(attached: true):
            if !subscriptionReply(reply) { deliverReply(reply) }
        case .closing, .closed:
            break
        }
    }

    func receiveBatchedReply(_ reply: Message, payloads: ReplyPayloads) {
        batchPayloads = payloads
        // A plain `websocket.send` is checked and parsed once per hand-over for every member
        // it went to; anything else takes the whole path (which logs what it ignores).
        if let send = payloads.plainSend(reply) {
            perform(machine.reply(send), reply: (reply, send))
        } else if case .open(attached: true) = machine.state, let publication = payloads.publication(reply),
            livePublication(publication)
        {
        } else {
            receiveReply(reply)
        }
        batchPayloads = nil
    }

    func endReplyBatch() {
        guard flushHeld else { return }
        flushHeld = false
        heldBytes = 0
        flushBatch()
    }

    /// A text frame the server writes itself (history, presence), when the socket is open.
    func deliverText(_ text: String) {
        guard case .open(attached: true) = machine.state, let context else { return }
        write(context.channel.allocator.buffer(string: text), opcode: .text, context: context)
    }

    /// An ordinary `websocket.send` reply, through the state machine.
    func deliverReply(_ reply: Message) {
        for key in reply.keys where !WebSocketSendMessage.keys.contains(key) {
            server.logger.warning("ignored unknown key in a WebSocket reply", metadata: ["key": "\(key)"])
        }
        let send: WebSocketSendMessage
        do {
            send = try WebSocketSendMessage(reply)
        } catch {
            server.counters.count(.malformedReplies)
            server.logger.error(
                "ignored a malformed WebSocket reply",
                metadata: ["error": "\(error)", "socket": "\(server.configuration.secret.socketTag(replyChannel))"])
            return
        }
        perform(machine.reply(send), reply: (reply, send))
    }

    /// A `websocket.send` reply already checked and parsed (shared by a hand-over's members).
    func deliverParsed(_ reply: Message, _ send: WebSocketSendMessage) {
        perform(machine.reply(send), reply: (reply, send))
    }

    /// Does what the state machine said about a reply (or a refusal).
    private func perform(
        _ action: WebSocketConnectionStateMachine.ReplyAction, reply: (message: Message, send: WebSocketSendMessage)?
    ) {
        switch action {
        case .none:
            break
        case .ignoredBeforeAccept:
            server.logger.warning(
                "ignored a WebSocket reply before accept", metadata: ["keys": "\(reply?.message.fieldNames ?? [])"])
        case .accept:
            // Delivered again (its data, its close) once the upgrade is done.
            if let reply { pending.append(reply.message) }
            accepted()
        case .refuse(let why, let disconnectOrder):
            refused(why, disconnectOrder: disconnectOrder)
        case .hold:
            if let reply { pending.append(reply.message) }
        case .deliver(let code):
            // A batch's text touches this object only (no context, channel or handler: each a
            // cache miss on one of hundreds of cold sockets).
            guard context != nil, let send = reply?.send else { return }
            switch send.data {
            case .text(let text)?:
                if let batchPayloads, encodedFrames != nil {
                    writeInBatch(batchPayloads.textFrame(text, allocator: frameAllocator))
                } else if let context {
                    write(context.channel.allocator.buffer(string: text), opcode: .text, context: context)
                }
            case .bytes(let bytes)?:
                if let context { write(context.channel.allocator.buffer(bytes: bytes), opcode: .binary, context: context) }
            case nil: break
            }
            if let code { close(code: code) }
        }
    }
}
