import ASGI
import CoreMetrics
import Logging
import NIOCore
import NIOWebSocket

/// Frames to the client: written one by one, or inside a reply batch past the frame encoder
/// (encoded once for every member), with the socket's unwritten bytes bounded: a client that
/// does not read is closed (1008) instead of holding the server's memory.
extension WebSocketSession {
    /// One frame to the client, unless the socket's unwritten bytes are past their bound.
    func write(_ data: ByteBuffer, opcode: WebSocketOpcode, context: ChannelHandlerContext) {
        guard context.channel.isWritable else { return slowClient() }
        context.writeAndFlush(NIOAny(WebSocketFrame(fin: true, opcode: opcode, data: data)), promise: nil)
    }

    /// An encoded frame of the router's batch, unless the socket's unwritten bytes are past their
    /// bound: written past the encoder, flushed at the batch's end (``endReplyBatch()``).
    func writeInBatch(_ frame: ByteBuffer, at encodedFrames: ChannelHandlerContext) {
        guard (frameChannel ?? encodedFrames.channel).isWritable else { return slowClient() }
        encodedFrames.write(NIOAny(frame), promise: nil)
        heldBytes += frame.readableBytes
        guard heldBytes >= Self.flushWithinBatch else {
            flushHeld = true
            return
        }
        flushHeld = false
        heldBytes = 0
        encodedFrames.flush()
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
