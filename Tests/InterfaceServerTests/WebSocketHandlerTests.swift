import ASGI
import Logging
import NIOCore
import NIOEmbedded
import Testing

@testable import InterfaceServer

/// The WebSocket side of the server on a testing channel: the real pipeline (HTTP upgrade,
/// frame decoder, aggregator, our frame handler and session) fed raw client bytes, with an
/// in-memory layer behind it. Fragments, close codes, limits and backpressure, without sockets.
@Suite("WebSocket handling on a testing channel", .timeLimit(.minutes(2)))
struct WebSocketHandlerTests {
    final class Fixture: @unchecked Sendable {
        let layer: InMemoryChannelLayer
        let server: ServerContext
        let channel = NIOAsyncTestingChannel()
        /// Bytes the server wrote that no helper has consumed yet.
        private var unread = ByteBuffer()
        private(set) var replyChannel = ""

        init(capacity: Int = 100, _ configure: (inout ServerConfiguration) -> Void = { _ in }) async throws {
            layer = InMemoryChannelLayer(configuration: .init(capacity: capacity))
            var configuration = ServerConfiguration(host: "127.0.0.1", port: 0)
            configuration.pingInterval = nil
            configure(&configuration)
            let logger = Logger(label: "test")
            let server = ServerContext(
                layer: layer, router: ReplyRouter(layer: layer, prefix: "test", logger: logger),
                configuration: configuration, logger: logger, accessLog: nil)
            self.server = server
            let channel = self.channel
            try await channel.eventLoop.flatSubmit {
                InterfaceServer.configure(channel: channel, context: server, configuration: configuration)
            }.get()
            try await channel.connect(to: SocketAddress(ipAddress: "10.0.0.9", port: 5555))
        }

        /// The next message the server sent to `channel`, typed.
        func next<M: ASGIMessage>(_ channel: String, as type: M.Type) async throws -> M {
            let received = try #require(try await layer.receive(channels: [channel], timeout: .seconds(10)))
            return try M(received.message)
        }

        /// Sends the upgrade request; with `accept`, answers the `websocket.connect` with an
        /// accept and returns the response head.
        @discardableResult
        func open(target: String = "/ws/room?x=1", extraHeaders: String = "", accept: Bool = true) async throws -> (
            connect: WebSocketConnectMessage, head: String
        ) {
            let request =
                "GET \(target) HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                + "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\(extraHeaders)\r\n"
            try await channel.writeInbound(ByteBuffer(string: request))
            let connect = try await next(ASGIChannel.websocketConnect, as: WebSocketConnectMessage.self)
            replyChannel = connect.replyChannel.rawValue
            guard accept else { return (connect, "") }
            reply(WebSocketSendMessage(accept: true))
            return (connect, try await responseHead())
        }

        func reply(_ message: WebSocketSendMessage) {
            server.router.deliver(message.message, to: replyChannel)
        }

        private func more() async throws {
            var buffer = try await channel.waitForOutboundWrite(as: ByteBuffer.self)
            unread.writeBuffer(&buffer)
        }

        func responseHead() async throws -> String {
            while true {
                let bytes = Array(unread.readableBytesView)
                if let end = bytes.indices.dropLast(3).first(where: { Array(bytes[$0..<$0 + 4]) == [13, 10, 13, 10] }) {
                    unread.moveReaderIndex(forwardBy: end + 4)
                    return String(decoding: bytes[..<(end + 4)], as: UTF8.self)
                }
                try await more()
            }
        }

        /// The next frame the server wrote (server frames are never masked).
        func frame() async throws -> (opcode: UInt8, payload: [UInt8]) {
            while true {
                var view = unread
                if let first = view.readInteger(as: UInt8.self), let second = view.readInteger(as: UInt8.self) {
                    var length: Int? = Int(second & 0x7F)
                    if length == 126 { length = view.readInteger(as: UInt16.self).map(Int.init) }
                    if length == 127 { length = view.readInteger(as: UInt64.self).map { Int($0) } }
                    if let length, let payload = view.readBytes(length: length) {
                        unread = view
                        return (first & 0x0F, payload)
                    }
                }
                try await more()
            }
        }

        /// The code of the next frame, which must be a close frame.
        func closeCode() async throws -> UInt16 {
            let (opcode, payload) = try await frame()
            #expect(opcode == 0x8, "expected a close frame")
            return payload.count >= 2 ? UInt16(payload[0]) << 8 | UInt16(payload[1]) : 1005
        }

        /// A client frame: always masked, as RFC 6455 requires.
        func send(opcode: UInt8, _ payload: [UInt8], fin: Bool = true) async throws {
            var buffer = ByteBuffer()
            buffer.writeInteger(UInt8((fin ? 0x80 : 0) | opcode))
            if payload.count < 126 {
                buffer.writeInteger(UInt8(0x80 | payload.count))
            } else if payload.count <= 0xFFFF {
                buffer.writeInteger(UInt8(0x80 | 126))
                buffer.writeInteger(UInt16(payload.count))
            } else {
                buffer.writeInteger(UInt8(0x80 | 127))
                buffer.writeInteger(UInt64(payload.count))
            }
            let mask: [UInt8] = [0x37, 0xFA, 0x21, 0x3D]
            buffer.writeBytes(mask)
            buffer.writeBytes(payload.enumerated().map { $1 ^ mask[$0 % 4] })
            try await channel.writeInbound(buffer)
        }

