import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOWebSocket

/// Two WebSocket echo servers that differ only in how a connection's bytes reach its code: the
/// question issue 27 leaves to measurement (`scripts/bench-echo-shapes.sh` drives both with
/// `ChannelsBench ws`, the same client, in one run).
///
/// - `handlers PORT`: a `ChannelInboundHandler` on the pipeline, echoing in `channelRead` and
///   flushing once per read burst in `channelReadComplete` (how `runserver`'s sockets work);
/// - `async PORT`: `NIOAsyncChannel` children in a discarding task group, one task per
///   connection iterating its inbound frames and writing to its outbound writer (swift-nio's
///   and Hummingbird's structured style);
/// - `async-on-loops PORT`: the same with NIO's event loops installed as Swift concurrency's
///   global executor, so a connection's task runs on loop threads.
///
/// Both answer pings, echo text and binary frames, and close on a close frame.
@main
struct EchoShapes {
    enum Upgraded: Sendable {
        case websocket(NIOAsyncChannel<WebSocketFrame, WebSocketFrame>)
        case refused
    }

    static func main() async throws {
        let arguments = CommandLine.arguments
        guard arguments.count == 3, let port = Int(arguments[2]) else {
            print("usage: EchoShapes handlers|async PORT")
            return
        }
        // Event-loop threads: ECHO_THREADS, else 1 (one core's worth, as a pinned server has).
        let threads = Int(ProcessInfo.processInfo.environment["ECHO_THREADS"] ?? "") ?? 1
        switch arguments[1] {
        case "handlers": try await handlers(port: port, group: MultiThreadedEventLoopGroup(numberOfThreads: threads))
        case "async": try await structured(port: port, group: MultiThreadedEventLoopGroup(numberOfThreads: threads))
        case "async-on-loops":
            // The same, with Swift concurrency's global executor on NIO's event loops (no hop
            // between a loop and the cooperative pool for each frame).
            NIOSingletons.groupLoopCountSuggestion = threads
            guard NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor() else {
                print("could not install the event loops as the global executor")
                return
            }
            try await structured(port: port, group: MultiThreadedEventLoopGroup.singleton)
        default: print("usage: EchoShapes handlers|async|async-on-loops PORT")
        }
    }

    /// The echo of one data frame (unmasked), or nil for a frame that is not data.
    static func echo(_ frame: WebSocketFrame) -> WebSocketFrame? {
        switch frame.opcode {
        case .text, .binary: WebSocketFrame(fin: true, opcode: frame.opcode, data: frame.unmaskedData)
        case .ping: WebSocketFrame(fin: true, opcode: .pong, data: frame.unmaskedData)
        default: nil
        }
    }

    static func handlers(port: Int, group: MultiThreadedEventLoopGroup) async throws {
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                let upgrader = NIOWebSocketServerUpgrader(
                    shouldUpgrade: { channel, _ in channel.eventLoop.makeSucceededFuture(HTTPHeaders()) },
                    upgradePipelineHandler: { channel, _ in
                        channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(EchoHandler()) }
                    })
                return channel.pipeline.configureHTTPServerPipeline(
                    withServerUpgrade: (upgraders: [upgrader], completionHandler: { _ in }))
            }
            .bind(host: "127.0.0.1", port: port).get()
        print("handlers echo on \(port)")
        try await channel.closeFuture.get()
    }

    final class EchoHandler: ChannelInboundHandler {
        typealias InboundIn = WebSocketFrame
        typealias OutboundOut = WebSocketFrame

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let frame = unwrapInboundIn(data)
            if frame.opcode == .connectionClose {
                context.writeAndFlush(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .connectionClose, data: ByteBuffer())))
                    .whenComplete { _ in context.close(promise: nil) }
                return
            }
            if let reply = EchoShapes.echo(frame) { context.write(wrapOutboundOut(reply), promise: nil) }
        }

        func channelReadComplete(context: ChannelHandlerContext) { context.flush() }
    }

    static func structured(port: Int, group: MultiThreadedEventLoopGroup) async throws {
        let server: NIOAsyncChannel<EventLoopFuture<Upgraded>, Never> = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .bind(host: "127.0.0.1", port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    let upgrader = NIOTypedWebSocketServerUpgrader<Upgraded>(
                        shouldUpgrade: { channel, _ in channel.eventLoop.makeSucceededFuture(HTTPHeaders()) },
                        upgradePipelineHandler: { channel, _ in
                            channel.eventLoop.makeCompletedFuture {
                                .websocket(try NIOAsyncChannel<WebSocketFrame, WebSocketFrame>(wrappingChannelSynchronously: channel))
                            }
                        })
                    return try channel.pipeline.syncOperations.configureUpgradableHTTPServerPipeline(
                        configuration: .init(
                            upgradeConfiguration: NIOTypedHTTPServerUpgradeConfiguration(
                                upgraders: [upgrader],
                                notUpgradingCompletionHandler: { channel in
                                    channel.close().map { .refused }
                                })))
                }
            }
        print("async echo on \(port)")
        try await withThrowingDiscardingTaskGroup { connections in
            try await server.executeThenClose { inbound in
                for try await upgraded in inbound {
                    connections.addTask {
                        guard case .websocket(let socket) = try? await upgraded.get() else { return }
                        try? await socket.executeThenClose { frames, outbound in
                            for try await frame in frames {
                                if frame.opcode == .connectionClose {
                                    try await outbound.write(WebSocketFrame(fin: true, opcode: .connectionClose, data: ByteBuffer()))
                                    return
                                }
                                if let reply = echo(frame) { try await outbound.write(reply) }
                            }
                        }
                    }
                }
            }
        }
    }
}
