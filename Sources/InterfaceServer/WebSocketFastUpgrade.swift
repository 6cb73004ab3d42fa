import Crypto
import Logging
import NIOCore
import NIOHTTP1
import NIOWebSocket
import Synchronization

/// A connection's first request, read before any HTTP handler exists: when it is a plain
/// WebSocket upgrade that arrived whole, it is upgraded here (the head parsed in place, the
/// 101 written as bytes, the frame handlers added), so a socket that opens, talks and leaves
/// never has NIO's HTTP/1 pipeline built and torn down around its handshake, which was most
/// of the front process's cost per visit. Anything else (another method, a head in pieces, a
/// body, a header this parser does not take as it is, an unsupported version) gets the usual
/// pipeline, which is handed the bytes exactly as they came: it answers as it always did.
///
/// The checks of the handshake itself (host, origin, the application's accept) are the
/// session's, as on the usual path.
final class WebSocketFastUpgradeHandler: StartsWhenActive, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private enum State {
        /// No byte yet (the idle deadline armed).
        case waiting
        /// The head was taken; the application has the handshake (reading paused).
        case held
        /// The connection went to the usual pipeline, or was upgraded.
        case done
    }

    private let server: ServerContext
    private let configuration: ServerConfiguration
    private let senders: ConnectionSenders?
    private var state = State.waiting
    private var idleTimer: Scheduled<Void>?
    private var openedAt: NIODeadline?
    /// Everything read so far (the head and what followed it), for the usual pipeline if the
    /// handshake is refused.
    private var received = ByteBuffer()
    /// The head's length in `received`: what follows it is the client's first frames.
    private var headLength = 0
    private var bytesWhileHeld = 0
    private var key = ""
    private var session: WebSocketSession?
    private let upgrade = UpgradeState()

    init(server: ServerContext, configuration: ServerConfiguration, senders: ConnectionSenders?) {
        self.server = server
        self.configuration = configuration
        self.senders = senders
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        idleTimer?.cancel()
        idleTimer = nil
    }

    /// A connection that sends nothing within the header timeout is closed without an answer,
    /// as the usual pipeline closes it.
    func channelStarted(context: ChannelHandlerContext) {
        guard openedAt == nil, case .waiting = state else { return }
        openedAt = context.eventLoop.now
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        idleTimer = context.eventLoop.scheduleTask(in: TimeAmount(configuration.headerTimeout)) {
            let (handler, context) = bound.value
            guard case .waiting = handler.state else { return }
            handler.state = .done
            handler.server.counters.count(.closedIdle)
            context.close(promise: nil)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        switch state {
        case .done:
            context.fireChannelRead(data)
        case .held:
            // Bounded as on the usual path: reading is paused, so this is what was in flight.
            // Counted from the reads after the head's, as on the usual path.
            let count = bytes.readableBytes
            received.writeBuffer(&bytes)
            if ConnectionActivity.overBound(&bytesWhileHeld, count, "while its WebSocket upgrade was held", server: server) {
                state = .done
                context.close(promise: nil)
            }
        case .waiting:
            idleTimer?.cancel()
            idleTimer = nil
            received = bytes
            guard !server.shuttingDown.load(ordering: .relaxed),
                let upgrade = WebSocketUpgradeHead.parse(bytes, limit: configuration.maxHeaderSize)
            else {
                handOver(context: context, refused: false)
                return
            }
            headLength = upgrade.length
            key = upgrade.key
            hold(context: context, head: upgrade.head)
        }
    }

    /// Gives the handshake to the application, as the usual pipeline's upgrader does.
    private func hold(context: ChannelHandlerContext, head: HTTPRequestHead) {
        state = .held
        upgrade.held = true
        _ = context.channel.setOption(ChannelOptions.autoRead, value: false)
        let promise = context.eventLoop.makePromise(of: HTTPHeaders?.self)
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        // Answered by the session: an accept (headers for the 101), a refusal (nil), possibly
        // before `start` returns.
        promise.futureResult.whenComplete { result in
            let (handler, context) = bound.value
            guard case .held = handler.state, context.channel.isActive else { return }
            switch result {
            case .success(let headers?):
                handler.upgraded(context: context, headers: headers)
            case .success(nil):
                handler.handOver(context: context, refused: true)
            case .failure:
                handler.state = .done
                context.close(promise: nil)
            }
        }
        let session = WebSocketSession(
            server: server, channel: context.channel, head: head, upgrade: upgrade, promise: promise, senders: senders)
        self.session = session
        session.start(head: head)
    }

    /// The application accepted: the 101 (the same bytes NIO's upgrader writes), then the
    /// frame handlers behind this one, the client's early frames to them, and this handler out.
    private func upgraded(context: ChannelHandlerContext, headers: HTTPHeaders) {
        state = .done
        upgrade.held = false
        guard let session else {
            context.close(promise: nil)
            return
        }
        var response = context.channel.allocator.buffer(capacity: 160)
        response.writeString("HTTP/1.1 101 Switching Protocols\r\n")
        for (name, value) in headers {
            let lowered = name.lowercased()
            if lowered == "upgrade" || lowered == "connection" { continue }
            response.writeString("\(name): \(value)\r\n")
        }
        response.writeString("Upgrade: websocket\r\nSec-WebSocket-Accept: ")
        response.writeString(WebSocketUpgradeHead.acceptValue(for: key))
        response.writeString("\r\nConnection: upgrade\r\n\r\n")
        context.writeAndFlush(wrapInboundOut(response), promise: nil)
        _ = context.channel.setOption(ChannelOptions.autoRead, value: true)
        do {
            let sync = context.pipeline.syncOperations
            try sync.addHandler(WebSocketFrameEncoder())
            try sync.addHandler(ByteToMessageHandler(WebSocketFrameDecoder(maxFrameSize: configuration.maxWebSocketMessageSize)))
            try InterfaceServer.addWebSocketHandlers(sync, session: session, configuration: configuration)
        } catch {
            context.close(promise: nil)
            return
        }
        self.session = nil
        server.counters.fastUpgrades.wrappingAdd(1, ordering: .relaxed)
        received.moveReaderIndex(forwardBy: headLength)
        let early = received
        received = ByteBuffer()
        if early.readableBytes > 0 {
            context.fireChannelRead(wrapInboundOut(early))
            context.fireChannelReadComplete()
        }
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }

    /// The usual HTTP/1.1 pipeline behind this handler, given every byte read so far; for a
    /// refused handshake, its upgrader already knows the answer (the session was told once).
    private func handOver(context: ChannelHandlerContext, refused: Bool) {
        state = .done
        session = nil
        do {
            try InterfaceServer.addHTTP1Handlers(
                context.pipeline.syncOperations, context: server, configuration: configuration, senders: senders,
                upgrade: upgrade, firstUpgradeRefused: refused, openedAt: openedAt)
        } catch {
            context.close(promise: nil)
            return
        }
        let bytes = received
        received = ByteBuffer()
        context.fireChannelRead(wrapInboundOut(bytes))
        context.fireChannelReadComplete()
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }
}

