import ASGI
import CoreMetrics
import DequeModule
import Logging
import NIOCore
import NIOHTTP1
import NIOWebSocket

/// One WebSocket, from the held-open upgrade to the disconnect. Lives on its channel's
/// event loop. Replies that arrive before the upgrade completes are kept and written after.
final class WebSocketSession {
    enum State {
        case connecting(EventLoopPromise<HTTPHeaders?>)
        case open
        case closed
    }

    let server: ServerContext
    let replyChannel: String
    let path: String
    let client: String
    let channel: any Channel
    private var state: State
    private var order: Int64 = 0
    private var pending: [Message] = []
    private var context: ChannelHandlerContext?
    private var disconnectSent = false
    /// We sent a close frame: the client's close frame completes the handshake.
    private(set) var closeFrameSent = false
    private var connectTimeout: Scheduled<Void>?
    private var lifetime: Scheduled<Void>?
    private var pingTask: RepeatedTask?
    private var awaitingPong = false
    /// This socket's messages to the layer, in order, held and retried when the layer is full or down.
    private let sender: LayerSender
    /// Bytes written to the client and not yet taken by the kernel.
    private var queuedBytes = 0
    private var lastPong = NIODeadline.now()
    let upgrade: UpgradeState

    init(
        server: ServerContext, channel: any Channel, head: HTTPRequestHead, upgrade: UpgradeState,
        promise: EventLoopPromise<HTTPHeaders?>
    ) {
        self.server = server
        self.channel = channel
        self.upgrade = upgrade
        self.replyChannel = server.router.newReplyChannel()
        self.path = PercentCoding.splitTarget(head.uri).path
        self.client = RequestTranslation.clientDescription(
            head: head, remote: channel.remoteAddress,
            proxyHeaders: server.configuration.proxyHeaders)
        self.state = .connecting(promise)
        self.sender = server.makeSender(on: channel.eventLoop, outageTimeout: server.configuration.layerOutageTimeout)
        let bound = NIOLoopBound(self, eventLoop: channel.eventLoop)
        sender.onGiveUp = { reason in bound.value.senderGaveUp(reason) }
        sender.setReading = { reading in
            bound.value.senderReading = reading
            bound.value.updateReading()
        }
        if server.configuration.maxFramesPerSecond > 0 {
            limiter = FrameRateLimiter(
                perSecond: server.configuration.maxFramesPerSecond, burst: max(10, server.configuration.maxFramesPerSecond / 10),
                now: .now())
        }
    }

    /// This socket's share of the layer: frames a second (nil: no limit).
    private var limiter: FrameRateLimiter?
    /// The sender wants reading (nothing held past its bound).
    private var senderReading = true
    /// The socket is past its frame rate; reading resumes when its waiting frames went.
    private var ratePaused = false
    /// Frames read past the socket's share, waiting for tokens (bounded by what one read
    /// brings, since reading pauses).
    private var paced = Deque<Message>()
    private var pacingTimer: Scheduled<Void>?
    private var reading = true

    private func updateReading() {
        let wanted = senderReading && !ratePaused
        guard wanted != reading else { return }
        reading = wanted
        _ = channel.setOption(ChannelOptions.autoRead, value: wanted)
    }

