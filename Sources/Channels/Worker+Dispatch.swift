import ASGI
import CoreMetrics
import Logging
import OrderedCollections
import Synchronization

/// Running one message: the consumer its route names (with the middleware, hooks and the
/// per-consumer deadline around it), a retry for a full channel, and what no route takes.
extension Worker {
    /// The socket a WebSocket message belongs to (its reply channel), or the sequence of an
    /// ordered hand-off's message; nil for other messages. One key's messages run one after
    /// another in this process, in the order taken.
    static func socketKey(_ received: ReceivedMessage) -> String? {
        if received.channel.hasPrefix("websocket.") { return received.message.replyChannel }
        // The messages of one ordered hand-off (``inSendOrder(_:)``) too: run together, a burst's
        // next message is due when it starts, instead of parked and taken back (three round
        // trips) while the one before it runs.
        guard let key = received.message[OrderedHandoff.keyField]?.stringValue else { return nil }
        return "\(received.channel) \(key)"
    }

    /// Runs the consumer for one message (public for test harnesses).
    public func dispatch(_ received: ReceivedMessage) async {
        await dispatchTimed(received)
    }

    /// `dispatch`; true when the consumer was cancelled at `consumerTimeout`. `lease` is the
    /// slot it runs on, given back early if it ignores its cancellation.
    @discardableResult
    func dispatchTimed(_ received: ReceivedMessage, lease: SlotLease? = nil) async -> Bool {
        processed.add(1, ordering: .relaxed)
        ChannelsMetrics.received[ChannelKind(channel: received.channel)]?.increment()
        let context: ConsumerContext
        guard let (routed, parameters, name) = router.match(channel: received.channel, message: received.message) else {
            await unrouted(received)
            return false
        }
        // Every line the consumer logs says which message it was handling (the context adds
        // that metadata when the consumer asks for its logger).
        context = ConsumerContext(
            message: received.message, channel: received.channel, parameters: parameters, layer: layer,
            logger: logger, environment: environment, consumerName: name
        ) { [weak self] parked in
            await self?.dispatch(parked)
        }
        let consumer = middleware.isEmpty ? routed : middleware.wrapping(routed)
        await hooks.consumerStarted?(context)
        var failure: (any Error)?
        let started = ContinuousClock.now
        defer { ChannelsMetrics.route(name).duration.recordNanoseconds((ContinuousClock.now - started).nanoseconds) }
        // Cancellable by its timeout, and by the client leaving a streamed response.
        let handle = TaskHandle()
        // Responses that stream, and uploads that stream in, are bounded by their client instead.
        let uploading = received.channel == ASGIChannel.httpRequest && received.message["body_channel"] != nil
        var abandon: (@Sendable () -> Void)?
        if let lease { abandon = { lease.giveBack() } }
        let deadline = deadlines?.begin(handle, name: name, context: context, uploading: uploading, abandon: abandon)
        do {
            if received.channel == ASGIChannel.httpRequest {
                context.streaming.withLock { $0 = (streams, handle) }
                context.slot.withLock { $0 = lease }
                defer { if let channel = context.streamChannel.withLock({ $0 }) { streams.finished(channel, layer: layer) } }
                try await handle.running {
                    try await ConsumerContext.$current.withValue(context) { try await consumer(context) }
                }
            } else {
                try await handle.running {
                    try await ConsumerContext.$current.withValue(context) { try await consumer(context) }
                }
            }
        } catch is CancellationError where context.streaming.withLock({ $0?.handle.cancelled }) == true {
            failure = CancellationError()
            logger.debug("streamed response stopped: the client left", metadata: ["consumer": "\(name)"])
        } catch ConsumerError.denyConnection {
            failure = ConsumerError.denyConnection
            let answer = received.channel == ASGIChannel.websocketConnect ? WebSocketSendMessage.refuse : .close(code: 1000)
            try? await context.reply(answer)
        } catch ConsumerError.close(let code) {
            failure = ConsumerError.close(code: code)
            try? await context.reply(WebSocketSendMessage.close(code: code))
        } catch ConsumerError.consumeLater {
            failure = ConsumerError.consumeLater
            await requeue(received, consumer: name)
        } catch {
            failure = error
            ChannelsMetrics.route(name).errors.increment()
            logger.error("consumer failed", metadata: ["consumer": "\(name)", "channel": "\(received.channel)", "error": "\(error)"])
            await context.abortOpenResponse()
        }
        let timedOut = deadline.map { deadlines?.end($0) ?? false } ?? false
        // Not for one put back for later (its retry answers), nor one cancelled for another
        // reason than its timeout (its client left, or the worker's shutdown grace ran out).
        if let failure, received.channel == ASGIChannel.httpRequest, !context.replied.load(ordering: .relaxed),
            timedOut || !(failure is CancellationError), !Self.isConsumeLater(failure)
        {
            // Failed (or cancelled at its timeout) before it answered: the client gets 500 (503
            // for the timeout) now, as Django answers an exception, instead of waiting for the
            // server's own timeout and its 503.
            await Self.answerFailedRequest(context, timedOut: timedOut, logger: logger)
        }
        await context.flush()
        await hooks.consumerFinished?(context, failure)
        let dropped = context.droppedSends.load(ordering: .relaxed)
        sendsDropped.add(dropped, ordering: .relaxed)
        if dropped > 0 { ChannelsMetrics.dropped[.retriesExhausted]?.increment(by: dropped) }
        return timedOut
    }