        func sendClose(code: UInt16) async throws {
            try await send(opcode: 0x8, [UInt8(code >> 8), UInt8(code & 0xFF)])
        }

        /// The last value the server set for reading from the client.
        var reading: Bool {
            channel.options.last { $0.option is ChannelOptions.Types.AutoReadOption }.map { $0.value as! Bool } ?? true
        }
    }

    @Test("the upgrade becomes a typed websocket.connect; the accept answers 101 with the one allowed subprotocol")
    func handshake() async throws {
        let fixture = try await Fixture { $0.websocketProtocols = ["chat"] }
        let (connect, head) = try await fixture.open(extraHeaders: "Sec-WebSocket-Protocol: other, chat\r\n")
        #expect(connect.path == "/ws/room" && connect.queryString == Array("x=1".utf8) && connect.scheme == "ws")
        #expect(connect.order == 0 && connect.client == ASGIAddress(host: "10.0.0.9", port: 5555))
        #expect(connect.headers.first("sec-websocket-protocol") == "other, chat")
        #expect(head.hasPrefix("HTTP/1.1 101 Switching Protocols\r\n"))
        #expect(head.lowercased().contains("sec-websocket-protocol: chat\r\n"))
        #expect(head.lowercased().contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"))
    }

    @Test("a denied connect answers 403 and never upgrades")
    func deniedConnect() async throws {
        let fixture = try await Fixture()
        try await fixture.open(accept: false)
        fixture.reply(WebSocketSendMessage(accept: false))
        let head = try await fixture.responseHead()
        #expect(head.hasPrefix("HTTP/1.1 403 Forbidden\r\n"))
    }

    @Test("fragments join into one websocket.receive, a ping between them is answered, and order counts messages")
    func fragmentsJoin() async throws {
        let fixture = try await Fixture()
        try await fixture.open()
        try await fixture.send(opcode: 0x1, Array("hel".utf8), fin: false)
        try await fixture.send(opcode: 0x9, Array("are you there".utf8))
        try await fixture.send(opcode: 0x0, Array("lo w".utf8), fin: false)
        try await fixture.send(opcode: 0x0, Array("örld".utf8))
        let pong = try await fixture.frame()
        #expect(pong.opcode == 0xA && pong.payload == Array("are you there".utf8))
        let text = try await fixture.next(ASGIChannel.websocketReceive, as: WebSocketReceiveMessage.self)
        #expect(text.data == .text("hello wörld") && text.order == 1 && text.path == "/ws/room")
        try await fixture.send(opcode: 0x2, [0, 1, 2, 255])
        let bytes = try await fixture.next(ASGIChannel.websocketReceive, as: WebSocketReceiveMessage.self)
        #expect(bytes.data == .bytes([0, 1, 2, 255]) && bytes.order == 2)
    }

    @Test("replies are written as frames in order; a reply's close code is sent and reported as the disconnect")
    func repliesAndServerClose() async throws {
        let fixture = try await Fixture()
        try await fixture.open()
        fixture.reply(.text("one"))
        fixture.reply(.bytes([9, 8]))
        fixture.reply(WebSocketSendMessage(data: .text("last"), close: 4003))
        let one = try await fixture.frame(), two = try await fixture.frame(), last = try await fixture.frame()
        #expect(one.opcode == 0x1 && one.payload == Array("one".utf8))
        #expect(two.opcode == 0x2 && two.payload == [9, 8])
        #expect(last.opcode == 0x1 && last.payload == Array("last".utf8))
        #expect(try await fixture.closeCode() == 4003)
        let disconnect = try await fixture.next(ASGIChannel.websocketDisconnect, as: WebSocketDisconnectMessage.self)
        #expect(disconnect.code == 4003 && disconnect.order == 1)
    }

    @Test("a close we start waits for the client's close frame: frames still arriving are ignored, nothing is echoed twice")
    func serverCloseHandshake() async throws {
        let fixture = try await Fixture()
        try await fixture.open()
        fixture.reply(WebSocketSendMessage(close: 1001))
        #expect(try await fixture.closeCode() == 1001)
        // The client has not answered yet: the connection stays open (closing now would reset
        // it and could lose the close frame on the client's side), and its late frames are dropped.
        try await fixture.send(opcode: 0x1, Array("late".utf8))
        #expect(fixture.channel.isActive)
        try await fixture.sendClose(code: 1001)
        try await fixture.channel.closeFuture.get()
        let disconnect = try await fixture.next(ASGIChannel.websocketDisconnect, as: WebSocketDisconnectMessage.self)
        #expect(disconnect.code == 1001 && disconnect.order == 1)
        let written = try await fixture.channel.readOutbound(as: ByteBuffer.self)
        #expect(written == nil, "no second close frame after the client's answer")
    }