    /// The layer stayed full or unreachable for the whole bound: the socket cannot go on.
    private func senderGaveUp(_ reason: LayerSender.GiveUp) {
        switch state {
        case .connecting:
            server.counters.count(.httpUnavailable)
            reject(reason: "unavailable", status: 503)
        case .open:
            server.counters.count(reason == .full ? .closedChannelFull : .closedLayerUnavailable)
            server.logger.warning(
                reason == .full
                    ? "websocket.receive stayed full; closing with 1013"
                    : "channel layer stayed unavailable; closing with 1011",
                metadata: ["socket": "\(server.configuration.secret.socketTag(replyChannel))"])
            close(code: reason == .full ? 1013 : 1011)
        case .closed:
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
            reject(reason: "host", status: 400)
            return
        }
        // A browser always sends the page's Origin: one that is not an allowed host is a
        // foreign page riding on the user's cookies (cross-site WebSocket hijacking). Clients
        // that are not browsers send none, and are let through.
        if let origin = head.headers.first(name: "origin"), !server.allowedHosts.allows(origin: origin) {
            server.counters.count(.refusedOrigin)
            server.logger.info("WebSocket origin refused", metadata: ["origin": "\(origin.prefix(200))"])
            reject(reason: "origin")
            return
        }
        server.router.register(replyChannel) { reply in
            loop.execute { bound.value.handleReply(reply) }
        }
        connectTimeout = loop.scheduleTask(in: TimeAmount(server.configuration.websocketConnectTimeout)) {
            bound.value.reject(reason: "timeout", tellApplication: true)
        }
        // A client that leaves before the application answered: the application, which may have
        // stored a session or joined a group on connect, hears of it as of any other close.
        channel.closeFuture.whenComplete { _ in bound.value.reject(reason: "client gone", tellApplication: true) }
        let query = PercentCoding.splitTarget(head.uri).query
        let (clientAddress, secure) = RequestTranslation.client(
            head: head, remote: channel.remoteAddress,
            proxyHeaders: server.configuration.proxyHeaders)
        let message = WebSocketConnectMessage(
            replyChannel: replyChannel, scheme: secure ? "wss" : "ws", path: path, queryString: query,
            rootPath: server.configuration.rootPath, headers: RequestTranslation.headers(head.headers),
            client: clientAddress, server: RequestTranslation.address(channel.localAddress), order: 0
        ).message
        sender.send(message, to: ASGIChannel.websocketConnect)
    }

    /// Refuses the handshake. With `tellApplication` (the application was sent the connect and
    /// did not refuse it itself: a timeout, a shutdown, a client that left), it also gets
    /// `websocket.disconnect` (1006), so what its connect consumer stored is cleaned up.
    private func reject(reason: String, status: Int = 403, tellApplication: Bool = false) {
        guard case .connecting(let promise) = state else { return }
        state = .closed
        connectTimeout?.cancel()
        server.router.unregister(replyChannel)
        upgrade.rejected = true
        upgrade.held = false
        // The refusal is an HTTP answer: the request's end (already read) goes to the HTTP handler.
        _ = channel.setOption(ChannelOptions.autoRead, value: true)
        upgrade.rejectionStatus = status == 503 ? .serviceUnavailable : status == 400 ? .badRequest : .forbidden
        server.accessLog?.websocket(client: client, event: "REJECT", path: path, detail: reason)
        promise.succeed(nil)
        if tellApplication {
            disconnectSent = true
            order += 1
            sender.send(
                WebSocketDisconnectMessage(replyChannel: replyChannel, code: 1006, path: path, order: order).message,
                to: ASGIChannel.websocketDisconnect)
        }
    }

    private func accept() {
        guard case .connecting(let promise) = state else { return }
        state = .open
        connectTimeout?.cancel()
        server.accessLog?.websocket(client: client, event: "CONNECT", path: path)
        var headers = HTTPHeaders()
        if let subprotocol { headers.add(name: "sec-websocket-protocol", value: subprotocol) }
        promise.succeed(headers)
    }

    /// Called by the frame handler once the upgrade is done.
    func attached(context: ChannelHandlerContext) {
        self.context = context
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        server.trackSocket(ObjectIdentifier(self)) { code in
            bound.eventLoop.execute { bound.value.close(code: code) }
        }
        if let life = server.configuration.websocketTimeout {
            lifetime = context.eventLoop.scheduleTask(in: TimeAmount(life)) {
                bound.value.close(code: 1000)
            }
        }
        if let interval = server.configuration.pingInterval {
            pingTask = context.eventLoop.scheduleRepeatedTask(initialDelay: TimeAmount(interval), delay: TimeAmount(interval)) { _ in
                bound.value.ping()
            }
        }
        let queued = pending
        pending = []
        for reply in queued { handleReply(reply) }
    }

    private func ping() {
        guard let context, case .open = state else { return }
        if awaitingPong, NIODeadline.now() - lastPong > TimeAmount(server.configuration.pingTimeout) {
            close(code: 1011)
            return
        }
        awaitingPong = true
        let frame = WebSocketFrame(fin: true, opcode: .ping, data: context.channel.allocator.buffer(capacity: 0))
        context.writeAndFlush(NIOAny(frame), promise: nil)
    }

    func pongReceived() {
        awaitingPong = false
        lastPong = .now()
    }

