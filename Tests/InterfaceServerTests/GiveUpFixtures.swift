import ASGI
import Foundation
import InterfaceServer
import NIOCore
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// What the tests of full channels, give-ups and floods share: a server on an in-memory layer,
/// an application that accepts every socket, and plain loopback sockets.
enum GiveUpFixtures {
    /// A started server on `layer` (pings off), with `configure`'s settings, and its port.
    static func server(
        on layer: any ChannelLayer, _ configure: (inout ServerConfiguration) -> Void
    ) async throws -> (InterfaceServer, Int) {
        var configuration = ServerConfiguration(host: "127.0.0.1", port: 0)
        configuration.pingInterval = nil
        configure(&configuration)
        let server = try InterfaceServer(layer: layer, configuration: configuration)
        try await server.start()
        guard let port = server.localAddress?.port else { throw POSIXFailure("the server has no port") }
        return (server, port)
    }

    /// Waits (at most 40 s) until `server` counted `dropped` held messages, checks no more come,
    /// then that its shutdown is not held by anything (under 5 s).
    static func expectDroppedThenPromptShutdown(
        _ server: InterfaceServer, dropped: Int, _ comment: Comment, sourceLocation: SourceLocation = #_sourceLocation
    ) async throws {
        let deadline = ContinuousClock.now + .seconds(40)
        while server.statistics.heldDropped < dropped, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(20)) }
        try await Task.sleep(for: .milliseconds(300))
        #expect(server.statistics.heldDropped == dropped, comment, sourceLocation: sourceLocation)
        let started = ContinuousClock.now
        await server.shutdown()
        #expect(ContinuousClock.now - started < .seconds(5), "nothing held keeps the shutdown waiting", sourceLocation: sourceLocation)
    }

    /// Plays an application that accepts every socket and reads nothing else, until cancelled.
    static func acceptEverySocket(on layer: InMemoryChannelLayer) -> Task<Void, any Error> {
        Task {
            while !Task.isCancelled {
                guard let connect = try await layer.receive(channels: [ASGIChannel.websocketConnect], timeout: .milliseconds(200)),
                    let reply = connect.message["reply_channel"]?.stringValue
                else { continue }
                try await layer.send(["accept": true], to: reply)
            }
        }
    }

    /// A blocking TCP socket connected to the loopback `port` (`receiveBuffer` set before the
    /// connect, so the window the server sees stays small).
    static func loopbackSocket(port: Int, receiveBuffer: Int32? = nil) throws -> CInt {
        let descriptor = socket(AF_INET, CInt(SOCK_STREAM.rawValue), 0)
        guard descriptor >= 0 else { throw POSIXFailure("socket") }
        if var size = receiveBuffer {
            setsockopt(descriptor, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else { throw POSIXFailure("connect") }
        return descriptor
    }
}