    @Test("a client close with a code: the application gets that code, the close is echoed, the connection ends")
    func clientClose() async throws {
        let fixture = try await Fixture()
        try await fixture.open()
        try await fixture.send(opcode: 0x1, Array("bye".utf8))
        try await fixture.sendClose(code: 4001)
        #expect(try await fixture.closeCode() == 4001)
        let receive = try await fixture.next(ASGIChannel.websocketReceive, as: WebSocketReceiveMessage.self)
        let disconnect = try await fixture.next(ASGIChannel.websocketDisconnect, as: WebSocketDisconnectMessage.self)
        #expect(receive.order == 1 && disconnect.code == 4001 && disconnect.order == 2)
        try await fixture.channel.closeFuture.get()
    }

    @Test("text that is not UTF-8 closes with 1007 and tells the application")
    func invalidUTF8() async throws {
        let fixture = try await Fixture()
        try await fixture.open()
        try await fixture.send(opcode: 0x1, [0x68, 0xFF, 0xFE])
        #expect(try await fixture.closeCode() == 1007)
        let disconnect = try await fixture.next(ASGIChannel.websocketDisconnect, as: WebSocketDisconnectMessage.self)
        #expect(disconnect.code == 1007)
    }

    @Test("a message over the size limit in fragments closes with 1009; nothing of it reaches the layer")
    func oversizeFragmentedMessage() async throws {
        let fixture = try await Fixture { $0.maxWebSocketMessageSize = 1024 }
        try await fixture.open()
        try await fixture.send(opcode: 0x1, Array(repeating: 0x61, count: 600), fin: false)
        try await fixture.send(opcode: 0x0, Array(repeating: 0x61, count: 600))
        #expect(try await fixture.closeCode() == 1009)
        let disconnect = try await fixture.next(ASGIChannel.websocketDisconnect, as: WebSocketDisconnectMessage.self)
        #expect(disconnect.code == 1009 && disconnect.order == 1)
        #expect(try await fixture.layer.receive(channels: [ASGIChannel.websocketReceive], timeout: .zero) == nil)
    }

    @Test("a single frame over the size limit closes with 1009")
    func oversizeFrame() async throws {
        let fixture = try await Fixture { $0.maxWebSocketMessageSize = 1024 }
        try await fixture.open()
        try await fixture.send(opcode: 0x2, Array(repeating: 1, count: 2000))
        #expect(try await fixture.closeCode() == 1009)
        let disconnect = try await fixture.next(ASGIChannel.websocketDisconnect, as: WebSocketDisconnectMessage.self)
        #expect(disconnect.code == 1009)
    }

    @Test("a continuation without a first fragment is a protocol error: 1002, not 1009")
    func strayContinuation() async throws {
        let fixture = try await Fixture()
        try await fixture.open()
        try await fixture.send(opcode: 0x0, Array("orphan".utf8))
        #expect(try await fixture.closeCode() == 1002)
        let disconnect = try await fixture.next(ASGIChannel.websocketDisconnect, as: WebSocketDisconnectMessage.self)
        #expect(disconnect.code == 1002)
    }

    @Test("a fragmented control frame is a protocol error from the decoder: 1002 sent and reported")
    func fragmentedPing() async throws {
        let fixture = try await Fixture()
        try await fixture.open()
        try await fixture.send(opcode: 0x9, Array("ping".utf8), fin: false)
        #expect(try await fixture.closeCode() == 1002)
        let disconnect = try await fixture.next(ASGIChannel.websocketDisconnect, as: WebSocketDisconnectMessage.self)
        #expect(disconnect.code == 1002)
    }

    @Test("a full websocket.receive stops reading from the client, and reading resumes once the layer takes the message")
    func backpressureWhenLayerFull() async throws {
        let fixture = try await Fixture(capacity: 1)
        try await fixture.open()
        #expect(fixture.reading)
        try await fixture.send(opcode: 0x1, Array("a".utf8))
        try await fixture.send(opcode: 0x1, Array("b".utf8))
        // "b" finds the channel full: held, retried, and the client is asked to wait.
        let deadline = ContinuousClock.now + .seconds(10)
        while fixture.server.counters[.sendFullRetried] == 0 && ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(5))
        }
        // The retry bookkeeping finishes in the same loop turn that counted it.
        try await fixture.channel.eventLoop.submit {}.get()
        #expect(fixture.server.counters[.sendFullRetried] == 1)
        #expect(!fixture.reading)
        let a = try await fixture.next(ASGIChannel.websocketReceive, as: WebSocketReceiveMessage.self)
        // The retry pause runs on the testing loop's virtual clock.
        await fixture.channel.testingEventLoop.advanceTime(by: .seconds(1))
        let b = try await fixture.next(ASGIChannel.websocketReceive, as: WebSocketReceiveMessage.self)
        #expect(a.data == .text("a") && b.data == .text("b") && b.order == 2)
        while !fixture.reading && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        #expect(fixture.reading && fixture.server.counters[.sendRecovered] == 1 && fixture.server.counters[.heldDropped] == 0)
    }
}
