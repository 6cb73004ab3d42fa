import ASGI
import Channels
import Foundation
import InterfaceServer
import NIOCore
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// A socket whose frames `websocket.receive` refuses as full for the whole bound is closed with
/// 1013, and what it held is dropped (counted): but the application, told it connected, must
/// hear it went. Found by a red-team run: the give-up dropped the socket's `websocket.disconnect`
/// with its frames, and 19 of 20 such sockets stayed members of their group.
@Suite("a socket given up for a full websocket.receive still disconnects (real sockets)", .timeLimit(.minutes(2)))
struct FullReceiveCloseTests {
    @Test func everyGivenUpSocketsDisconnectReachesTheApplication() async throws {
        let layer = InMemoryChannelLayer(configuration: .init(channelCapacities: [("websocket.receive", 3)]))
        var configuration = ServerConfiguration(host: "127.0.0.1", port: 0)
        configuration.pingInterval = nil
        configuration.channelFullTimeout = .seconds(1)
        let server = try InterfaceServer(layer: layer, configuration: configuration)
        try await server.start()
        let port = try #require(server.localAddress?.port)
        // The application: accepts every socket, never reads websocket.receive.
        let application = Task {
            while !Task.isCancelled {
                guard let connect = try await layer.receive(channels: [ASGIChannel.websocketConnect], timeout: .milliseconds(200)),
                    let reply = connect.message["reply_channel"]?.stringValue
                else { continue }
                try await layer.send(["accept": true], to: reply)
            }
        }
        defer { application.cancel() }

        // Three sockets: one fills the channel and waits, one resets while its frames are held,
        // one leaves with a close frame while its frames are held.
        let sockets = try await offThePool { try (0..<3).map { _ in try RawWebSocket(port: port, path: "/full/", receiveBuffer: 65536) } }
        let (waiting, resetting, leaving) = (sockets[0], sockets[1], sockets[2])
        try await offThePool { try waiting.sendTexts((0..<5).map { "w\($0)" }) }
        let deadline = ContinuousClock.now + .seconds(10)
        while server.statistics.sendFullRetried < 1, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        try await offThePool {
            try resetting.sendTexts((0..<4).map { "r\($0)" })
            try leaving.sendTexts((0..<4).map { "l\($0)" })
        }
        while server.statistics.sendFullRetried < 3, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        #expect(server.statistics.sendFullRetried == 3, "all three sockets hold frames for the full channel")
        resetting.reset()
        try await offThePool {
            // A close frame (1000), masked.
            let mask: [UInt8] = [1, 2, 3, 4]
            let payload: [UInt8] = [0x03, 0xE8]
            let frame = [0x88, 0x82] + mask + payload.enumerated().map { $0.element ^ mask[$0.offset] }
            _ = frame.withUnsafeBytes { Glibc.send(leaving.descriptor, $0.baseAddress, $0.count, 0) }
        }

        // The socket that waits is closed with 1013 once the bound is over.
        let (opcode, payload) = try await offThePool { try waiting.readFrame(within: .seconds(15)) }
        #expect(opcode == 0x88 && payload.prefix(2) == [0x03, 0xF5], "closed with 1013, got \(opcode) \(payload)")
        waiting.close()
        leaving.close()

        // Every socket's disconnect reaches the application: 1013 for each the give-up closed
        // (the other two may be closed so before their reset or close frame is read: reading
        // from them paused while their frames were held), 1006 or 1000 for the others.
        var codes: [String: Int64] = [:]
        while codes.count < 3, ContinuousClock.now < deadline + .seconds(10) {
            guard let disconnect = try await layer.receive(channels: [ASGIChannel.websocketDisconnect], timeout: .milliseconds(200)) else {
                continue
            }
            codes[disconnect.message["reply_channel"]?.stringValue ?? "?"] = disconnect.message["code"]?.intValue
        }
        #expect(codes.count == 3, "one disconnect per socket: \(codes)")
        #expect(codes.values.allSatisfy { [1000, 1006, 1013].contains($0) } && codes.values.contains(1013), "\(codes)")
        var frames = 0
        while try await layer.receive(channels: [ASGIChannel.websocketReceive], timeout: .zero) != nil { frames += 1 }
        let statistics = server.statistics
        #expect(frames == 3, "the channel's capacity")
        #expect(statistics.heldDropped == 13 - frames, "every frame not sent is counted: \(statistics)")
        #expect((1...2).contains(statistics.closedChannelFull), "the waiting socket, and the leaving one if its close was not read")
        await server.shutdown()
    }
}