    private static func isConsumeLater(_ error: any Error) -> Bool {
        if case .consumeLater? = error as? ConsumerError { return true }
        return false
    }

    /// The error response of an HTTP consumer that failed before it answered.
    private static func answerFailedRequest(_ context: ConsumerContext, timedOut: Bool, logger: Logger) async {
        let answer = HTTPResponseStart(
            status: timedOut ? 503 : 500, headers: [("content-type", "text/plain; charset=utf-8")],
            content: Array((timedOut ? "Service Unavailable: the application took too long\n" : "Internal Server Error\n").utf8))
        do {
            try await context.reply(answer, immediately: true)
        } catch {
            logger.warning("could not answer a failed request", metadata: ["error": "\(error)"])
        }
    }

    /// Buffered sends of consumers that were dropped after their retries.
    public var messagesDroppedOnSend: Int { sendsDropped.load(ordering: .relaxed) }
    /// Messages on channels no route matched (drained so they never fill).
    public var messagesUnrouted: Int { unroutedCount.load(ordering: .relaxed) }

    /// Messages dropped after `maxRetries` re-queues.
    public var messagesDroppedAfterRetries: Int { retriesDropped.load(ordering: .relaxed) }

    /// Puts a message back on its channel for later, counting the retries.
    private func requeue(_ received: ReceivedMessage, consumer: String) async {
        let retries = (received.message[Self.retryKey]?.intValue ?? 0) + 1
        guard retries <= Self.maxRetries else {
            retriesDropped.add(1, ordering: .relaxed)
            ChannelsMetrics.dropped[.retriesExhausted]?.increment()
            logger.warning(
                "dropped a message after \(Self.maxRetries) consume-later retries",
                metadata: ["consumer": "\(consumer)", "channel": "\(received.channel)"])
            return
        }
        var message = received.message
        message.fields[Self.retryKey] = .int(retries)
        do {
            try await layer.send(message, to: received.channel)
        } catch {
            logger.error(
                "could not re-queue a consume-later message",
                metadata: ["consumer": "\(consumer)", "channel": "\(received.channel)", "error": "\(error)"])
        }
    }

    private func unrouted(_ received: ReceivedMessage) async {
        unroutedCount.add(1, ordering: .relaxed)
        let reply = received.message.replyChannel
        switch received.channel {
        case ASGIChannel.websocketConnect:
            if let reply { try? await layer.send(WebSocketSendMessage.accept.message, to: reply) }
        case ASGIChannel.httpRequest:
            if let reply {
                let notFound = HTTPResponseStart(
                    status: 404, headers: [("content-type", "text/plain; charset=utf-8")],
                    content: Array("Not found\n".utf8))
                try? await layer.send(notFound.message, to: reply)
            }
        case ASGIChannel.websocketDisconnect where reply != nil:
            // A socket's channel session (and the ordered hand-offs it started) ends with the
            // socket even when no consumer handles its disconnect.
            let context = ConsumerContext(
                message: received.message, channel: received.channel, parameters: [:], layer: layer, logger: logger,
                environment: environment, consumerName: nil, dispatcher: nil)
            do {
                try await channelSession { _ in }(context)
            } catch {
                logger.warning("could not delete a closed socket's channel session", metadata: ["error": "\(error)"])
            }
            await context.flush()
        case ASGIChannel.websocketReceive, ASGIChannel.websocketDisconnect, ASGIChannel.httpDisconnect:
            logger.debug("unrouted message drained", metadata: ["channel": "\(received.channel)"])
        default:
            logger.info("dropped an unrouted message", metadata: ["channel": "\(received.channel)"])
        }
    }
}