/// A WebSocket upgrade request head in the one shape the fast path takes (see
/// ``WebSocketFastUpgradeHandler``): `GET <origin-form> HTTP/1.1`, header lines of token
/// names and visible ASCII values (spaces and tabs inside), one `Host`, `Upgrade: websocket`,
/// a `Connection` naming `upgrade`, one `Sec-WebSocket-Key` and `Sec-WebSocket-Version: 13`, no
/// body, the whole head within `limit` bytes and in the first read. Anything else is nil: the
/// usual pipeline parses it.
struct WebSocketUpgradeHead {
    let head: HTTPRequestHead
    let key: String
    /// The head's bytes, its blank line included.
    let length: Int

    static let maxHeaderLines = 100

    static func parse(_ buffer: ByteBuffer, limit: Int) -> WebSocketUpgradeHead? {
        buffer.withUnsafeReadableBytes { parse(bytes: $0, limit: limit) }
    }

    private static func isTokenByte(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            return true
        case UInt8(ascii: "!"), UInt8(ascii: "#"), UInt8(ascii: "$"), UInt8(ascii: "%"), UInt8(ascii: "&"), UInt8(ascii: "'"),
            UInt8(ascii: "*"), UInt8(ascii: "+"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "^"), UInt8(ascii: "_"),
            UInt8(ascii: "`"), UInt8(ascii: "|"), UInt8(ascii: "~"):
            return true
        default:
            return false
        }
    }

    private static func isTargetByte(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            return true
        case UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"), UInt8(ascii: "!"), UInt8(ascii: "$"),
            UInt8(ascii: "&"), UInt8(ascii: "'"), UInt8(ascii: "("), UInt8(ascii: ")"), UInt8(ascii: "*"), UInt8(ascii: "+"),
            UInt8(ascii: ","), UInt8(ascii: ";"), UInt8(ascii: "="), UInt8(ascii: ":"), UInt8(ascii: "@"), UInt8(ascii: "/"),
            UInt8(ascii: "?"), UInt8(ascii: "%"):
            return true
        default:
            return false
        }
    }

    static func parse(bytes: UnsafeRawBufferPointer, limit: Int) -> WebSocketUpgradeHead? {
        let cr = UInt8(ascii: "\r")
        let lf = UInt8(ascii: "\n")
        let end = min(bytes.count, limit)
        let prefix = Array("GET /".utf8)
        guard end > prefix.count, bytes.starts(with: prefix) else { return nil }
        // The request target: a path and query of RFC 3986's characters (a space ends it).
        var index = 4
        while index < end, isTargetByte(bytes[index]) { index += 1 }
        let target = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[4..<index]), as: UTF8.self)
        let version = Array(" HTTP/1.1\r\n".utf8)
        guard index + version.count <= end, UnsafeRawBufferPointer(rebasing: bytes[index..<index + version.count]).elementsEqual(version)
        else { return nil }
        index += version.count
        var headers: [(String, String)] = []
        var hosts = 0
        var upgrades: [String] = []
        var connectionUpgrade = false
        var keys: [String] = []
        var versions: [String] = []
        while true {
            guard index + 1 < end else { return nil }
            if bytes[index] == cr {
                // The blank line ends the head.
                guard bytes[index + 1] == lf else { return nil }
                index += 2
                break
            }
            guard headers.count < maxHeaderLines else { return nil }
            let nameStart = index
            while index < end, isTokenByte(bytes[index]) { index += 1 }
            guard index > nameStart, index < end, bytes[index] == UInt8(ascii: ":") else { return nil }
            let name = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[nameStart..<index]), as: UTF8.self)
            index += 1
            while index < end, bytes[index] == 0x20 || bytes[index] == 0x09 { index += 1 }
            let valueStart = index
            while index < end, (bytes[index] >= 0x20 && bytes[index] < 0x7F) || bytes[index] == 0x09 { index += 1 }
            guard index + 1 < end, bytes[index] == cr, bytes[index + 1] == lf else { return nil }
            // Trailing spaces: the usual parser's business (how it trims them).
            if index > valueStart, bytes[index - 1] == 0x20 || bytes[index - 1] == 0x09 { return nil }
            let value = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[valueStart..<index]), as: UTF8.self)
            index += 2
            switch name.lowercased() {
            case "host": hosts += 1
            case "upgrade": upgrades.append(value)
            case "connection":
                if namesUpgrade(connection: value) { connectionUpgrade = true }
            case "sec-websocket-key": keys.append(value)
            case "sec-websocket-version": versions.append(value)
            // A body, or a framing header the usual parser rules on.
            case "content-length", "transfer-encoding": return nil
            default: break
            }
            headers.append((name, value))
        }
        guard hosts == 1, connectionUpgrade, upgrades.count == 1, upgrades[0].lowercased() == "websocket",
            versions == ["13"], keys.count == 1, let key = keys.first, !key.isEmpty, !key.contains(",")
        else { return nil }
        return WebSocketUpgradeHead(
            head: HTTPRequestHead(version: .http1_1, method: .GET, uri: target, headers: HTTPHeaders(headers)),
            key: key, length: index)
    }

    /// Whether a `Connection` header value (as NIO hands it: leading spaces gone, trailing ones
    /// kept) names `upgrade` the way NIO's HTTP/1 parser (llhttp) reads it: an element of the
    /// comma-separated list that is `upgrade` in any case after spaces or tabs, followed by
    /// spaces only. NIO's upgrader trims tabs too, so `upgrade<TAB>,` was an upgrade to it and
    /// not to the parser, which then parsed the bytes after the head as HTTP and handed them,
    /// once upgraded, to the frame decoder: the process died (a crash reachable by any client).
    /// A handshake whose `Connection` fails this is refused (400) on every path.
    static func namesUpgrade(connection value: String) -> Bool {
        value.utf8.split(separator: UInt8(ascii: ","), omittingEmptySubsequences: false).contains { element in
            let token = element.drop { $0 == 0x20 || $0 == 0x09 }
            let name = Array("upgrade".utf8)
            guard token.count >= name.count else { return false }
            let head = token.prefix(name.count)
            guard zip(head, name).allSatisfy({ ($0 | 0x20) == $1 }) else { return false }
            return token.dropFirst(name.count).allSatisfy { $0 == 0x20 }
        }
    }

    /// Whether the usual pipeline's parser treats a request head that NIO's upgrader would
    /// upgrade as an upgrade too (see ``namesUpgrade(connection:)``; a `CONNECT` always is).
    /// llhttp reads `Proxy-Connection` as it reads `Connection`.
    static func parserSeesUpgrade(_ head: HTTPRequestHead) -> Bool {
        head.method == .CONNECT
            || (head.headers["connection"] + head.headers["proxy-connection"]).contains { namesUpgrade(connection: $0) }
    }

    /// Whether NIO's HTTP/1 parser stops at this request head (a `CONNECT`, or an upgrade it
    /// reads as one): it hands on nothing after the request, so the bytes a client sends next
    /// pile up unparsed. Such a request that is not upgraded is answered, then the connection
    /// closes, and what the client sends after the request's end is bounded (see
    /// `ConnectionActivity`).
    static func parserStops(at head: HTTPRequestHead) -> Bool {
        head.method == .CONNECT || (head.headers["upgrade"].contains { !$0.isEmpty } && parserSeesUpgrade(head))
    }

    /// `Sec-WebSocket-Accept` for a client's key (RFC 6455, 4.2.2).
    static func acceptValue(for key: String) -> String {
        let digest = Insecure.SHA1.hash(data: Array((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").utf8))
        return base64(Array(digest))
    }

    private static func base64(_ bytes: [UInt8]) -> String {
        let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)
        var out: [UInt8] = []
        out.reserveCapacity((bytes.count + 2) / 3 * 4)
        var index = 0
        while index < bytes.count {
            let a = bytes[index]
            let b = index + 1 < bytes.count ? bytes[index + 1] : 0
            let c = index + 2 < bytes.count ? bytes[index + 2] : 0
            out.append(alphabet[Int(a >> 2)])
            out.append(alphabet[Int((a & 0x03) << 4 | b >> 4)])
            out.append(index + 1 < bytes.count ? alphabet[Int((b & 0x0F) << 2 | c >> 6)] : UInt8(ascii: "="))
            out.append(index + 2 < bytes.count ? alphabet[Int(c & 0x3F)] : UInt8(ascii: "="))
            index += 3
        }
        return String(decoding: out, as: UTF8.self)
    }
}
