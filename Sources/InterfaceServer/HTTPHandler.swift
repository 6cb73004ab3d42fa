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
    private var replyChannel: String?
    private var responseStarted = false
    private var responseBytes = 0
    private var status = 0
    private var started = NIODeadline.now()
    private var timeout: Scheduled<Void>?
    private var keepAlive = true
    /// Whether a dispatched request is waiting for its response (for the in-flight gauge).
    private var inFlight = false
    private var clientAddress = "-"
    private var headersTooLarge = false
    /// This connection's messages to the layer; a full `http.request` is retried for a bounded
    /// time with reading paused, an unreachable layer answers 503 at once.
    private var sender: LayerSender?

    init(server: ServerContext, upgrade: UpgradeState) {
        self.server = server
        self.upgrade = upgrade
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            self.head = head
            body = nil
            bodyTooLarge = false
            started = .now()
            keepAlive = head.isKeepAlive
            clientAddress = RequestTranslation.clientDescription(
                head: head, remote: context.channel.remoteAddress,
                proxyHeaders: server.configuration.proxyHeaders)
            if let length = head.headers.first(name: "content-length").flatMap(Int.init), length > server.configuration.maxBodySize {
                bodyTooLarge = true
            }
            // The parser bounds what it buffers (about 80 KiB); our own, lower limit answers 431.
            var headerBytes = head.uri.utf8.count
            for (name, value) in head.headers { headerBytes += name.utf8.count + value.utf8.count + 4 }
            headersTooLarge = headerBytes > server.configuration.maxHeaderSize
        case .body(var chunk):
            guard !bodyTooLarge else { return }
            if (body?.readableBytes ?? 0) + chunk.readableBytes > server.configuration.maxBodySize {
                bodyTooLarge = true
                body = nil
                return
            }
            if body == nil { body = chunk } else { body!.writeBuffer(&chunk) }
        case .end:
            guard let head else { return }
            ServerMetrics.httpRequests.increment()
            if headersTooLarge || bodyTooLarge { ServerMetrics.dropped[.tooLarge]?.increment() }
            if upgrade.refusalAnswered {
                // errorCaught already answered this refused upgrade (and closes the connection):
                // a second answer would be a response without a request.
                upgrade.refusalAnswered = false
            } else if upgrade.rejected {
                upgrade.rejected = false
                respondPlain(context: context, status: upgrade.rejectionStatus, text: "WebSocket connection refused\n", close: true)
            } else if headersTooLarge {
                respondPlain(context: context, status: .requestHeaderFieldsTooLarge, text: "Request headers too large\n", close: true)
            } else if bodyTooLarge {
                respondPlain(context: context, status: .payloadTooLarge, text: "Request body too large\n", close: true)
            } else if !server.hostAllowed(head) {
                respondPlain(context: context, status: .badRequest, text: "Bad Request (invalid Host header)\n", close: true)
            } else {
                dispatch(context: context, head: head)
            }
        }
    }

    private func dispatch(context: ChannelHandlerContext, head: HTTPRequestHead) {
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

        let loop = context.eventLoop
        let handler = NIOLoopBound(self, eventLoop: loop)
        let boundContext = NIOLoopBound(context, eventLoop: loop)
        server.router.register(reply) { response in
            loop.execute { handler.value.handleReply(response, context: boundContext.value) }
        }
        timeout = loop.scheduleTask(in: TimeAmount(server.configuration.httpTimeout)) {
            handler.value.timedOut(context: boundContext.value)
        }
        inFlight = true
        ServerMetrics.httpInFlight.increment()
        let sender = connectionSender(context: context)
        sender.resume()
        sender.send(request.message, to: ASGIChannel.httpRequest)
        if let bodyChannel = request.bodyChannel {
            for chunk in chunks { sender.send(chunk.message, to: bodyChannel) }
        }
    }

    private func connectionSender(context: ChannelHandlerContext) -> LayerSender {
        if let sender { return sender }
        let sender = server.makeSender(on: context.eventLoop, outageTimeout: .zero)
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let boundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
        let channel = context.channel
        sender.onGiveUp = { reason in handler.value.sendFailed(full: reason == .full, context: boundContext.value) }
        sender.setReading = { reading in _ = channel.setOption(ChannelOptions.autoRead, value: reading) }
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

    private func timedOut(context: ChannelHandlerContext) {
        guard replyChannel != nil else { return }
        if responseStarted {
            finishRequest()
            context.close(promise: nil)
        } else {
            finishRequest()
            respondPlain(context: context, status: .serviceUnavailable, text: "Application timed out\n", close: false)
        }
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
            if !keepAlive { headers.replaceOrAdd(name: "connection", value: "close") }
            status = start.status
            responseStarted = true
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
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: content)))), promise: nil)
        }
        if more {
            context.flush()
        } else {
            finishRequest()
            let close = !keepAlive
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in
                if close { channel.close(promise: nil) }
            }
        }
    }

    /// Forgets the request in flight and writes its access-log line.
    private func finishRequest() {
        leaveFlight()
        if let replyChannel { server.router.unregister(replyChannel) }
        replyChannel = nil
        timeout?.cancel()
        timeout = nil
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

    private func respondPlain(context: ChannelHandlerContext, status: HTTPResponseStatus, text: String, close: Bool) {
        var headers = HTTPHeaders()
        headers.add(name: "content-type", value: "text/plain; charset=utf-8")
        headers.add(name: "content-length", value: String(text.utf8.count))
        let shouldClose = close || !keepAlive
        if shouldClose { headers.add(name: "connection", value: "close") }
        self.status = Int(status.code)
        let head = HTTPResponseHead(version: self.head?.version ?? .http1_1, status: status, headers: headers)
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: text)))), promise: nil)
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in
            if shouldClose { channel.close(promise: nil) }
        }
    }

    /// The request in flight (if any) is no longer: answered, timed out or abandoned.
    private func leaveFlight() {
        guard inFlight else { return }
        inFlight = false
        ServerMetrics.httpInFlight.decrement()
    }

    func channelInactive(context: ChannelHandlerContext) {
        leaveFlight()
        if let replyChannel, let head {
            // The client left before its response finished.
            let path = PercentCoding.splitTarget(head.uri).path
            connectionSender(context: context).send(
                HTTPDisconnectMessage(replyChannel: replyChannel, path: path).message,
                to: ASGIChannel.httpDisconnect)
            server.router.unregister(replyChannel)
            self.replyChannel = nil
            timeout?.cancel()
        }
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
    var rejected = false
    /// The refusal was answered from `errorCaught`; the request's end must not answer again.
    var refusalAnswered = false
    var rejectionStatus: HTTPResponseStatus = .forbidden
}
