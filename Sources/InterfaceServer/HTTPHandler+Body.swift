import ASGI
import CoreMetrics
import Logging
import NIOCore
import NIOHTTP1

// Request bodies: the server's own refusals, and large bodies streamed to the application.
extension HTTPHandler {
    /// Why the request is answered by the server itself (and not sent to the application), or
    /// nil. The Host check (which counts) runs once per request.
    func refusal(head: HTTPRequestHead) -> (HTTPResponseStatus, String)? {
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
    func sendBodyChunks(context: ChannelHandlerContext, final: Bool) {
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
    func abortStreamedBody(context: ChannelHandlerContext) {
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
}
