import ASGI
import CoreMetrics
import Logging
import NIOCore
import NIOHTTP1

// The connection's deadlines: the state machine's actions, and the one lazily rescheduled timer.
extension HTTPHandler {
    func open(context: ChannelHandlerContext) {
        guard !opened else { return }
        opened = true
        if let activity {
            let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
            let boundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
            activity.onBytes = { handler.value.apply(handler.value.machine.bytesArrived(), context: boundContext.value) }
            activity.watching = true
        }
        let action = machine.opened()
        if let openedAt, case .arm(let kind, let after) = action {
            // Bytes came before this handler did: the deadline runs from the connection's opening.
            apply(.none, context: context)
            let at = openedAt + TimeAmount(after)
            armed = (kind, at)
            startTimer(at: at, context: context)
        } else {
            apply(action, context: context)
        }
    }

    /// Does what the state machine answered.
    func apply(_ action: HTTPConnectionStateMachine.Action, context: ChannelHandlerContext) {
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

    func startTimer(at: NIODeadline, context: ChannelHandlerContext) {
        timer?.cancel()
        timerAt = at
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let boundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
        timer = context.eventLoop.scheduleTask(deadline: at) {
            handler.value.timerFired(context: boundContext.value)
        }
    }

    func stopTimer() {
        timer?.cancel()
        timer = nil
        timerAt = .distantFuture
        armed = nil
    }

    func timerFired(context: ChannelHandlerContext) {
        timer = nil
        timerAt = .distantFuture
        guard let (kind, at) = armed else { return }
        if at > context.eventLoop.now {
            startTimer(at: at, context: context)
            return
        }
        deadlinePassed(kind, context: context)
    }

    func deadlinePassed(_ kind: HTTPConnectionStateMachine.Deadline, context: ChannelHandlerContext) {
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

    /// The sender's callbacks hold this handler: they are let go once the connection is done
    /// (the sender itself finishes what it holds, such as an `http.disconnect`).
    func releaseSender() {
        sender?.onGiveUp = nil
        sender?.setReading = nil
        sender = nil
    }
}
