import ASGI
import Channels
import Foundation
import InterfaceServer
import NIOCore
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Frames past a socket's share (`maxFramesPerSecond`) wait in the server while reading from it
/// pauses; only what a read brings can pile up, and the server holds at most ten seconds' share.
/// Found by a red-team run: 20 sockets each writing 9,000 one-byte frames at once grew the
/// server by 56 MB, all of it held until paced out.
@Suite("frames past a socket's share (real sockets)", .timeLimit(.minutes(2)))
struct FrameFloodTests {
    @Test func aClientThatPacksMoreThanASecondsShareIntoOneWriteIsClosed() async throws {
        let layer = InMemoryChannelLayer(configuration: .init(capacity: 10_000))
        let (server, port) = try await GiveUpFixtures.server(on: layer) {
            $0.maxFramesPerSecond = 100
        }
        let application = GiveUpFixtures.acceptEverySocket(on: layer)
        defer { application.cancel() }

        // One socket sends 600 frames at once, six seconds' share: all arrive, paced, in order.
        let paced = try await offThePool { try RawWebSocket(port: port, path: "/flood/", receiveBuffer: 65536) }
        try await offThePool { try paced.sendTexts((0..<600).map { "p\($0)" }) }
        var texts: [String] = []
        let deadline = ContinuousClock.now + .seconds(40)
        while texts.count < 600, ContinuousClock.now < deadline {
            if let frame = try await layer.receive(channels: [ASGIChannel.websocketReceive], timeout: .milliseconds(200)) {
                texts.append(frame.message["text"]?.stringValue ?? "?")
            }
        }
        #expect(texts == (0..<600).map { "p\($0)" }, "every paced frame, in order")
        #expect(server.statistics.framesPaced >= 1, "the 600 went past the burst of 10 and were paced")

        // Another packs 3,000 into one write, past ten seconds' share: closed with 1008, what
        // waited is dropped and counted.
        let flood = try await offThePool { try RawWebSocket(port: port, path: "/flood/", receiveBuffer: 65536) }
        try await offThePool { try flood.sendTexts((0..<3_000).map { "f\($0 % 10)" }) }
        let (opcode, payload) = try await offThePool { try flood.readFrame(within: .seconds(15)) }
        #expect(opcode == 0x88 && payload.prefix(2) == [0x03, 0xF0], "closed with 1008, got \(opcode) \(payload)")
        flood.close()
        var disconnects: [(code: Int64, order: Int64)] = []
        while disconnects.isEmpty, ContinuousClock.now < deadline {
            if let message = try await layer.receive(channels: [ASGIChannel.websocketDisconnect], timeout: .milliseconds(200)) {
                disconnects.append((message.message["code"]?.intValue ?? 0, message.message["order"]?.intValue ?? -1))
            }
        }
        #expect(disconnects.map(\.code) == [1008], "the application hears the flooder went")
        var through = 0
        while let frame = try await layer.receive(channels: [ASGIChannel.websocketReceive], timeout: .zero) {
            through += 1
            #expect(frame.message["order"]?.intValue == Int64(through), "the frames that went through, in order")
        }
        // The dropped frames' orders are not the application's to wait for.
        #expect(disconnects.map(\.order) == [Int64(through) + 1], "the disconnect follows the last frame that went through")
        let statistics = server.statistics
        #expect(statistics.closedFrameFlood == 1)
        #expect(through <= 60, "little more than its burst went to the layer: \(through)")
        #expect(statistics.heldDropped == 1_001, "ten seconds' share held, and the frame past it, dropped: \(statistics.heldDropped)")
        paced.close()
        await server.shutdown()
    }

    /// Frames a client sends after the server's close frame (before its own close reply) go
    /// nowhere: each is counted (`framesAfterClose`), none reaches the application.
    @Test func framesAfterOurCloseAreDroppedAndCountedEach() async throws {
        let layer = InMemoryChannelLayer()
        let (server, port) = try await GiveUpFixtures.server(on: layer) { _ in }
        // An application that accepts every socket and closes it at once with 4000.
        let application = Task {
            while !Task.isCancelled {
                guard let connect = try await layer.receive(channels: [ASGIChannel.websocketConnect], timeout: .milliseconds(200)),
                    let reply = connect.message["reply_channel"]?.stringValue
                else { continue }
                try await layer.send(["accept": true], to: reply)
                try await layer.send(["close": 4000], to: reply)
            }
        }
        defer { application.cancel() }
        let socket = try await offThePool { try RawWebSocket(port: port, path: "/late/", receiveBuffer: 65536) }
        let (opcode, payload) = try await offThePool { try socket.readFrame(within: .seconds(40)) }
        #expect(opcode == 0x88 && payload.prefix(2) == [0x0F, 0xA0], "closed with 4000")
        try await offThePool { try socket.sendTexts(["late 1", "late 2", "late 3"]) }
        let deadline = ContinuousClock.now + .seconds(40)
        while server.statistics.framesAfterClose < 3, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(20)) }
        try await Task.sleep(for: .milliseconds(300))
        #expect(server.statistics.framesAfterClose == 3)
        #expect(try await layer.receive(channels: [ASGIChannel.websocketReceive], timeout: .zero) == nil, "no late frame reached the layer")
        socket.close()
        await server.shutdown()
    }
}
