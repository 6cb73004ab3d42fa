import ASGI
import CoreMetrics
import DequeModule
import Logging
import NIOCore
import NIOWebSocket

/// What comes from the client: its frames, sent to `websocket.receive` within the socket's
/// share of frames a second, and the close from either side, which tells the application.
extension WebSocketSession {
    /// A message frame from the client.
    func received(text: String?, bytes: [UInt8]?) {
        guard let order = machine.frameReceived() else {
            // After our close frame: dropped, counted (with the close's reason, if it was one).
            if machine.closeFrameSent {
                server.counters.count(.framesAfterClose)
                if let closeDropReason { ServerMetrics.dropped[closeDropReason]?.increment() }
            }
            return
        }
        let message = WebSocketReceiveMessage(
            replyChannel: ReplyChannelName(trusted: replyChannel), path: path, order: order,
            data: text.map { .text($0) } ?? .bytes(bytes ?? []))
        guard limiter != nil else {
            sender.send(message.message, to: ASGIChannel.websocketReceive)
            return
        }
        guard paced.count < pacedLimit else {
            frameFlood()
            return
        }
        paced.append(message)
        sendPaced()
    }

    /// Frames past the socket's share the server holds for it: ten seconds' share (at least
    /// 1,000), kept as typed messages (about 64 bytes a small frame, the layer's message is made
    /// when the frame's turn comes). Reading pauses at the share, so only what a read brings can
    /// pile up; a client that packs more than ten seconds' share into one write is not pacing
    /// itself at all.
    private var pacedLimit: Int { max(10 * server.configuration.maxFramesPerSecond, 1_000) }

    /// More frames past the share than the server holds: closed with 1008 (policy), and the
    /// frames waiting for their share are dropped (counted). Dropping only the excess would
    /// lose a client's messages without its knowing; a close tells it.
    private func frameFlood() {
        guard !machine.closeFrameSent else { return }
        server.counters.count(.closedFrameFlood)
        server.counters.count(.heldDropped, by: paced.count + 1)
        ServerMetrics.dropped[.rateExceeded]?.increment(by: paced.count + 1)
        server.logger.warning(
            "closing a WebSocket that sent more frames at once than its share allows (1008)",
            metadata: [
                "socket": "\(server.configuration.secret.socketTag(replyChannel))",
                "limit": "\(server.configuration.maxFramesPerSecond)",
            ])
        // Their orders (and this frame's) are not the application's to wait for.
        sender.skipOrders(paced.count + 1)
        paced.removeAll()
        closeDropReason = .rateExceeded
        close(code: 1008, force: true)
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
            sender.send(next.message, to: ASGIChannel.websocketReceive)
        }
        if ratePaused {
            ratePaused = false
            updateReading()
        }
    }

    /// Closes from our side with `code`, and tells the application. The close frame gets a few
    /// seconds to leave; with `force` (a client that does not read) the connection closes at once.
    func close(code: UInt16, force: Bool = false) {
        let disconnectOrder: Int64
        switch machine.close(code: code) {
        case .none:
            return
        case .refuse(let why, let order):
            refused(why, disconnectOrder: order)
            return
        case .sendCloseFrame(_, let order):
            disconnectOrder = order
        }
        // Before the write: a write that completes at once closes the channel, and its
        // channelInactive must not report 1006 first.
        sendDisconnect(code: Int64(code), order: disconnectOrder)
        if let context {
            sendHeldFrames()
            var data = context.channel.allocator.buffer(capacity: 2)
            data.writeInteger(code)
            let frame = WebSocketFrame(fin: true, opcode: .connectionClose, data: data)
            let channel = context.channel
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
                updateReading()
                channel.eventLoop.scheduleTask(in: .seconds(5)) { channel.close(promise: nil) }
            }
        }
    }

    /// The client closed (with a close frame) or the connection dropped (1006).
    func clientClosed(code: UInt16) {
        if let order = machine.clientClosed() { sendDisconnect(code: Int64(code), order: order) }
    }

    private func sendDisconnect(code: Int64, order: Int64) {
        // Frames still waiting for their share go first, in order, before the disconnect.
        pacingTimer?.cancel()
        pacingTimer = nil
        while let next = paced.popFirst() { sender.send(next.message, to: ASGIChannel.websocketReceive) }
        pingWheel?.remove(self)
        pingWheel = nil
        lifetime?.cancel()
        server.untrackSocket(ObjectIdentifier(self))
        server.router.unregister(replyChannel)
        subscriptionsEnded()
        server.accessLog?.websocket(client: client, event: "DISCONNECT", path: path, detail: "\(code)")
        sender.send(
            WebSocketDisconnectMessage(replyChannel: ReplyChannelName(trusted: replyChannel), code: Int(code), path: path, order: order)
                .message,
            to: ASGIChannel.websocketDisconnect, outlivesGiveUp: true)
    }
}