    func handleReply(_ reply: Message) {
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
        switch state {
        case .connecting:
            if send.accept == false {
                reject(reason: "denied")
            } else if send.accept == true || send.data != nil {
                pending.append(reply)
                accept()
            } else if send.close != nil {
                reject(reason: "closed")
            } else {
                server.logger.warning("ignored a WebSocket reply before accept", metadata: ["keys": "\(reply.fieldNames)"])
            }
        case .open:
            guard let context else {
                pending.append(reply)
                return
            }
            switch send.data {
            case .text(let text)?: write(context.channel.allocator.buffer(string: text), opcode: .text, context: context)
            case .bytes(let bytes)?: write(context.channel.allocator.buffer(bytes: bytes), opcode: .binary, context: context)
            case nil: break
            }
            if case .open = state, let code = send.close { close(code: UInt16(code)) }
        case .closed:
            break
        }
    }

    /// One frame to the client, counted against the socket's bound of unwritten bytes.
    private func write(_ data: ByteBuffer, opcode: WebSocketOpcode, context: ChannelHandlerContext) {
        let size = data.readableBytes
        queuedBytes += size
        if queuedBytes > server.configuration.maxQueuedBytesPerSocket {
            slowClient()
            return
        }
        let written = context.eventLoop.makePromise(of: Void.self)
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        written.futureResult.whenComplete { _ in bound.value.queuedBytes -= size }
        context.writeAndFlush(NIOAny(WebSocketFrame(fin: true, opcode: opcode, data: data)), promise: written)
    }

    /// The client does not read what it is sent: past the bound, close it rather than keep
    /// buffering (or slow anyone else down).
    private func slowClient() {
        server.counters.count(.closedSlowClient)
        // The frame that did not fit is not written: a drop, counted as such.
        ServerMetrics.dropped[.slowClient]?.increment()
        server.logger.warning(
            "closing a WebSocket whose client does not read (1008)",
            metadata: [
                "socket": "\(server.configuration.secret.socketTag(replyChannel))", "queued_bytes": "\(queuedBytes)",
                "limit": "\(server.configuration.maxQueuedBytesPerSocket)",
            ])
        close(code: 1008, force: true)
    }

    /// A message frame from the client.
    func received(text: String?, bytes: [UInt8]?) {
        guard case .open = state else { return }
        order += 1
        let message = WebSocketReceiveMessage(
            replyChannel: replyChannel, path: path, order: order,
            data: text.map { .text($0) } ?? .bytes(bytes ?? []))
        guard limiter != nil else {
            sender.send(message.message, to: ASGIChannel.websocketReceive)
            return
        }
        paced.append(message.message)
        sendPaced()
    }

    /// Sends the frames waiting for this socket's share, as tokens allow; when they run out,
    /// reading pauses and a timer resumes when the next token is due.
    private func sendPaced() {
        guard !ratePaused || pacingTimer == nil else { return }
        while let next = paced.first {
            if let wait = limiter?.take(now: .now()) {
                if !ratePaused {
                    ratePaused = true
                    server.counters.count(.framesPaced)
                    updateReading()
                }
                let bound = NIOLoopBound(self, eventLoop: channel.eventLoop)
                pacingTimer = channel.eventLoop.scheduleTask(in: wait) {
                    bound.value.pacingTimer = nil
                    bound.value.sendPaced()
                }
                return
            }
            paced.removeFirst()
            sender.send(next, to: ASGIChannel.websocketReceive)
        }
        if ratePaused {
            ratePaused = false
            updateReading()
        }
    }

    /// Closes from our side with `code`, and tells the application. The close frame gets a few
    /// seconds to leave; with `force` (a client that does not read) the connection closes at once.
    func close(code: UInt16, force: Bool = false) {
        switch state {
        case .connecting:
            reject(reason: "shutdown", tellApplication: true)
            return
        case .closed:
            return
        case .open:
            state = .closed
        }
        // Before the write: a write that completes at once closes the channel, and its
        // channelInactive must not report 1006 first.
        sendDisconnect(code: Int64(code))
        if let context {
            var data = context.channel.allocator.buffer(capacity: 2)
            data.writeInteger(code)
            let frame = WebSocketFrame(fin: true, opcode: .connectionClose, data: data)
            let channel = context.channel
            closeFrameSent = true
            if force {
                context.writeAndFlush(NIOAny(frame), promise: nil)
                channel.close(promise: nil)
            } else {
                // The connection closes when the client answers with its close frame (RFC 6455
                // 5.5.1: closing while its frames are still arriving would reset the connection
                // and lose our close frame), or after 5 s. A shutdown waits for it.
                let inHand = server.router.workInHand
                inHand.begin()
                channel.closeFuture.whenComplete { _ in inHand.finish() }
                context.writeAndFlush(NIOAny(frame), promise: nil)
                channel.eventLoop.scheduleTask(in: .seconds(5)) { channel.close(promise: nil) }
            }
        }
    }

