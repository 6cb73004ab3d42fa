import ASGI
import CoreMetrics
import Logging
import NIOCore
import NIOWebSocket
import Synchronization

/// Frames to the client: written one by one, or inside a reply batch past the frame encoder
/// (encoded once for every member), with the socket's unwritten bytes bounded: a client that
/// does not read is closed (1008) instead of holding the server's memory.
extension WebSocketSession {
    /// One frame to the client, unless the socket's unwritten bytes are past their bound.
    func write(_ data: ByteBuffer, opcode: WebSocketOpcode, context: ChannelHandlerContext) {
        sendHeldFrames()
        guard context.channel.isWritable else { return slowClient() }
        context.writeAndFlush(NIOAny(WebSocketFrame(fin: true, opcode: opcode, data: data)), promise: nil)
    }

    /// An encoded frame of the router's batch, unless the socket's unwritten bytes are past their
    /// bound: written past the encoder, flushed at the batch's end (``endReplyBatch()``).
    func writeInBatch(_ frame: ByteBuffer, at encodedFrames: ChannelHandlerContext) {
        guard direct?.surelyWritable == true || (frameChannel ?? encodedFrames.channel).isWritable else {
            return slowClient()
        }
        if let direct, let channel = frameChannel, direct.clear(channel) {
            directHeld.append(frame)
        } else {
            // The channel holds bytes (a slow reader): frames go into it as they come, so its
            // bound sees each one (not a batch's worth held outside it).
            if !directHeld.isEmpty { moveHeldFrames(to: encodedFrames) }
            encodedFrames.write(NIOAny(frame), promise: nil)
        }
        heldBytes += frame.readableBytes
        guard heldBytes >= Self.flushWithinBatch else {
            flushHeld = true
            return
        }
        flushHeld = false
        heldBytes = 0
        flushBatch(at: encodedFrames)
    }

    /// The batch's frames leave: held ones through the socket's own system call when the
    /// channel has nothing unwritten (see ``DirectSocket``), and what the kernel did not take, or
    /// everything when the channel still has bytes to write, through the channel.
    func flushBatch(at encodedFrames: ChannelHandlerContext) {
        guard !directHeld.isEmpty else { return encodedFrames.flush() }
        var sent = 0
        if let direct, let channel = frameChannel, direct.clear(channel) {
            sent = direct.send(directHeld)
            server.counters.directSends.wrappingAdd(1, ordering: .relaxed)
            if sent < heldBytesOf(directHeld) { server.counters.directRemainders.wrappingAdd(1, ordering: .relaxed) }
        }
        var rest = false
        for var frame in directHeld {
            if sent >= frame.readableBytes {
                sent -= frame.readableBytes
                continue
            }
            if sent > 0 {
                frame.moveReaderIndex(forwardBy: sent)
                sent = 0
            }
            encodedFrames.write(NIOAny(frame), promise: nil)
            rest = true
        }
        directHeld.removeAll(keepingCapacity: true)
        if rest { encodedFrames.flush() }
    }

    /// Held frames written into the channel, in order, unflushed.
    private func moveHeldFrames(to encodedFrames: ChannelHandlerContext) {
        for frame in directHeld { encodedFrames.write(NIOAny(frame), promise: nil) }
        directHeld.removeAll(keepingCapacity: true)
    }

    private func heldBytesOf(_ frames: [ByteBuffer]) -> Int {
        var total = 0
        for frame in frames { total += frame.readableBytes }
        return total
    }

    /// Frames of a batch held for one system call go out before any other write of the socket
    /// (a close frame, a frame written one by one), in the order they were written.
    func sendHeldFrames() {
        guard !directHeld.isEmpty, let encodedFrames = encodedFramesContext else { return }
        flushHeld = false
        heldBytes = 0
        flushBatch(at: encodedFrames)
    }

    /// The socket's bound of bytes written and not yet taken by the kernel, kept by the channel
    /// itself: past it the channel is not writable, and the next frame closes the socket.
    func boundUnwrittenBytes(_ channel: any Channel) {
        let bound = server.configuration.maxQueuedBytesPerSocket
        try? channel.syncOptions?.setOption(
            ChannelOptions.writeBufferWaterMark, value: ChannelOptions.Types.WriteBufferWaterMark(low: bound, high: bound))
    }

    /// The client does not read what it is sent: past the bound, close it rather than keep
    /// buffering (or slow anyone else down).
    func slowClient() {
        guard !closedAsSlow else { return }
        closedAsSlow = true
        let queued = (try? channel.syncOptions?.getOption(ChannelOptions.bufferedWritableBytes)) ?? nil
        server.counters.count(.closedSlowClient)
        // The frame that did not fit is not written: a drop, counted as such.
        ServerMetrics.dropped[.slowClient]?.increment()
        server.logger.warning(
            "closing a WebSocket whose client does not read (1008)",
            metadata: [
                "socket": "\(server.configuration.secret.socketTag(replyChannel))", "queued_bytes": "\(queued ?? -1)",
                "limit": "\(server.configuration.maxQueuedBytesPerSocket)",
            ])
        close(code: 1008, force: true)
    }
}
