import ASGI
import Channels
import Foundation
import InterfaceServer
import NIOCore
import Synchronization
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
        let (server, port) = try await GiveUpFixtures.server(on: layer) {
            $0.channelFullTimeout = .seconds(1)
        }
        // The application: accepts every socket, never reads websocket.receive.
        let application = GiveUpFixtures.acceptEverySocket(on: layer)
        defer { application.cancel() }

        // Three sockets: one fills the channel and waits, one resets while its frames are held,
        // one leaves with a close frame while its frames are held.
        let sockets = try await offThePool { try (0..<3).map { _ in try RawWebSocket(port: port, path: "/full/", receiveBuffer: 65536) } }
        let (waiting, resetting, leaving) = (sockets[0], sockets[1], sockets[2])
        try await offThePool { try waiting.sendTexts((0..<5).map { "w\($0)" }) }
        let deadline = ContinuousClock.now + .seconds(40)
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
        var disconnects: [String: (code: Int64, order: Int64)] = [:]
        while disconnects.count < 3, ContinuousClock.now < deadline + .seconds(10) {
            guard let disconnect = try await layer.receive(channels: [ASGIChannel.websocketDisconnect], timeout: .milliseconds(200)) else {
                continue
            }
            disconnects[disconnect.message["reply_channel"]?.stringValue ?? "?"] =
                (disconnect.message["code"]?.intValue ?? 0, disconnect.message["order"]?.intValue ?? -1)
        }
        #expect(disconnects.count == 3, "one disconnect per socket: \(disconnects)")
        let codes = disconnects.values.map(\.code)
        #expect(codes.allSatisfy { [1000, 1006, 1013].contains($0) } && codes.contains(1013), "\(disconnects)")
        // Each disconnect follows the last frame of its socket the layer took: no gap for an
        // application that orders a socket's messages to wait out (the dropped frames had
        // orders too).
        var lastOrders: [String: Int64] = [:]
        while let frame = try await layer.receive(channels: [ASGIChannel.websocketReceive], timeout: .zero) {
            let reply = frame.message["reply_channel"]?.stringValue ?? "?"
            lastOrders[reply] = max(lastOrders[reply] ?? 0, frame.message["order"]?.intValue ?? 0)
        }
        for (reply, disconnect) in disconnects {
            #expect(disconnect.order == (lastOrders[reply] ?? 0) + 1, "\(reply): disconnect \(disconnect), frames to \(lastOrders)")
        }
        let frames = Int(lastOrders.values.reduce(0, +))
        let statistics = server.statistics
        #expect(frames == 3, "the channel's capacity")
        #expect(statistics.heldDropped == 13 - frames, "every frame not sent is counted: \(statistics)")
        #expect(
            (1...3).contains(statistics.closedChannelFull), "the waiting socket, and the others if their reset or close was not read yet")
        await server.shutdown()
    }

    /// A socket whose `websocket.connect` was given up (the channel full for the whole bound)
    /// was never heard of by the application: its disconnect is dropped with it (a red-team run
    /// found 19 disconnects for 1 connect when 20 clients left during a full connect channel).
    @Test func aSocketWhoseConnectWasGivenUpSendsNoDisconnect() async throws {
        let layer = InMemoryChannelLayer(configuration: .init(channelCapacities: [("websocket.connect", 1)]))
        let (server, port) = try await GiveUpFixtures.server(on: layer) {
            $0.channelFullTimeout = .seconds(1)
            $0.websocketConnectTimeout = .seconds(30)
        }
        // Three upgrades nobody answers: the first connect fits, the other two wait for room.
        let descriptors = try await offThePool { try (0..<3).map { _ in try Self.upgradeRequest(port: port) } }
        let deadline = ContinuousClock.now + .seconds(40)
        while server.statistics.sendFullRetried < 2, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        #expect(server.statistics.sendFullRetried == 2, "two connects wait for room")
        for descriptor in descriptors {
            var linger = linger(l_onoff: 1, l_linger: 0)
            setsockopt(descriptor, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<linger>.size))
            Glibc.close(descriptor)
        }
        // Past the bound: the two waiting connects and what followed them are given up (their
        // clients' resets may be read before or after: a disconnect queued or none at all).
        while server.statistics.heldDropped < 2, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(20)) }
        try await Task.sleep(for: .seconds(1))
        var connects: [String] = []
        while let connect = try await layer.receive(channels: [ASGIChannel.websocketConnect], timeout: .zero) {
            connects.append(connect.message["reply_channel"]?.stringValue ?? "?")
        }
        var disconnects: [String] = []
        while let disconnect = try await layer.receive(channels: [ASGIChannel.websocketDisconnect], timeout: .zero) {
            disconnects.append(disconnect.message["reply_channel"]?.stringValue ?? "?")
        }
        #expect(connects.count == 1)
        #expect(Set(disconnects).isSubset(of: connects), "a disconnect only for the connect the application got: \(disconnects)")
        #expect([2, 3, 4].contains(server.statistics.heldDropped), "two connects, and their disconnects if queued")
        await server.shutdown()
    }

    /// A disconnect refused as full for the whole bound is dropped and counted like any message:
    /// it does not wait forever (a red-team run: retried until the shutdown's 30 s ran out).
    @Test func aDisconnectGetsOneBoundNotForever() async throws {
        let layer = InMemoryChannelLayer(configuration: .init(channelCapacities: [("websocket.disconnect", 1)]))
        let (server, port) = try await GiveUpFixtures.server(on: layer) {
            $0.channelFullTimeout = .seconds(1)
        }
        let application = GiveUpFixtures.acceptEverySocket(on: layer)
        defer { application.cancel() }
        let sockets = try await offThePool { try (0..<4).map { _ in try RawWebSocket(port: port, path: "/d/", receiveBuffer: 65536) } }
        for socket in sockets { socket.reset() }
        try await GiveUpFixtures.expectDroppedThenPromptShutdown(server, dropped: 3, "the three disconnects that found no room, counted")
        var disconnects = 0
        while try await layer.receive(channels: [ASGIChannel.websocketDisconnect], timeout: .zero) != nil { disconnects += 1 }
        #expect(disconnects == 1)
    }

    /// The same with the layer unreachable (every send failing as a lost connection, as with
    /// Redis down): a socket's frame is given up after the outage bound (the socket closed with
    /// 1011), its disconnect is tried on one bound of its own and then dropped, counted, and a
    /// shutdown is not held by it (a red-team run with Redis stopped: SIGTERM waited the whole
    /// 30 s before the one bound).
    @Test func aDisconnectGetsOneBoundWhenTheLayerIsUnreachable() async throws {
        let layer = UnreachableSendLayer()
        let (server, port) = try await GiveUpFixtures.server(on: layer) { $0.layerOutageTimeout = .seconds(1) }
        let application = GiveUpFixtures.acceptEverySocket(on: layer.memory)
        defer { application.cancel() }
        let sockets = try await offThePool { try (0..<4).map { _ in try RawWebSocket(port: port, path: "/u/", receiveBuffer: 65536) } }
        layer.dead.store(true, ordering: .relaxed)
        let closes = try await offThePool {
            for socket in sockets { try socket.sendTexts(["lost with the layer"]) }
            return try sockets.map { socket -> [UInt8] in
                let (opcode, payload) = try socket.readFrame(within: .seconds(40))
                return [opcode] + payload.prefix(2)
            }
        }
        #expect(closes.allSatisfy { $0 == [0x88, 0x03, 0xF3] }, "each socket closed with 1011: \(closes)")
        try await GiveUpFixtures.expectDroppedThenPromptShutdown(
            server, dropped: 8, "four frames given up, then four disconnects after their own bound")
        for socket in sockets { socket.close() }
        #expect(
            try await layer.memory.receive(channels: [ASGIChannel.websocketDisconnect, ASGIChannel.websocketReceive], timeout: .zero) == nil
        )
    }

    /// A frame too large for the layer that waited in a full channel's line is dropped when its
    /// turn comes (counted), and the socket reads on: its next frame arrives. Found by a red-team
    /// run: the drop left the sender's wait on, so reading from the socket stayed paused for good.
    @Test func aFrameTooLargeThatWaitedInLineDoesNotStallItsSocket() async throws {
        let layer = InMemoryChannelLayer(configuration: .init(channelCapacities: [("websocket.receive", 1)], maxMessageSize: 2048))
        let (server, port) = try await GiveUpFixtures.server(on: layer) {
            $0.maxFramesPerSecond = 0
        }
        let application = GiveUpFixtures.acceptEverySocket(on: layer)
        defer { application.cancel() }
        // A long path: every message of the socket carries it, so a frame under the server's own
        // limit (1 KB here) can still make a message over the layer's.
        let path = "/" + String(repeating: "p", count: 1100) + "/"
        let sockets = try await offThePool { try (0..<2).map { _ in try RawWebSocket(port: port, path: path, receiveBuffer: 65536) } }
        // The first socket fills the channel and probes it; the second one's large frame waits in line.
        try await offThePool { try sockets[0].sendTexts(["a1", "a2"]) }
        let deadline = ContinuousClock.now + .seconds(40)
        while server.statistics.sendFullRetried < 1, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        try await offThePool { try sockets[1].sendTexts([String(repeating: "x", count: 1000)]) }
        while server.statistics.sendFullRetried < 2, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        #expect(server.statistics.sendFullRetried == 2, "the large frame waits in line")
        // Room again: the first socket's frames go, the large one gets its turn and is dropped.
        var texts: [String] = []
        while texts.count < 2, ContinuousClock.now < deadline {
            if let frame = try await layer.receive(channels: [ASGIChannel.websocketReceive], timeout: .milliseconds(100)) {
                texts.append(frame.message["text"]?.stringValue ?? "?")
            }
        }
        #expect(texts == ["a1", "a2"])
        while server.statistics.heldDropped < 1, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        #expect(server.statistics.heldDropped == 1, "the large frame, counted")
        // The second socket reads on.
        try await offThePool { try sockets[1].sendTexts(["after"]) }
        var after: Message?
        while after == nil, ContinuousClock.now < deadline {
            after = try await layer.receive(channels: [ASGIChannel.websocketReceive], timeout: .milliseconds(100))?.message
        }
        #expect(after?["text"]?.stringValue == "after", "the socket's next frame arrives")
        #expect(after?["order"]?.intValue == 1, "numbered on past the dropped frame")
        for socket in sockets { socket.close() }
        await server.shutdown()
    }

    /// A connect too large for the layer never reaches the application, so neither does the
    /// disconnect of a client that left while it waited (a red-team run: a disconnect of order 0
    /// with no connect).
    @Test func aConnectTooLargeSendsNoDisconnect() async throws {
        let layer = InMemoryChannelLayer(configuration: .init(channelCapacities: [("websocket.connect", 1)], maxMessageSize: 8192))
        let (server, port) = try await GiveUpFixtures.server(on: layer) {
            $0.websocketConnectTimeout = .seconds(30)
        }
        // The first connect fills the channel, the second probes it, the third (a 12 KB header,
        // too large for the layer) waits in line without trying; then every client leaves.
        let deadline = ContinuousClock.now + .seconds(40)
        let first = try await offThePool { try Self.upgradeRequest(port: port) }
        try await Task.sleep(for: .milliseconds(300))
        let second = try await offThePool { try Self.upgradeRequest(port: port) }
        while server.statistics.sendFullRetried < 1, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        let big = try await offThePool { try Self.upgradeRequest(port: port, header: String(repeating: "y", count: 12_000)) }
        while server.statistics.sendFullRetried < 2, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        #expect(server.statistics.sendFullRetried == 2, "one connect probes, the large one waits in line")
        for descriptor in [first, second, big] { Glibc.close(descriptor) }
        try await Task.sleep(for: .milliseconds(300))
        // Room again: the waiting connects go in turn, the large one is dropped.
        var connects: [String] = []
        while ContinuousClock.now < deadline, server.statistics.heldDropped < 1 {
            if let connect = try await layer.receive(channels: [ASGIChannel.websocketConnect], timeout: .milliseconds(100)) {
                connects.append(connect.message["reply_channel"]?.stringValue ?? "?")
            }
        }
        try await Task.sleep(for: .milliseconds(300))
        while let connect = try await layer.receive(channels: [ASGIChannel.websocketConnect], timeout: .zero) {
            connects.append(connect.message["reply_channel"]?.stringValue ?? "?")
        }
        var disconnects: [String] = []
        while let disconnect = try await layer.receive(channels: [ASGIChannel.websocketDisconnect], timeout: .zero) {
            disconnects.append(disconnect.message["reply_channel"]?.stringValue ?? "?")
        }
        #expect(connects.count == 2, "every connect but the large one")
        #expect(Set(disconnects).isSubset(of: connects), "a disconnect only for a connect the application got: \(disconnects)")
        #expect([1, 2].contains(server.statistics.heldDropped), "the large connect, and its disconnect if queued, counted")
        await server.shutdown()
    }

    /// A WebSocket upgrade request on a plain socket, not waiting for the answer.
    static func upgradeRequest(port: Int, header: String? = nil) throws -> CInt {
        let descriptor = try GiveUpFixtures.loopbackSocket(port: port)
        let request =
            "GET /c/ HTTP/1.1\r\nHost: 127.0.0.1:\(port)\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            + (header.map { "X-Large: \($0)\r\n" } ?? "") + "\r\n"
        _ = Array(request.utf8).withUnsafeBytes { Glibc.send(descriptor, $0.baseAddress, $0.count, 0) }
        return descriptor
    }
}

/// A layer whose sends all fail as a lost connection while `dead` (Redis unreachable for the
/// server's pushes); receives and everything else go to an in-memory layer.
final class UnreachableSendLayer: ForwardingChannelLayer {
    let memory = InMemoryChannelLayer()
    var base: any ChannelLayer { memory }
    let dead = Atomic<Bool>(false)

    func send(_ message: Message, to channel: String) async throws(ChannelLayerError) {
        if dead.load(ordering: .relaxed) { throw ChannelLayerError(.connectionLost, "the test's layer is unreachable") }
        try await memory.send(message, to: channel)
    }
}
