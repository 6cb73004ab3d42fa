import ASGI
import CoreMetrics
import Logging
import NIOCore
import NIOHTTP1
import Synchronization

/// One HTTP connection: each request becomes an `http.request` message; the replies on its
/// reply channel become the response. NIO's pipelining handler feeds requests one at a time,
/// so pipelined requests are answered in order.
final class HTTPHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let server: ServerContext
    private let upgrade: UpgradeState
    private var head: HTTPRequestHead?
    private var body: ByteBuffer?
    private var bodyTooLarge = false
    /// Body bytes of the request so far.
    private var bodyBytesReceived = 0
    /// The body channel of a request dispatched before its body ended (a large body, streamed).
    private var streamingBodyChannel: String?
    /// The request is refused; its body is read and dropped.
    private var discardingBody = false
    private var earlyRefusal: (HTTPResponseStatus, String)?
    /// A streamed body passed the limit and was answered (or the connection closed) mid-way.
    private var bodyAborted = false
    /// Answered before the body came (413 on its announced length): the body is dropped as it
    /// arrives, and the connection closes at its end.
    private var lingering = false
    private var replyChannel: String?
    private var responseStarted = false
    private var responseBytes = 0
    private var status = 0
    private var started = NIODeadline.now()
    /// The connection's deadlines (header, body, time to first byte, keep-alive idle).
    private var machine: HTTPConnectionStateMachine
    /// The deadline in force (kind and time); nil when none is.
    private var armed: (kind: HTTPConnectionStateMachine.Deadline, at: NIODeadline)?
    /// The one timer behind it, rescheduled lazily: a transition only moves `armed`; the timer
    /// is replaced only when the new deadline is earlier than its firing, and when it fires for
    /// a deadline that moved later it waits again. A keep-alive connection's requests cost no
    /// timer each.
    private var timer: Scheduled<Void>?
    private var timerAt = NIODeadline.distantFuture
    private var opened = false
    /// Tells this handler when bytes arrive while it waits for a request (HTTP/1.1 only; nil
    /// on an HTTP/2 stream, whose connection the HTTP/2 handler guards).
    private let activity: ConnectionActivity?
    /// Response bytes handed to the channel and not yet written to the socket.
    private var unwrittenBytes = 0
    /// The unwritten response bytes of every stream of this HTTP/2 connection (nil on HTTP/1).
    private let budget: ResponseBudget?
    private var lastWriteProgress = NIODeadline.uptimeNanoseconds(0)
    private var stallCheck: Scheduled<Void>?
    /// Where the responder wants to hear that the client left (see `HTTPResponseStart.disconnectChannel`).
    private var disconnectChannel: String?
    private var keepAlive = true
    /// Whether a dispatched request is waiting for its response (for the in-flight gauge).
    private var inFlight = false
    private var clientAddress = "-"
    private var headersTooLarge = false
    /// This connection's messages to the layer; a full `http.request` is retried for a bounded
    /// time with reading paused, an unreachable layer answers 503 at once.
    private var sender: LayerSender?

    init(server: ServerContext, upgrade: UpgradeState, activity: ConnectionActivity?, budget: ResponseBudget? = nil) {
        self.server = server
        self.upgrade = upgrade
        self.activity = activity
        self.budget = budget
        self.machine = HTTPConnectionStateMachine(timeouts: server.configuration.connectionTimeouts)
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { open(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        open(context: context)
        context.fireChannelActive()
    }

    private func open(context: ChannelHandlerContext) {
        guard !opened else { return }
        opened = true
        if let activity {
            let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
            let boundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
            activity.onBytes = { handler.value.apply(handler.value.machine.bytesArrived(), context: boundContext.value) }
            activity.watching = true
        }
        apply(machine.opened(), context: context)
    }

    /// Does what the state machine answered.
    private func apply(_ action: HTTPConnectionStateMachine.Action, context: ChannelHandlerContext) {
        if let activity {
            if case .idle = machine.state { activity.watching = true } else { activity.watching = false }
        }
        switch action {
        case .none:
            break
        case .arm(let kind, let after):
            // The loop's clock (a testing loop's is virtual).
            let at = context.eventLoop.now + TimeAmount(after)
            armed = (kind, at)
            if timer == nil || timerAt > at { startTimer(at: at, context: context) }
        case .disarm:
            armed = nil
        case .answer(let status, _):
            armed = nil
            if status == 503 {
                timedOut(context: context)
            } else {
                // The body stopped coming: the request is over for the application too (a late
                // reply finds nobody), and a consumer reading a streamed body hears it.
                if let bodyChannel = streamingBodyChannel {
                    streamingBodyChannel = nil
                    connectionSender(context: context).send(
                        HTTPBodyChunk(content: [], closed: true, moreContent: false).message, to: bodyChannel)
                }
                bodyAborted = true
                if !responseStarted {
                    finishRequest()
                    respondPlain(context: context, status: HTTPResponseStatus(statusCode: status), text: "Request timed out\n", close: true)
                } else {
                    finishRequest()
                    context.close(promise: nil)
                }
            }
        case .close:
            armed = nil
            context.close(promise: nil)
        }
    }

    private func startTimer(at: NIODeadline, context: ChannelHandlerContext) {
        timer?.cancel()
        timerAt = at
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let boundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
        timer = context.eventLoop.scheduleTask(deadline: at) {
            handler.value.timerFired(context: boundContext.value)
        }
    }

    private func stopTimer() {
        timer?.cancel()
        timer = nil
        timerAt = .distantFuture
        armed = nil
    }

    private func timerFired(context: ChannelHandlerContext) {
        timer = nil
        timerAt = .distantFuture
        guard let (kind, at) = armed else { return }
        if at > context.eventLoop.now {
            startTimer(at: at, context: context)
            return
        }
        deadlinePassed(kind, context: context)
    }

    private func deadlinePassed(_ kind: HTTPConnectionStateMachine.Deadline, context: ChannelHandlerContext) {
        armed = nil
        // A held WebSocket upgrade is the application's to answer within the connect timeout.
        if activity?.upgradeHeld == true { return }
        let before = machine.state
        let action = machine.deadlinePassed(kind)
        switch action {
        case .close:
            server.counters.count(.closedIdle)
        case .answer(status: 408, _) where before == .readingHead:
            // A head that never finished (slow-loris). The HTTP pipeline has no request to
            // answer: the 408 is written under it, then the connection closes.
            server.counters.count(.timedOutHeader)
            if let answer = activity?.answerRawAndClose {
                answer(ConnectionActivity.requestTimeout)
            } else {
                context.close(promise: nil)
            }
            return
        case .answer(status: 408, _):
            // A body that stopped coming.
            server.counters.count(.timedOutBody)
        default:
            break
        }
        apply(action, context: context)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        stopTimer()
        stallCheck?.cancel()
        stallCheck = nil
        activity?.onBytes = nil
        activity?.watching = false
        releaseSender()
    }

    /// The sender's callbacks hold this handler: they are let go once the connection is done
    /// (the sender itself finishes what it holds, such as an `http.disconnect`).
    private func releaseSender() {
        sender?.onGiveUp = nil
        sender?.setReading = nil
        sender = nil
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
            keepAlive = head.isKeepAlive
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
            apply(machine.bodyReceived(), context: context)
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
                respondPlain(context: context, status: status, text: text, close: true)
            } else {
                apply(machine.requestEnded(), context: context)
                dispatch(context: context, head: head, streaming: false)
            }
        }
    }

    /// Why the request is answered by the server itself (and not sent to the application), or
    /// nil. The Host check (which counts) runs once per request.
    private func refusal(head: HTTPRequestHead) -> (HTTPResponseStatus, String)? {
        if upgrade.rejected {
            upgrade.rejected = false
            return (upgrade.rejectionStatus, "WebSocket connection refused\n")
        }
        if headersTooLarge { return (.requestHeaderFieldsTooLarge, "Request headers too large\n") }
        if bodyTooLarge { return (.payloadTooLarge, "Request body too large\n") }
        if !server.hostAllowed(head) { return (.badRequest, "Bad Request (invalid Host header)\n") }
        return nil
    }

    /// Sends the buffered body to the body channel in `bodyChunkSize` pieces; with `final`, the
    /// rest (possibly nothing) as the last piece.
    private func sendBodyChunks(context: ChannelHandlerContext, final: Bool) {
        guard let bodyChannel = streamingBodyChannel else { return }
        let chunkSize = server.configuration.bodyChunkSize
        let sender = connectionSender(context: context)
        while var buffer = body, buffer.readableBytes >= chunkSize, !(final && buffer.readableBytes == chunkSize) {
            let bytes = buffer.readBytes(length: chunkSize)!
            body = buffer.readableBytes > 0 ? buffer : nil
            sender.send(HTTPBodyChunk(content: bytes, moreContent: true).message, to: bodyChannel)
        }
        if final {
            let rest = body.map { Array($0.readableBytesView) } ?? []
            body = nil
            sender.send(HTTPBodyChunk(content: rest, moreContent: false).message, to: bodyChannel)
        } else if let buffer = body, buffer.readerIndex > 0, buffer.readableBytes < chunkSize {
            // Keep what waits small: the read part of the buffer is given back.
            var copy = context.channel.allocator.buffer(capacity: chunkSize + 65536)
            copy.writeImmutableBuffer(buffer)
            body = copy
        }
    }

    /// A streamed body passed `maxBodySize`: the application hears the client is gone (a closed
    /// chunk), the client gets 413 if nothing was answered yet, and the connection closes.
    private func abortStreamedBody(context: ChannelHandlerContext) {
        guard let bodyChannel = streamingBodyChannel else { return }
        streamingBodyChannel = nil
        bodyAborted = true
        ServerMetrics.dropped[.tooLarge]?.increment()
        connectionSender(context: context).send(HTTPBodyChunk(content: [], closed: true, moreContent: false).message, to: bodyChannel)
        if !responseStarted, replyChannel != nil {
            finishRequest()
            respondPlain(context: context, status: .payloadTooLarge, text: "Request body too large\n", close: true)
        } else {
            context.close(promise: nil)
        }
    }

    private func dispatch(context: ChannelHandlerContext, head: HTTPRequestHead, streaming: Bool) {
        if streaming { ServerMetrics.httpRequests.increment() }
        let (path, query) = PercentCoding.splitTarget(head.uri)
        let reply = server.router.newReplyChannel()
        replyChannel = reply
        let (client, secure) = RequestTranslation.client(
            head: head, remote: context.channel.remoteAddress,
            proxyHeaders: server.configuration.proxyHeaders)
        var request = HTTPRequestMessage(
            replyChannel: reply, httpVersion: RequestTranslation.version(head.version), method: head.method.rawValue.uppercased(),
            scheme: secure ? "https" : "http", path: path, queryString: query, rootPath: server.configuration.rootPath,
            headers: RequestTranslation.headers(head.headers), client: client,
            server: RequestTranslation.address(context.channel.localAddress))
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

        let loop = context.eventLoop
        let handler = NIOLoopBound(self, eventLoop: loop)
        let boundContext = NIOLoopBound(context, eventLoop: loop)
        server.router.register(reply) { response in
            loop.execute { handler.value.handleReply(response, context: boundContext.value) }
        }
        inFlight = true
        ServerMetrics.httpInFlight.increment()
        let sender = connectionSender(context: context)
        sender.resume()
        sender.send(request.message, to: ASGIChannel.httpRequest)
        if let bodyChannel = request.bodyChannel {
            for chunk in chunks { sender.send(chunk.message, to: bodyChannel) }
        }
        if streaming { sendBodyChunks(context: context, final: false) }
    }

    private func connectionSender(context: ChannelHandlerContext) -> LayerSender {
        if let sender { return sender }
        // Body chunks are large: reading pauses while two messages wait for the layer, so an
        // upload holds about two chunks in the server (one request alone never pauses it).
        let sender = server.makeSender(on: context.eventLoop, outageTimeout: .zero, heldLimit: 2)
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let boundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
        let channel = context.channel
        sender.onGiveUp = { reason in handler.value.sendFailed(full: reason == .full, context: boundContext.value) }
        sender.setReading = { reading in
            _ = channel.setOption(ChannelOptions.autoRead, value: reading)
            // Time the server itself stops reading is not the client's pause.
            let handler = handler.value
            if reading {
                handler.apply(handler.machine.bodyReceived(), context: boundContext.value)
            } else if handler.machine.state == .readingBody {
                handler.apply(.disarm, context: boundContext.value)
            }
        }
        self.sender = sender
        return sender
    }

    private func sendFailed(full: Bool, context: ChannelHandlerContext) {
        guard !responseStarted, replyChannel != nil else { return }
        server.counters.count(.httpUnavailable)
        server.logger.warning(full ? "http.request stayed full; answering 503" : "cannot send http.request; answering 503")
        finishRequest()
        respondPlain(
            context: context, status: .serviceUnavailable,
            text: full ? "Server is busy, try again\n" : "Service unavailable\n", close: false)
    }

    /// No response started within `httpTimeout` (a time to first byte: a started response,
    /// such as a stream of server-sent events, runs as long as the application wants).
    private func timedOut(context: ChannelHandlerContext) {
        guard replyChannel != nil, !responseStarted else { return }
        server.counters.count(.timedOutResponse)
        // The application may still be working on it: tell it the client will not get the answer.
        if let replyChannel, let head {
            let path = PercentCoding.splitTarget(head.uri).path
            connectionSender(context: context).send(
                HTTPDisconnectMessage(replyChannel: replyChannel, path: path).message,
                to: ASGIChannel.httpDisconnect)
        }
        finishRequest()
        respondPlain(context: context, status: .serviceUnavailable, text: "Application timed out\n", close: false)
    }

    private func handleReply(_ reply: Message, context: ChannelHandlerContext) {
        guard replyChannel != nil else { return }
        let response: HTTPResponseMessage
        do {
            response = try HTTPResponseMessage(reply)
        } catch {
            server.logger.error("malformed HTTP reply; answering 500", metadata: ["error": "\(error)", "keys": "\(reply.fieldNames)"])
            server.counters.count(.malformedReplies)
            if responseStarted {
                finishRequest()
                context.close(promise: nil)
            } else {
                finishRequest()
                respondPlain(context: context, status: .internalServerError, text: "Internal server error\n", close: true)
            }
            return
        }
        let content: [UInt8], more: Bool
        switch response {
        case .start(let start) where !responseStarted:
            // A server that is shutting down answers what it holds and closes the connection.
            if server.shuttingDown.load(ordering: .relaxed) { keepAlive = false }
            var headers = RequestTranslation.responseHeaders(start.headers)
            if !start.moreContent, !headers.contains(name: "content-length") {
                headers.replaceOrAdd(name: "content-length", value: String(start.content.count))
            }
            if !keepAlive && !isHTTP2 { headers.replaceOrAdd(name: "connection", value: "close") }
            if isHTTP2 { Self.removeConnectionHeaders(&headers) }
            status = start.status
            responseStarted = true
            disconnectChannel = start.disconnectChannel
            apply(machine.responseStarted(), context: context)
            let head = HTTPResponseHead(
                version: self.head?.version ?? .http1_1, status: HTTPResponseStatus(statusCode: start.status), headers: headers)
            context.write(wrapOutboundOut(.head(head)), promise: nil)
            (content, more) = (start.content, start.moreContent)
        case .start(let start):
            server.logger.warning("a second response start on one request; its content is sent as a chunk")
            (content, more) = (start.content, start.moreContent)
        case .chunk(let chunk) where responseStarted:
            (content, more) = (chunk.content, chunk.moreContent)
        case .chunk:
            server.logger.error(
                "reply without a status before the response started; answering 500", metadata: ["keys": "\(reply.fieldNames)"])
            server.counters.count(.malformedReplies)
            finishRequest()
            respondPlain(context: context, status: .internalServerError, text: "Internal server error\n", close: true)
            return
        }
        if !content.isEmpty {
            responseBytes += content.count
            unwrittenBytes += content.count
            budget?.unwritten += content.count
            let size = content.count
            let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
            let loop = context.eventLoop
            let promise = context.eventLoop.makePromise(of: Void.self)
            promise.futureResult.whenComplete { result in
                let handler = handler.value
                // A failed write (the connection closed) was already taken off by channelInactive.
                guard case .success = result else { return }
                handler.unwrittenBytes -= size
                handler.budget?.unwritten -= size
                handler.lastWriteProgress = loop.now
            }
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: content)))), promise: promise)
            scheduleStallCheck(context: context)
            if unwrittenBytes > server.configuration.maxResponseBufferBytes
                || (budget?.unwritten ?? 0) > server.configuration.maxResponseBufferBytes
            {
                // The client does not read as fast as the application writes, and what waits for
                // it passed the bound: close (the application hears http.disconnect and stops).
                closeSlowClient(context: context)
                return
            }
        }
        if more {
            context.flush()
        } else {
            finishRequest()
            writeEnd(context: context, close: !keepAlive)
        }
    }

    /// Writes the response's end. The state machine hears of it first: NIO hands a pipelined
    /// request over while this write is in progress, and it must find the connection between
    /// requests. The keep-alive deadline starts once everything was written (a slow reader of
    /// a large response is the write-stall deadline's business, not an idle connection).
    private func writeEnd(context: ChannelHandlerContext, close: Bool) {
        let action = machine.responseEnded(keepAlive: !close)
        if case .arm(.body, _) = action { apply(action, context: context) }
        let channel = context.channel
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let boundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in
            if close {
                channel.close(promise: nil)
                return
            }
            let handler = handler.value
            if case .arm(.keepAlive, _) = action, handler.machine.state == .idle(fresh: false), handler.armed == nil {
                handler.apply(action, context: boundContext.value)
            }
        }
    }

    /// The client does not read what is written to it: the connection closes (all of it, on
    /// HTTP/2: the client reads none of its streams), and the application hears `http.disconnect`.
    private func closeSlowClient(context: ChannelHandlerContext) {
        // Once per connection (every stream of an HTTP/2 connection may find it).
        if let budget {
            guard !budget.closing else { return }
            budget.closing = true
        }
        server.counters.count(.closedSlowHTTPClient)
        server.logger.warning(
            "HTTP client not reading its response; closing",
            metadata: [
                "unwritten_bytes": "\(unwrittenBytes)", "path": "\(PercentCoding.splitTarget(self.head?.uri ?? "").path)",
            ])
        // An HTTP/2 stream's parent is its connection (an HTTP/1 connection's parent is the
        // listening socket, which must stay open).
        let connection = budget != nil ? (context.channel.parent ?? context.channel) : context.channel
        connection.close(promise: nil)
    }

    /// While response bytes wait for the client, checks that some are written at least every
    /// `writeTimeout`; a client that reads nothing for that long is closed.
    private func scheduleStallCheck(context: ChannelHandlerContext) {
        guard stallCheck == nil, unwrittenBytes > 0 else { return }
        if lastWriteProgress < started { lastWriteProgress = context.eventLoop.now }
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let boundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
        let timeout = TimeAmount(server.configuration.writeTimeout)
        stallCheck = context.eventLoop.scheduleTask(deadline: lastWriteProgress + timeout) {
            let handler = handler.value
            handler.stallCheck = nil
            guard handler.unwrittenBytes > 0 else { return }
            if boundContext.value.eventLoop.now - handler.lastWriteProgress >= timeout {
                handler.closeSlowClient(context: boundContext.value)
            } else {
                handler.scheduleStallCheck(context: boundContext.value)
            }
        }
    }

    /// HTTP/2 forbids connection-specific headers (RFC 9113 8.2.2); an application's are dropped.
    private static func removeConnectionHeaders(_ headers: inout HTTPHeaders) {
        for name in ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"] {
            headers.remove(name: name)
        }
    }

    private var isHTTP2: Bool { (head?.version.major ?? 1) >= 2 }

    /// Forgets the request in flight and writes its access-log line.
    private func finishRequest() {
        leaveFlight()
        if let replyChannel { server.router.unregister(replyChannel) }
        replyChannel = nil
        disconnectChannel = nil
        if let head {
            let elapsed = Double((NIODeadline.now() - started).nanoseconds) / 1e9
            server.accessLog?.http(
                client: clientAddress, method: head.method.rawValue, path: head.uri,
                status: status, size: responseBytes, seconds: elapsed)
        }
        responseStarted = false
        responseBytes = 0
        status = 0
    }

    private func respondPlain(
        context: ChannelHandlerContext, status: HTTPResponseStatus, text: String, close: Bool, closeAfterBody: Bool = false
    ) {
        var headers = HTTPHeaders()
        headers.add(name: "content-type", value: "text/plain; charset=utf-8")
        headers.add(name: "content-length", value: String(text.utf8.count))
        let shouldClose = close || (!keepAlive && !closeAfterBody)
        if (shouldClose || closeAfterBody) && !isHTTP2 { headers.add(name: "connection", value: "close") }
        self.status = Int(status.code)
        _ = machine.responseStarted()
        apply(.disarm, context: context)
        let head = HTTPResponseHead(version: self.head?.version ?? .http1_1, status: status, headers: headers)
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: text)))), promise: nil)
        writeEnd(context: context, close: shouldClose)
    }

    /// The request in flight (if any) is no longer: answered, timed out or abandoned.
    private func leaveFlight() {
        guard inFlight else { return }
        inFlight = false
        ServerMetrics.httpInFlight.decrement()
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
        if let replyChannel, let head {
            // The client left before its response finished: the application hears it on
            // `http.disconnect` and, when the responder named one, on its disconnect channel
            // (a streaming consumer stops there at once).
            let path = PercentCoding.splitTarget(head.uri).path
            let message = HTTPDisconnectMessage(replyChannel: replyChannel, path: path).message
            let sender = connectionSender(context: context)
            sender.resume()
            sender.send(message, to: ASGIChannel.httpDisconnect)
            if let disconnectChannel { sender.send(message, to: disconnectChannel) }
            server.router.unregister(replyChannel)
            self.replyChannel = nil
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
            respondPlain(context: context, status: upgrade.rejectionStatus, text: "WebSocket connection refused\n", close: true)
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
}
