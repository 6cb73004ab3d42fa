import ASGI
import CoreMetrics
import Logging
import NIOCore
import NIOHTTP1
import Synchronization

/// One HTTP connection: each request becomes an `http.request` message; the replies on its
/// reply channel become the response. NIO's pipelining handler feeds requests one at a time,
/// so pipelined requests are answered in order.
final class HTTPHandler: StartsWhenActive, RemovableChannelHandler, ReplyReceiver {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let server: ServerContext
    let upgrade: UpgradeState
    var head: HTTPRequestHead?
    var body: ByteBuffer?
    var bodyTooLarge = false
    /// Body bytes of the request so far.
    var bodyBytesReceived = 0
    /// The body channel of a request dispatched before its body ended (a large body, streamed).
    var streamingBodyChannel: String?
    /// The body channel of the request in flight, if its body goes in chunks (until it is answered).
    var requestBodyChannel: String?
    /// The request is refused; its body is read and dropped.
    var discardingBody = false
    var earlyRefusal: (HTTPResponseStatus, String)?
    /// A streamed body passed the limit and was answered (or the connection closed) mid-way.
    var bodyAborted = false
    /// Answered before the body came (413 on its announced length): the body is dropped as it
    /// arrives, and the connection closes at its end.
    var lingering = false
    var replyChannel: String?
    /// The pipeline position replies are written from, while a request waits for them.
    var replyContext: ChannelHandlerContext?
    /// Body bytes of the current response written to the client, and the last figure sent to
    /// the worker as credit (on the response's `disconnect_channel`).
    var bodyWritten = 0
    var bodyAcknowledged = 0
    /// The responder takes credit (its response start said so).
    var creditTaken = false
    /// Counts responses on this connection: a write completion of an earlier (pipelined)
    /// response must not count as the current one's.
    var responseNumber = 0
    /// Since when, and for how long in all, the server did not read this request's body (its
    /// sends to the layer were held): not the client's time.
    var notReading: (since: NIODeadline?, total: TimeAmount) = (nil, .zero)

    /// The time since the request's head during which the server was reading.
    func readingTime(_ context: ChannelHandlerContext) -> Duration {
        let now = context.eventLoop.now
        let paused = notReading.total + (notReading.since.map { now - $0 } ?? .zero)
        return Duration(now - started - paused)
    }
    var responseStarted = false
    var responseBytes = 0
    var status = 0
    var started = NIODeadline.now()
    /// The connection's deadlines (header, body, time to first byte, keep-alive idle).
    var machine: HTTPConnectionStateMachine
    /// The deadline in force (kind and time); nil when none is.
    var armed: (kind: HTTPConnectionStateMachine.Deadline, at: NIODeadline)?
    /// The one timer behind it, rescheduled lazily: a transition only moves `armed`; the timer
    /// is replaced only when the new deadline is earlier than its firing, and when it fires for
    /// a deadline that moved later it waits again. A keep-alive connection's requests cost no
    /// timer each.
    var timer: Scheduled<Void>?
    var timerAt = NIODeadline.distantFuture
    var opened = false
    /// Tells this handler when bytes arrive while it waits for a request (HTTP/1.1 only; nil
    /// on an HTTP/2 stream, whose connection the HTTP/2 handler guards).
    let activity: ConnectionActivity?
    /// Response bytes handed to the channel and not yet written to the socket.
    var unwrittenBytes = 0
    /// The unwritten response bytes of every stream of this HTTP/2 connection (nil on HTTP/1).
    let budget: ResponseBudget?
    var lastWriteProgress = NIODeadline.uptimeNanoseconds(0)
    var stallCheck: Scheduled<Void>?
    /// Where the responder wants to hear that the client left (see `HTTPResponseStart.disconnectChannel`).
    var disconnectChannel: String?
    var keepAlive = true
    /// Whether a dispatched request is waiting for its response (for the in-flight gauge).
    var inFlight = false
    var clientAddress = "-"
    var headersTooLarge = false
    /// This connection's messages to the layer; a full `http.request` is retried for a bounded
    /// time with reading paused, an unreachable layer answers 503 at once.
    var sender: LayerSender?
    /// The connection's task, where the sender's loop runs.
    let senders: ConnectionSenders?

    /// The parser stops after the request in progress (see `WebSocketUpgradeHead.parserStops(at:)`).
    var parserStopsAfterRequest = false

