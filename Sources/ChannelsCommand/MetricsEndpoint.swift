import ASGI
import ArgumentParser
import CoreMetrics
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import Synchronization

/// `--metrics-port` / `--metrics-bind`, shared by `runserver`, `runworker` and `rundelay`.
struct MetricsOptions: ParsableArguments {
    @Option(name: .long, help: "Serve /metrics (Prometheus), /healthz and /readyz on this port, apart from the public one.")
    var metricsPort: Int?
    @Option(name: .long, help: "Address the metrics port binds to.") var metricsBind = "127.0.0.1"

    /// With `--metrics-port`: makes Prometheus the process's metrics backend and starts the
    /// listener. Call before anything creates a metric (before the layer).
    func start(logger: Logger) async throws -> MetricsEndpoint? {
        guard let metricsPort else { return nil }
        let registry = PrometheusCollectorRegistry()
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.defaultDurationHistogramBuckets = [
            .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2),
            .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
            .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(2), .seconds(5), .seconds(10),
        ]
        let tallies = MetricTallies()
        MetricsSystem.bootstrap(TallyingMetricsFactory(factory: factory, tallies: tallies))
        LogOutput.registerMetrics()
        let endpoint = try await MetricsEndpoint.start(registry: registry, tallies: tallies, host: metricsBind, port: metricsPort)
        logger.info("metrics listening", metadata: ["address": "\(metricsBind):\(endpoint.port)"])
        say("metrics: http://\(metricsBind):\(endpoint.port)/metrics (/healthz, /readyz)")
        return endpoint
    }
}

/// A small HTTP listener of its own for operators: `/metrics` (the Prometheus text format),
/// `/healthz` (200 while the process runs) and `/readyz` (200 while the layer answers and the
/// process is not shutting down, 503 otherwise).
final class MetricsEndpoint: Sendable {
    let registry: PrometheusCollectorRegistry
    /// The counters' and meters' values, as `/metrics` prints them (the admin page reads these).
    let tallies: MetricTallies
    private let state = Mutex<State>(State())
    private let channel = Mutex<(any Channel)?>(nil)

    private struct State {
        var readiness: (@Sendable () async -> Bool)?
        var lastPassed: ContinuousClock.Instant?
        var shuttingDown = false
        var admin: AdminPage?
    }

    /// On a loopback bind, the host names requests may carry (a page elsewhere that rebinds
    /// its DNS name to 127.0.0.1 must not read the figures or the admin page); nil otherwise.
    let loopbackHosts: AllowedHosts?

    private init(registry: PrometheusCollectorRegistry, tallies: MetricTallies, host: String) {
        self.registry = registry
        self.tallies = tallies
        let loopback = AllowedHosts.loopbackNames.contains(host) || host.hasPrefix("127.")
        self.loopbackHosts = loopback ? AllowedHosts(AllowedHosts.loopbackNames + [host]) : nil
    }

    /// The port it listens on (the one asked for, or the one picked for 0).
    var port: Int { channel.withLock { $0?.localAddress?.port ?? 0 } }

    static func start(registry: PrometheusCollectorRegistry, tallies: MetricTallies, host: String, port: Int) async throws
        -> MetricsEndpoint
    {
        let endpoint = MetricsEndpoint(registry: registry, tallies: tallies, host: host)
        let bound = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(MetricsHTTPHandler(endpoint: endpoint))
                }
            }
            .bind(host: host, port: port).get()
        endpoint.channel.withLock { $0 = bound }
        return endpoint
    }

    /// What `/readyz` asks (besides "not shutting down"); 503 until it is set.
    func setReadiness(_ check: @escaping @Sendable () async -> Bool) {
        state.withLock { $0.readiness = check }
    }

    /// Serves the operations page at `/admin/` (and its data at `/admin/stats.json`).
    func setAdmin(_ page: AdminPage) {
        state.withLock { $0.admin = page }
    }

    var admin: AdminPage? { state.withLock { $0.admin } }

    /// From now on `/readyz` answers 503, so load balancers stop sending work here.
    func markShuttingDown() {
        state.withLock { $0.shuttingDown = true }
    }

    /// `/readyz`'s answer. A passed layer check is kept for a second, so a flood of probes costs
    /// a healthy layer one round trip a second, not one each; a failed one is not kept, so the
    /// first probe after the layer came back sees it.
    func ready() async -> Bool {
        let now = ContinuousClock.now
        let (check, stopping, passedAt) = state.withLock { ($0.readiness, $0.shuttingDown, $0.lastPassed) }
        guard !stopping, let check else { return false }
        if let passedAt, now - passedAt < .seconds(1) { return true }
        let ready = await check()
        state.withLock { $0.lastPassed = ready ? now : nil }
        return ready
    }

    func close() async {
        let bound = channel.withLock { $0 }
        try? await bound?.close()
    }

    /// True when the layer answers a statistics call within `timeout`: a round trip to every
    /// Redis shard, nothing for the in-memory layer. A layer that hangs counts as not ready.
    static func layerAnswers(_ layer: any ChannelLayer, timeout: Duration = .seconds(2)) async -> Bool {
        await racingTimeout(timeout, fallback: false) { (try? await layer.globalStatistics()) != nil }
    }
}

