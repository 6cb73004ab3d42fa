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
    /// bound: held for the batch's end (``endReplyBatch()``) and its direct send, or written
    /// past the encoder when the channel still holds bytes.
    func writeInBatch(_ frame: ByteBuffer) {
        guard surelyWritable || (frameChannel?.isWritable ?? true) else { return slowClient() }
        if directClear() {
            if directFirst == nil { directFirst = frame } else { directMore.append(frame) }
        } else {
            // The channel holds bytes (a slow reader): frames go into it as they come, so its
            // bound sees each one (not a batch's worth held outside it).
            guard let encodedFrames = encodedFramesContext else { return }
            if directFirst != nil { moveHeldFrames(to: encodedFrames) }
            encodedFrames.write(NIOAny(frame), promise: nil)
        }
        heldBytes += frame.readableBytes
        // Held frames are not in the channel yet, so its bound does not see them: they leave
        // before they could pass it (a bound under 256 KiB included).
        guard heldBytes >= min(Self.flushWithinBatch, server.configuration.maxQueuedBytesPerSocket) else {
            flushHeld = true
            return
        }
        flushHeld = false
        heldBytes = 0
        flushBatch()
    }

    /// Nothing entered the channel since it last held nothing: it is below its high-water mark.
    private var surelyWritable: Bool { directDescriptor >= 0 && !channelEntered }

    /// Whether a direct send now cannot overtake bytes the channel still holds (and the channel
    /// is open): after a write entered it, the channel is asked until it holds nothing.
    private func directClear() -> Bool {
        guard directDescriptor >= 0 else { return false }
        guard channelEntered else { return true }
        guard let channel = frameChannel,
            let unwritten = try? channel.syncOptions?.getOption(ChannelOptions.bufferedWritableBytes), unwritten == 0
        else { return false }
        channelEntered = false
        return true
    }

    /// The batch's frames leave: held ones through the socket's own system call when the
    /// channel has nothing unwritten (see `DirectSocket.swift`), and what the kernel did not
    /// take, or everything when the channel still has bytes to write, through the channel.
    func flushBatch() {
        guard let first = directFirst else {
            // From where the batch wrote (past the encoder): no walk through the handlers between.
            encodedFramesContext?.flush()
            return
        }
        directFirst = nil
        var wanted = first.readableBytes
        for frame in directMore { wanted += frame.readableBytes }
        var sent = 0
        if directClear() {
            sent = DirectSocket.send(first, directMore, on: directDescriptor)
            server.counters.directSends.wrappingAdd(1, ordering: .relaxed)
            if sent == wanted {
                if !directMore.isEmpty { directMore.removeAll(keepingCapacity: true) }
                return
            }
            server.counters.directRemainders.wrappingAdd(1, ordering: .relaxed)
        }
        guard let encodedFrames = encodedFramesContext else {
            directMore.removeAll(keepingCapacity: true)
            return
        }
        var rest = false
        for var frame in CollectionOfOne(first) + directMore {
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
        directMore.removeAll(keepingCapacity: true)
        if rest { encodedFrames.flush() }
    }

    /// Held frames written into the channel, in order, unflushed.
    private func moveHeldFrames(to encodedFrames: ChannelHandlerContext) {
        if let first = directFirst { encodedFrames.write(NIOAny(first), promise: nil) }
        for frame in directMore { encodedFrames.write(NIOAny(frame), promise: nil) }
        directFirst = nil
        directMore.removeAll(keepingCapacity: true)
    }

    /// Frames of a batch held for one system call go out before any other write of the socket
    /// (a close frame, a frame written one by one), in the order they were written.
    func sendHeldFrames() {
        guard directFirst != nil else { return }
        flushHeld = false
        heldBytes = 0
        flushBatch()
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
        closeDropReason = .slowClient
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
