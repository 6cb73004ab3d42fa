import ASGI
import CoreMetrics
import Logging
import NIOCore
import NIOHTTP1
import Synchronization

// Responses: the application's replies written with a bound on what waits for the client,
// the server's own answers, and the end of a request.
extension HTTPHandler {
    func receiveReply(_ reply: Message) {
        guard replyChannel != nil, let context = replyContext else {
            // The request ended (its client left) after the router found this connection: a
            // streamed response's consumer is told, or it waits out its credit timeout.
            server.router.tellStreamTheClientLeft(reply, replyChannel: "")
            return
        }
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
            bodyWritten = 0
            bodyAcknowledged = 0
            creditTaken = start.takesCredit
            responseNumber &+= 1
            apply(machine.responseStarted(), context: context)
            let head = HTTPResponseHead(
                version: self.head?.version ?? .http1_1, status: HTTPResponseStatus(statusCode: start.status), headers: headers)
            context.write(wrapOutboundOut(.head(head)), promise: nil)
            if self.head?.method == .HEAD {
                // A HEAD response is its headers: it ends here. A streaming consumer is told
                // the client is gone, so it does not make (and push through the layer) a body
                // nobody will get, or keep an event stream open.
                if start.moreContent { tellApplicationClientLeft(context: context) }
                finishRequest()
                writeEnd(context: context, close: !keepAlive)
                return
            }
            (content, more) = (start.content, start.moreContent)
        case .start(let start):
            server.logger.warning("a second response start on one request; its content is sent as a chunk")
            (content, more) = (start.content, start.moreContent)
        case .chunk(let chunk) where chunk.workerLost:
            // This server's own message (``StreamLeaseKeeper``): the worker died mid-response,
            // or only stopped renewing for a lease's length (a pause, a stalled Redis): a live
            // one is told the client is gone, so its consumer stops instead of streaming on to
            // nobody.
            tellApplicationClientLeft(context: context)
            if responseStarted {
                abortResponse(context: context, counter: .httpWorkerLost, why: "the worker sending it stopped (its lease lapsed)")
            } else {
                server.counters.count(.httpWorkerLost)
                server.logger.warning("the worker answering a request stopped (its lease lapsed); answering 503")
                finishRequest()
                respondPlain(context: context, status: .serviceUnavailable, text: "Service unavailable\n", close: true)
            }
            return
        case .chunk(let chunk) where responseStarted && chunk.abort:
            abortResponse(context: context, counter: .httpAborted, why: "the application failed mid-response")
            return
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
        if !content.isEmpty, isHeadOverHTTP2 {
            // HTTP/1.1's encoder drops a HEAD response's body itself; HTTP/2's codec sends it,
            // and the stream is then reset for a content-length violation. The body is counted
            // as written so a streaming consumer's credit keeps flowing.
            responseBytes += content.count
            written(content.count)
        } else if !content.isEmpty {
            responseBytes += content.count
            unwrittenBytes += content.count
            budget?.unwritten += content.count
            let size = content.count
            let number = responseNumber
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
                if handler.responseNumber == number { handler.written(size) }
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

    /// The bytes a worker may have in flight to this response (`response_credit` in the request):
    /// a quarter of what may wait for the client, shared by the streams of an HTTP/2 connection.
    var creditWindow: Int {
        let bound = server.configuration.maxResponseBufferBytes / 4
        return isHTTP2 ? max(64 * 1024, bound / Int(server.configuration.http2MaxConcurrentStreams)) : bound
    }

    /// `size` body bytes reached the client's socket: the worker streaming the response hears
    /// it (``HTTPResponseCredit``) each time another quarter of its credit was written.
    func written(_ size: Int) {
        bodyWritten += size
        guard creditTaken, let disconnectChannel, let context = replyContext,
            bodyWritten - bodyAcknowledged >= max(1, creditWindow / 4)
        else { return }
        bodyAcknowledged = bodyWritten
        connectionSender(context: context).send(HTTPResponseCredit(written: bodyWritten).message, to: disconnectChannel)
    }

    /// Writes the response's end. The state machine hears of it first: NIO hands a pipelined
    /// request over while this write is in progress, and it must find the connection between
    /// requests. The keep-alive deadline starts once everything was written (a slow reader of
    /// a large response is the write-stall deadline's business, not an idle connection).
    func writeEnd(context: ChannelHandlerContext, close: Bool) {
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

    /// The response cannot be completed: what was written is flushed and the connection (an
    /// HTTP/2 stream) is cut, so the client sees an incomplete response, never one that looks
    /// whole or one that never ends.
    func abortResponse(context: ChannelHandlerContext, counter: ServerCounters.Counter, why: String) {
        server.counters.count(counter)
        server.logger.warning(
            "HTTP response cut: \(why)", metadata: ["path": "\(PercentCoding.splitTarget(self.head?.uri ?? "").path)"])
        finishRequest()
        context.flush()
        context.close(promise: nil)
    }

    /// The layer lost its data (Redis restarted empty): a reply this request waits for may be
    /// gone with it. A started response is cut; one not started is answered 503.
    func replyStoreLost() {
        guard replyChannel != nil, let context = replyContext else { return }
        // The consumer may still be sending: it stops (its client is gone for good).
        tellApplicationClientLeft(context: context)
        if responseStarted {
            abortResponse(context: context, counter: .httpStoreLost, why: "the channel layer lost its data")
        } else {
            server.counters.count(.httpStoreLost)
            finishRequest()
            respondPlain(context: context, status: .serviceUnavailable, text: "Service unavailable\n", close: true)
        }
    }

    /// The client does not read what is written to it: the connection closes (all of it, on
    /// HTTP/2: the client reads none of its streams), and the application hears `http.disconnect`.
    func closeSlowClient(context: ChannelHandlerContext) {
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
    func scheduleStallCheck(context: ChannelHandlerContext) {
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
    static func removeConnectionHeaders(_ headers: inout HTTPHeaders) {
        for name in ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"] {
            headers.remove(name: name)
        }
    }

    /// Forgets the request in flight and writes its access-log line.
    func finishRequest() {
        leaveFlight()
        requestBodyChannel = nil
        if let replyChannel { server.router.unregister(replyChannel) }
        replyChannel = nil
        replyContext = nil
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

    func respondPlain(
        context: ChannelHandlerContext, status: HTTPResponseStatus, text: String, close: Bool, closeAfterBody: Bool = false,
        headers extra: [(String, String)] = []
    ) {
        var headers = HTTPHeaders()
        headers.add(name: "content-type", value: "text/plain; charset=utf-8")
        for (name, value) in extra { headers.add(name: name, value: value) }
        headers.add(name: "content-length", value: String(text.utf8.count))
        let shouldClose = close || (!keepAlive && !closeAfterBody)
        if (shouldClose || closeAfterBody) && !isHTTP2 { headers.add(name: "connection", value: "close") }
        self.status = Int(status.code)
        _ = machine.responseStarted()
        apply(.disarm, context: context)
        let head = HTTPResponseHead(version: self.head?.version ?? .http1_1, status: status, headers: headers)
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        if !isHeadOverHTTP2 {
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: text)))), promise: nil)
        }
        writeEnd(context: context, close: shouldClose)
    }

