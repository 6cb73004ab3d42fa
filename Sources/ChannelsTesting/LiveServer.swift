import ASGI
import Channels
import InterfaceServer
import Logging
import NIOCore

/// A real interface server and a worker in this process, on a free loopback port: for tests that
/// talk to the application over real sockets (URLSession, a WebSocket client, a browser). The
/// routing, layer and environment are the test's; `stop()` shuts both down.
///
/// ```swift
/// let live = try await LiveServer.start(routes)
/// let (data, _) = try await URLSession.shared.data(from: URL(string: live.url + "/hello/")!)
/// await live.stop()
/// ```
public final class LiveServer: Sendable {
    /// The layer the server and the worker share.
    public let layer: any ChannelLayer
    /// The worker that runs the consumers.
    public let worker: Worker
    /// The server.
    public let server: InterfaceServer
    /// The port it listens on (127.0.0.1).
    public let port: Int
    private let running: Task<Void, Never>

    private init(layer: any ChannelLayer, worker: Worker, server: InterfaceServer, port: Int, running: Task<Void, Never>) {
        self.layer = layer
        self.worker = worker
        self.server = server
        self.port = port
        self.running = running
    }

    /// `http://127.0.0.1:<port>`.
    public var url: String { "http://127.0.0.1:\(port)" }

    /// `ws://127.0.0.1:<port>`.
    public var websocketURL: String { "ws://127.0.0.1:\(port)" }

    /// Starts a server on a free port and a worker for `routing`; returns once it listens.
    public static func start(
        _ routing: [RoutingEntry], layer: any ChannelLayer = InMemoryChannelLayer(),
        environment: ConsumerEnvironment = ConsumerEnvironment(), concurrency: Int = 4,
        configure: (inout ServerConfiguration) -> Void = { _ in },
        logger: Logger = Logger(label: "channels.live-server")
    ) async throws -> LiveServer {
        var configuration = ServerConfiguration(host: "127.0.0.1", port: 0)
        configure(&configuration)
        let server = try InterfaceServer(layer: layer, configuration: configuration, logger: logger)
        try await server.start()
        guard let port = server.localAddress?.port else {
            await server.shutdown()
            throw TestClientError(.noPort, "the live server has no port")
        }
        let worker = Worker(
            router: try Router(routing), layer: layer, concurrency: concurrency, environment: environment,
            finishQueuedOnShutdown: true, logger: logger)
        let running = Task { await worker.run() }
        return LiveServer(layer: layer, worker: worker, server: server, port: port, running: running)
    }

    /// Shuts the server down (WebSockets closed with 1001, responses in flight finished), then
    /// stops the worker.
    public func stop() async {
        await server.shutdown()
        worker.stop()
        await running.value
    }
}