    /// The client closed (with a close frame) or the connection dropped (1006).
    func clientClosed(code: UInt16) {
        if case .open = state {
            state = .closed
        }
        sendDisconnect(code: Int64(code))
    }

    private func sendDisconnect(code: Int64) {
        guard !disconnectSent else { return }
        disconnectSent = true
        // Frames still waiting for their share go first, in order, before the disconnect.
        pacingTimer?.cancel()
        pacingTimer = nil
        while let next = paced.popFirst() { sender.send(next, to: ASGIChannel.websocketReceive) }
        pingTask?.cancel()
        lifetime?.cancel()
        server.untrackSocket(ObjectIdentifier(self))
        server.router.unregister(replyChannel)
        order += 1
        server.accessLog?.websocket(client: client, event: "DISCONNECT", path: path, detail: "\(code)")
        sender.send(
            WebSocketDisconnectMessage(replyChannel: replyChannel, code: Int(code), path: path, order: order).message,
            to: ASGIChannel.websocketDisconnect)
    }
}

/// Frames of an upgraded connection, after the aggregator has joined fragments.
final class WebSocketFrameHandler: ChannelInboundHandler {
    typealias InboundIn = WebSocketFrame
    typealias OutboundOut = WebSocketFrame

    private let session: WebSocketSession

    init(session: WebSocketSession) {
        self.session = session
    }

    func handlerAdded(context: ChannelHandlerContext) {
        session.attached(context: context)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        switch frame.opcode {
        case .text:
            var payload = frame.unmaskedData
            let text = payload.readString(length: payload.readableBytes) ?? ""
            guard String(validating: Array(frame.unmaskedData.readableBytesView), as: UTF8.self) != nil else {
                session.close(code: 1007)
                return
            }
            session.received(text: text, bytes: nil)
        case .binary:
            session.received(text: nil, bytes: Array(frame.unmaskedData.readableBytesView))
        case .ping:
            let pong = WebSocketFrame(fin: true, opcode: .pong, data: frame.unmaskedData)
            context.writeAndFlush(wrapOutboundOut(pong), promise: nil)
        case .pong:
            session.pongReceived()
        case .connectionClose:
            var data = frame.unmaskedData
            let code = data.readInteger(as: UInt16.self) ?? 1005
            session.clientClosed(code: code)
            guard !session.closeFrameSent else {
                // The answer to our close frame: the handshake is complete.
                context.close(promise: nil)
                return
            }
            var echo = context.channel.allocator.buffer(capacity: 2)
            echo.writeInteger(code == 1005 ? 1000 : code)
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .connectionClose, data: echo)))
                .whenComplete { _ in channel.close(promise: nil) }
        default:
            break
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        session.clientClosed(code: 1006)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // Oversize frames and protocol errors from the frame decoder: close with 1009 / 1002 and
        // tell the application that code (not the 1006 of a dropped connection).
        if let wsError = error as? NIOWebSocketError {
            if wsError == .invalidFrameLength { ServerMetrics.dropped[.tooLarge]?.increment() }
            session.close(code: wsError == .invalidFrameLength ? 1009 : 1002)
        } else if let aggregation = error as? NIOWebSocketFrameAggregator.Error {
            // The aggregator refused a fragmented message: too big (1009) or fragments out of
            // order (a protocol error, 1002).
            switch aggregation {
            case .accumulatedFrameSizeIsTooLarge, .tooManyFragments:
                ServerMetrics.dropped[.tooLarge]?.increment()
                session.close(code: 1009)
            default: session.close(code: 1002)
            }
        } else {
            session.close(code: 1011)
        }
    }
}