    /// The request in flight (if any) is no longer: answered, timed out or abandoned.
    func leaveFlight() {
        guard inFlight else { return }
        inFlight = false
        ServerMetrics.httpInFlight.decrement()
    }

    /// No response started within `httpTimeout` (a time to first byte: a started response,
    /// such as a stream of server-sent events, runs as long as the application wants).
    func timedOut(context: ChannelHandlerContext) {
        guard replyChannel != nil, !responseStarted else { return }
        server.counters.count(.timedOutResponse)
        // The application may still be working on it: tell it the client will not get the answer.
        if let replyChannel, let head {
            let path = PercentCoding.splitTarget(head.uri).path
            connectionSender(context: context).send(
                HTTPDisconnectMessage(replyChannel: ReplyChannelName(trusted: replyChannel), path: path).message,
                to: ASGIChannel.httpDisconnect)
        }
        finishRequest()
        respondPlain(context: context, status: .serviceUnavailable, text: "Application timed out\n", close: false)
    }

    func sendFailed(full: Bool, context: ChannelHandlerContext) {
        if let bodyChannel = requestBodyChannel {
            // The rest of a body sent in chunks is given up (what the client still sends of it
            // is read and dropped, counted): a consumer reading it hears the client is gone (a
            // closed chunk, sent past the give-up on a bound of its own) instead of waiting for
            // chunks that will not come.
            requestBodyChannel = nil
            connectionSender(context: context).send(
                HTTPBodyChunk(content: [], closed: true, moreContent: false).message, to: bodyChannel, outlivesGiveUp: true)
        }
        guard !responseStarted, replyChannel != nil else { return }
        server.counters.count(.httpUnavailable)
        server.logger.warning(full ? "http.request stayed full; answering 503" : "cannot send http.request; answering 503")
        finishRequest()
        respondPlain(
            context: context, status: .serviceUnavailable,
            text: full ? "Server is busy, try again\n" : "Service unavailable\n", close: false)
    }
}
