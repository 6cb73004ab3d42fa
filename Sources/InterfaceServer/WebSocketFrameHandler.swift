import ASGI
import CoreMetrics
import NIOCore
import NIOSSL
import NIOWebSocket

/// Frames of an upgraded connection, after the aggregator has joined fragments.
final class WebSocketFrameHandler: ChannelInboundHandler {
    typealias InboundIn = WebSocketFrame
    typealias OutboundOut = WebSocketFrame

    private let session: WebSocketSession

    init(session: WebSocketSession) {
        self.session = session
    }

    func handlerAdded(context: ChannelHandlerContext) {
        session.attached(context: context)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        switch frame.opcode {
        case .text:
            // Unmasked once (each `unmaskedData` is a copy) and checked as it is made into text.
            let payload = frame.unmaskedData
            guard let text = String(validating: payload.readableBytesView, as: UTF8.self) else {
                session.close(code: 1007)
                return
            }
            session.received(text: text, bytes: nil)
        case .binary:
            session.received(text: nil, bytes: Array(frame.unmaskedData.readableBytesView))
        case .ping:
            // Nothing is written after our close frame (RFC 6455 5.5.1). While the socket is
            // past its bound of unwritten bytes the pong is not written: a client that pings and
            // does not read would otherwise queue pongs without end, and one that reads gets
            // the pong of a later ping (RFC 6455 5.5.3 lets an endpoint answer only the last).
            guard !session.closeFrameSent, context.channel.isWritable else { return }
            let pong = WebSocketFrame(fin: true, opcode: .pong, data: frame.unmaskedData)
            context.writeAndFlush(wrapOutboundOut(pong), promise: nil)
        case .pong:
            session.pongReceived()
        case .connectionClose:
            var data = frame.unmaskedData
            let sent = data.readInteger(as: UInt16.self)
            var code = sent ?? 1005
            // A one-byte payload, or a code that may not be sent (RFC 6455 7.4): a protocol error.
            if (sent == nil && data.readableBytes > 0) || (sent.map { !Self.sendableCloseCode($0) } ?? false) {
                code = 1002
            }
            session.clientClosed(code: code)
            guard !session.closeFrameSent else {
                // The answer to our close frame: the handshake is complete.
                context.close(promise: nil)
                return
            }
            var echo = context.channel.allocator.buffer(capacity: 2)
            echo.writeInteger(code == 1005 ? 1000 : code)
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .connectionClose, data: echo)))
                .whenComplete { _ in channel.close(promise: nil) }
        default:
            break
        }
    }

    /// Close codes an endpoint may send (RFC 6455 7.4.1 and the IANA registry): 1000-1003,
    /// 1007-1014, 3000-4999.
    static func sendableCloseCode(_ code: UInt16) -> Bool {
        (1000...1003).contains(code) || (1007...1014).contains(code) || (3000...4999).contains(code)
    }

    func channelInactive(context: ChannelHandlerContext) {
        session.clientClosed(code: 1006)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // Oversize frames and protocol errors from the frame decoder: close with 1009 / 1002 and
        // tell the application that code (not the 1006 of a dropped connection).
        if let wsError = error as? NIOWebSocketError {
            if wsError == .invalidFrameLength { ServerMetrics.dropped[.tooLarge]?.increment() }
            session.close(code: wsError == .invalidFrameLength ? 1009 : 1002)
        } else if let aggregation = error as? NIOWebSocketFrameAggregator.Error {
            // The aggregator refused a fragmented message: too big (1009) or fragments out of
            // order (a protocol error, 1002).
            switch aggregation {
            case .accumulatedFrameSizeIsTooLarge, .tooManyFragments:
                ServerMetrics.dropped[.tooLarge]?.increment()
                session.close(code: 1009)
            default: session.close(code: 1002)
            }
        } else if error is IOError || error as? NIOSSLError == .uncleanShutdown {
            // The socket itself failed (a reset, a broken pipe, TLS cut without its close): the
            // client is gone, as when the connection drops (1006), not a fault of this server's (1011).
            session.clientClosed(code: 1006)
            context.close(promise: nil)
        } else {
            session.close(code: 1011)
        }
    }
}