    /// When the connection opened, if before this handler was added (the fast upgrade path
    /// read its first bytes): the first header deadline runs from then.
    let openedAt: NIODeadline?

    init(
        server: ServerContext, upgrade: UpgradeState, activity: ConnectionActivity?, budget: ResponseBudget? = nil,
        senders: ConnectionSenders? = nil, openedAt: NIODeadline? = nil
    ) {
        self.openedAt = openedAt
        self.server = server
        self.senders = senders
        self.upgrade = upgrade
        self.activity = activity
        self.budget = budget
        self.machine = HTTPConnectionStateMachine(timeouts: server.configuration.connectionTimeouts)
    }

    func channelStarted(context: ChannelHandlerContext) { open(context: context) }

    func handlerRemoved(context: ChannelHandlerContext) {
        stopTimer()
        stallCheck?.cancel()
        stallCheck = nil
        activity?.onBytes = nil
        activity?.watching = false
        releaseSender()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            apply(machine.headReceived(), context: context)
            disconnectChannel = nil
            self.head = head
            body = nil
            bodyTooLarge = false
            discardingBody = false
            earlyRefusal = nil
            bodyAborted = false
            lingering = false
            bodyBytesReceived = 0
            streamingBodyChannel = nil
            started = context.eventLoop.now
            notReading = (since: nil, total: .zero)
            keepAlive = head.isKeepAlive
            // Nothing after this request will be parsed: answered, then closed, and what comes
            // after its end is bounded (its body is not).
            parserStopsAfterRequest = activity != nil && WebSocketUpgradeHead.parserStops(at: head)
            if parserStopsAfterRequest { keepAlive = false }
            clientAddress = RequestTranslation.clientDescription(
                head: head, remote: context.channel.remoteAddress,
                proxyHeaders: server.configuration.proxyHeaders)
            // The parser bounds what it buffers (about 80 KiB); our own, lower limit answers 431.
            var headerBytes = head.uri.utf8.count
            for (name, value) in head.headers { headerBytes += name.utf8.count + value.utf8.count + 4 }
            headersTooLarge = headerBytes > server.configuration.maxHeaderSize
            if let length = head.headers.first(name: "content-length").flatMap(Int.init), length > server.configuration.maxBodySize {
                // Announced too large: answered now, without waiting for the body; what the
                // client still sends is dropped (under the body deadline), then the connection closes.
                bodyTooLarge = true
                bodyAborted = true
                lingering = true
                bodyBytesReceived = 0
                ServerMetrics.httpRequests.increment()
                ServerMetrics.dropped[.tooLarge]?.increment()
                respondPlain(
                    context: context, status: .payloadTooLarge, text: "Request body too large\n", close: false, closeAfterBody: true)
                return
            }
            if head.headers.first(name: "expect")?.lowercased() == "100-continue", !headersTooLarge {
                // The client waits for this before it sends the body (curl does for large uploads).
                context.writeAndFlush(
                    wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .continue))), promise: nil)
            }
        case .body(var chunk):
            apply(machine.bodyReceived(chunk.readableBytes, elapsed: readingTime(context)), context: context)
            if lingering {
                // Answered 413 already: the body is read and dropped (so the client, still
                // sending, gets to read the answer instead of a reset), up to four times the
                // limit; a pause longer than the body timeout closes too.
                bodyBytesReceived += chunk.readableBytes
                if bodyBytesReceived > 4 * server.configuration.maxBodySize { context.close(promise: nil) }
                return
            }
            guard !bodyTooLarge, !discardingBody else { return }
            bodyBytesReceived += chunk.readableBytes
            if bodyBytesReceived > server.configuration.maxBodySize {
                bodyTooLarge = true
                body = nil
                if streamingBodyChannel != nil { abortStreamedBody(context: context) }
                return
            }
            if body == nil { body = chunk } else { body!.writeBuffer(&chunk) }
            if streamingBodyChannel != nil {
                sendBodyChunks(context: context, final: false)
            } else if body!.readableBytes > server.configuration.bodyChunkSize, let head {
                // A large body goes to the application as it arrives, chunk by chunk (reading
                // pauses while a chunk waits for the layer): the server never holds it whole.
                if let refusal = refusal(head: head) {
                    // Answered at the end of the request; the rest of the body is not kept.
                    discardingBody = true
                    body = nil
                    earlyRefusal = refusal
                } else {
                    dispatch(context: context, head: head, streaming: true)
                }
            }
        case .end:
            if parserStopsAfterRequest { activity?.parserStopped = true }
            if lingering {
                lingering = false
                context.close(promise: nil)
                return
            }
            guard let head, !bodyAborted else { return }
            if streamingBodyChannel != nil {
                sendBodyChunks(context: context, final: true)
                streamingBodyChannel = nil
                sender?.heldLimit = 2
                apply(machine.requestEnded(), context: context)
                return
            }
            ServerMetrics.httpRequests.increment()
            if headersTooLarge || bodyTooLarge { ServerMetrics.dropped[.tooLarge]?.increment() }
            if upgrade.refusalAnswered {
                // errorCaught already answered this refused upgrade (and closes the connection):
                // a second answer would be a response without a request.
                upgrade.refusalAnswered = false
            } else if bodyTooLarge && !headersTooLarge && !upgrade.rejected {
                if replyChannel == nil, !responseStarted {
                    respondPlain(context: context, status: .payloadTooLarge, text: "Request body too large\n", close: true)
                }
            } else if let (status, text) = earlyRefusal ?? refusal(head: head) {
                let retryAfter = status == .serviceUnavailable ? upgrade.retryAfter : nil
                respondPlain(
                    context: context, status: status, text: text, close: true,
                    headers: retryAfter.map { [("retry-after", String($0))] } ?? [])
            } else {
                apply(machine.requestEnded(), context: context)
                dispatch(context: context, head: head, streaming: false)
            }
        }
    }

    func dispatch(context: ChannelHandlerContext, head: HTTPRequestHead, streaming: Bool) {
        if streaming { ServerMetrics.httpRequests.increment() }
        let (path, query) = PercentCoding.splitTarget(head.uri)
        let reply = server.router.newReplyChannel()
        replyChannel = reply
        let (client, secure) = RequestTranslation.client(
            head: head, remote: context.channel.remoteAddress,
            proxyHeaders: server.configuration.proxyHeaders)
        var request = HTTPRequestMessage(
            replyChannel: ReplyChannelName(trusted: reply), httpVersion: RequestTranslation.version(head.version),
            method: head.method.rawValue.uppercased(),
            scheme: secure ? "https" : "http", path: path, queryString: query, rootPath: server.configuration.rootPath,
            headers: RequestTranslation.headers(head.headers), client: client,
            server: RequestTranslation.address(context.channel.localAddress),
            responseCredit: creditWindow)
        var chunks: [HTTPBodyChunk] = []
        let chunkSize = server.configuration.bodyChunkSize
        if streaming {
            // The first chunk rides in the request; the rest follow on the body channel as they come.
            request.body = body?.readBytes(length: chunkSize) ?? []
            request.bodyChannel = ASGIChannel.httpRequestBodyPrefix + ChannelNames.randomLetters(12)
            streamingBodyChannel = request.bodyChannel
            // While the body streams, reading pauses whenever a chunk waits for the layer.
            connectionSender(context: context).heldLimit = 1
        } else {
            let bodyBytes = body.map { Array($0.readableBytesView) } ?? []
            body = nil
            if bodyBytes.count > chunkSize {
                // The first chunk rides in the request; the rest go on a body channel.
                request.body = Array(bodyBytes[0..<chunkSize])
                var offset = chunkSize
                while offset < bodyBytes.count {
                    let end = min(offset + chunkSize, bodyBytes.count)
                    chunks.append(HTTPBodyChunk(content: Array(bodyBytes[offset..<end]), moreContent: end < bodyBytes.count))
                    offset = end
                }
                request.bodyChannel = ASGIChannel.httpRequestBodyPrefix + ChannelNames.randomLetters(12)
            } else {
                request.body = bodyBytes
            }
        }

        replyContext = context
        server.router.register(reply, self, on: context.eventLoop)
        inFlight = true
        ServerMetrics.httpInFlight.increment()
        let sender = connectionSender(context: context)
        sender.resume()
        sender.send(request.message, to: ASGIChannel.httpRequest)
        requestBodyChannel = request.bodyChannel
        if let bodyChannel = request.bodyChannel {
            for chunk in chunks { sender.send(chunk.message, to: bodyChannel) }
        }
        if streaming { sendBodyChunks(context: context, final: false) }
    }

    func connectionSender(context: ChannelHandlerContext) -> LayerSender {
        if let sender { return sender }
        // Body chunks are large: reading pauses while two messages wait for the layer, so an
        // upload holds about two chunks in the server (one request alone never pauses it).
        let sender = server.makeSender(on: context.channel, owner: senders, outageTimeout: .zero, heldLimit: 2)
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let boundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
        let channel = context.channel
        sender.onGiveUp = { reason in handler.value.sendFailed(full: reason == .full, context: boundContext.value) }
        sender.setReading = { reading in
            _ = channel.setOption(ChannelOptions.autoRead, value: reading)
            // Time the server itself stops reading is not the client's pause.
            let handler = handler.value
            let context = boundContext.value
            if reading {
                if let since = handler.notReading.since {
                    handler.notReading = (nil, handler.notReading.total + (context.eventLoop.now - since))
                }
                handler.apply(handler.machine.bodyReceived(elapsed: handler.readingTime(context)), context: context)
            } else {
                if handler.notReading.since == nil { handler.notReading.since = context.eventLoop.now }
                if handler.machine.state == .readingBody { handler.apply(.disarm, context: context) }
            }
        }
        self.sender = sender
        return sender
    }

    var isHTTP2: Bool { (head?.version.major ?? 1) >= 2 }

    /// A `HEAD` request on an HTTP/2 stream: its response carries headers only.
    var isHeadOverHTTP2: Bool { isHTTP2 && head?.method == .HEAD }

    /// The request in flight will get no more of its response to the client: the application
    /// hears it on `http.disconnect` and, when the responder named one, on its disconnect channel
    /// (a streaming consumer stops there at once).
    func tellApplicationClientLeft(context: ChannelHandlerContext) {
        guard let replyChannel, let head else { return }
        let path = PercentCoding.splitTarget(head.uri).path
        let message = HTTPDisconnectMessage(replyChannel: ReplyChannelName(trusted: replyChannel), path: path).message
        let sender = connectionSender(context: context)
        sender.resume()
        // The streaming worker's inbox first: `http.disconnect` fills up when nothing consumes it
        // (a worker drains it only when a route takes it), and a send held on a full channel
        // held this one behind it until both were given up (a red team's 150 clients leaving at
        // once: 50 of their consumers streamed on to nobody).
        if let disconnectChannel { sender.send(message, to: disconnectChannel) }
        sender.send(message, to: ASGIChannel.httpDisconnect)
    }

    func channelInactive(context: ChannelHandlerContext) {
        leaveFlight()
        if let bodyChannel = streamingBodyChannel {
            // The client left mid-upload: the consumer reading the body hears it at once.
            streamingBodyChannel = nil
            connectionSender(context: context).send(
                HTTPBodyChunk(content: [], closed: true, moreContent: false).message, to: bodyChannel)
        }
        apply(machine.closed(), context: context)
        stopTimer()
        activity?.onBytes = nil
        if replyChannel != nil {
            // The client left before its response finished.
            tellApplicationClientLeft(context: context)
            server.router.unregister(replyChannel!)
            self.replyChannel = nil
            self.replyContext = nil
            self.disconnectChannel = nil
        }
        stallCheck?.cancel()
        stallCheck = nil
        if let budget { budget.unwritten -= unwrittenBytes }
        unwrittenBytes = 0
        releaseSender()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if upgrade.rejected {
            // NIO's upgrader reports a refused upgrade as an error; the answer is a 403.
            upgrade.rejected = false
            upgrade.refusalAnswered = true
            respondPlain(
                context: context, status: upgrade.rejectionStatus, text: "WebSocket connection refused\n", close: true,
                headers: upgrade.retryAfter.map { [("retry-after", String($0))] } ?? [])
            return
        }
        server.logger.debug("HTTP connection error", metadata: ["error": "\(error)"])
        context.close(promise: nil)
    }
}

/// Per-connection flag set when the application refused a WebSocket upgrade, so the HTTP
/// handler that then sees the request answers 403 instead of routing it.
final class UpgradeState {
    /// The handshake is with the application (reading paused).
    var held = false
    var rejected = false
    /// The refusal was answered from `errorCaught`; the request's end must not answer again.
    var refusalAnswered = false
    var rejectionStatus: HTTPResponseStatus = .forbidden
    /// Seconds the refused client should wait before trying again (jittered, so a storm of
    /// clients does not come back at once).
    var retryAfter: Int?
}
