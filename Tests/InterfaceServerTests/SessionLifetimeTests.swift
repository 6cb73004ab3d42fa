import ASGI
import Channels
import Foundation
import InterfaceServer
import NIOCore
import NIOPosix
import NIOWebSocket
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// A WebSocket session must be freed once its socket is gone, however it went: each kept one is
/// a few kilobytes of a server that runs for months and sees millions of sockets. Counted by
/// the server (``ServerStatistics/webSocketSessionsAlive``) over real sockets closed every way.
@Suite("WebSocket sessions are freed (real sockets)", .timeLimit(.minutes(2)))
struct SessionLifetimeTests {
    @Test func everySessionIsFreedOnceItsSocketIsGone() async throws {
        let layer = InMemoryChannelLayer(configuration: .init(capacity: 10_000))
        let routes = [
            route("websocket.connect", path: "^/room/$") { context in
                try await Group("lifetime").add(context.replyChannel!)
                try await context.accept()
            },
            route("websocket.connect", path: "^/refused/$") { _ in throw ConsumerError.denyConnection },
            route("websocket.receive", path: "^/room/$") { context in
                try await Group("lifetime").send(WebSocketSendMessage.text(context.message["text"]?.stringValue ?? ""))
            },
        ]
        var configuration = ServerConfiguration(host: "127.0.0.1", port: 0)
        configuration.pingInterval = nil
        let server = try InterfaceServer(layer: layer, configuration: configuration)
        try await server.start()
        let worker = Worker(router: try Router(routes), layer: layer, concurrency: 4)
        let workerTask = Task { await worker.run() }
        defer { worker.stop() }
        let port = try #require(server.localAddress?.port)

        // Closed by the client with a close frame, after a group message reached them.
        var sockets: [NIOAsyncChannel<WebSocketFrame, WebSocketFrame>] = []
        for _ in 0..<40 {
            guard case .websocket(let channel) = try await NIOWebSocketClient.connect(port: port, path: "/room/") else {
                Issue.record("a socket was not accepted")
                return
            }
            sockets.append(channel)
        }
        // Reset by the client (no close frame), and refused by the application.
        let dropped = try await offThePool { try (0..<20).map { _ in try RawWebSocket(port: port, path: "/room/", receiveBuffer: 65536) } }
        for _ in 0..<10 {
            if case .websocket = try await NIOWebSocketClient.connect(port: port, path: "/refused/") {
                Issue.record("a refused socket was accepted")
            }
        }
        try await DirectWriteTests.waitForMembers(60, of: "lifetime", on: layer)
        #expect(server.statistics.webSocketSessionsAlive >= 60)
        try await layer.sendGroup("lifetime", message: WebSocketSendMessage.text("to all").message)
        for socket in sockets {
            try await socket.executeThenClose { inbound, outbound in
                var frames = inbound.makeAsyncIterator()
                while let frame = try await frames.next(), frame.opcode != .text {}
                try await outbound.write(NIOWebSocketClient.frame(.connectionClose, [0x03, 0xE8]))
                while try await frames.next() != nil {}
            }
        }
        for socket in dropped {
            var linger = linger(l_onoff: 1, l_linger: 0)
            setsockopt(socket.descriptor, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<linger>.size))
            socket.close()
        }

        let deadline = ContinuousClock.now + .seconds(20)
        while server.statistics.webSocketSessionsAlive > 0, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(
            server.statistics.webSocketSessionsAlive == 0,
            "\(server.statistics.webSocketSessionsAlive) of 70 sessions still in memory 20 s after their sockets closed")
        await server.shutdown()
        workerTask.cancel()
    }
}