/// One request at a time per connection: GET `/metrics`, `/healthz`, `/readyz` (and with
/// `--admin` the operations page under `/admin/`); 404 for anything else.
final class MetricsHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let endpoint: MetricsEndpoint
    private var path = ""
    private var query: [String: String] = [:]
    private var rawQuery = ""
    private var authorization: String?
    private var adminCookie: String?
    private var hostRefused = false
    private var keepAlive = true

    init(endpoint: MetricsEndpoint) {
        self.endpoint = endpoint
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            let target = PercentCoding.splitTarget(head.uri)
            path = target.path
            rawQuery = String(decoding: target.query, as: UTF8.self)
            query = Dictionary(PercentCoding.parameters(target.query).map { ($0.name, $0.value) }, uniquingKeysWith: { first, _ in first })
            authorization = head.headers.first(name: "authorization")
            adminCookie = nil
            for header in head.headers[canonicalForm: "cookie"] {
                for pair in header.split(separator: ";") {
                    let parts = pair.split(separator: "=", maxSplits: 1)
                    let name = parts.first.map { $0.drop { $0 == " " } } ?? ""
                    if parts.count == 2, name == AdminPage.cookieName { adminCookie = String(parts[1].drop { $0 == " " }) }
                }
            }
            keepAlive = head.isKeepAlive
            hostRefused =
                endpoint.loopbackHosts.map { hosts in
                    let names = head.headers[canonicalForm: "host"]
                    return names.count != 1 || !hosts.allows(host: String(names[0]))
                } ?? false
        case .body:
            break
        case .end:
            if hostRefused {
                respond(
                    context: context, status: .badRequest, type: "text/plain; charset=utf-8",
                    Array("Bad Request (invalid Host header)\n".utf8))
                return
            }
            switch path {
            case "/metrics":
                respond(context: context, status: .ok, type: "text/plain; version=0.0.4; charset=utf-8", endpoint.registry.emitToBuffer())
            case "/healthz":
                respond(context: context, status: .ok, type: "text/plain; charset=utf-8", Array("ok\n".utf8))
            case "/readyz":
                let endpoint = self.endpoint
                answerLater(context: context) {
                    let ready = await endpoint.ready()
                    return (ready ? .ok : .serviceUnavailable, "text/plain; charset=utf-8", Array((ready ? "ready\n" : "not ready\n").utf8))
                }
            case "/admin", "/admin/", "/admin/stats.json":
                admin(context: context)
            default:
                respond(context: context, status: .notFound, type: "text/plain; charset=utf-8", Array("not found\n".utf8))
            }
        }
    }

    private func admin(context: ChannelHandlerContext) {
        guard let page = endpoint.admin else {
            respond(context: context, status: .notFound, type: "text/plain; charset=utf-8", Array("not found (runserver --admin)\n".utf8))
            return
        }
        guard page.allows(authorization: authorization, query: query, cookie: adminCookie) else {
            respond(
                context: context, status: .unauthorized, type: "text/plain; charset=utf-8",
                Array("a token is needed: ?token=… or Authorization: Bearer …\n".utf8))
            return
        }
        if (path == "/admin" || path == "/admin/"), let token = query["token"] {
            // The token moves from the URL (history, logs, Referer) into a cookie only this page
            // gets; the redirect does not echo it.
            respond(
                context: context, status: .found, type: "text/plain; charset=utf-8", Array("see /admin/\n".utf8),
                extraHeaders: [
                    ("location", "/admin/"),
                    ("set-cookie", "\(AdminPage.cookieName)=\(token); Path=/admin; HttpOnly; SameSite=Strict"),
                ])
            return
        }
        switch path {
        case "/admin":
            // The page asks for stats.json relative to itself: it must be served under /admin/.
            respond(
                context: context, status: .found, type: "text/plain; charset=utf-8", Array("see /admin/\n".utf8),
                extraHeaders: [("location", "/admin/")])
        case "/admin/":
            respond(context: context, status: .ok, type: "text/html; charset=utf-8", Array(AdminPage.html.utf8))
        default:
            let channels = (query["channels"] ?? "").split(separator: ",").map(String.init)
            answerLater(context: context) {
                do {
                    return (.ok, "application/json", try await page.reportJSON(channels: channels))
                } catch {
                    return (.serviceUnavailable, "text/plain; charset=utf-8", Array("the layer did not answer: \(error)\n".utf8))
                }
            }
        }
    }

    /// Answers with what `work` returns, once it has (on this connection's loop).
    private func answerLater(
        context: ChannelHandlerContext, _ work: @escaping @Sendable () async -> (HTTPResponseStatus, String, [UInt8])
    ) {
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        context.eventLoop.makeFutureWithTask { await work() }.whenSuccess { status, type, body in
            let (handler, context) = bound.value
            handler.respond(context: context, status: status, type: type, body)
        }
    }

    private func respond(
        context: ChannelHandlerContext, status: HTTPResponseStatus, type: String, _ body: [UInt8],
        extraHeaders: [(String, String)] = []
    ) {
        var headers = HTTPHeaders(extraHeaders)
        headers.add(name: "content-type", value: type)
        headers.add(name: "content-length", value: String(body.count))
        if !keepAlive { headers.add(name: "connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: body)))), promise: nil)
        let channel = context.channel
        let close = !keepAlive
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in
            if close { channel.close(promise: nil) }
        }
    }
}
