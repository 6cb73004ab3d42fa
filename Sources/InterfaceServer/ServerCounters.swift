import Synchronization

/// What the interface server did about load and failures, counted: nothing it gives up on is
/// silent. Read them with ``InterfaceServer/statistics``.
public struct ServerStatistics: Sendable, Hashable, Codable {
    /// Sends to a full channel that were held and retried (the client's reading paused).
    public var sendFullRetried = 0
    /// Sends held because the layer was unreachable.
    public var sendHeldForOutage = 0
    /// Held sends that went through after all.
    public var sendRecovered = 0
    /// Messages dropped after the retries were exhausted or the layer refused them.
    public var heldDropped = 0
    /// WebSockets closed with 1013 because their channel stayed full.
    public var closedChannelFull = 0
    /// WebSockets closed with 1011 because the layer stayed unreachable.
    public var closedLayerUnavailable = 0
    /// WebSockets closed with 1008 because the client did not read what was sent to it.
    public var closedSlowClient = 0
    /// WebSockets closed with 1012 because the layer lost its data (groups and sessions).
    public var closedStoreLost = 0
    /// HTTP requests answered 503 because the channel stayed full or the layer was down.
    public var httpUnavailable = 0
    /// Replies for connections that had already gone.
    public var unroutableReplies = 0
    /// Replies the server could not read (an HTTP reply without a valid status, a WebSocket
    /// reply with a bad close code): logged, counted, answered 500 or ignored.
    public var malformedReplies = 0
    /// Requests and WebSocket handshakes answered 400 because their `Host` is not an allowed host.
    public var refusedHost = 0
    /// WebSocket handshakes answered 403 because their `Origin` is not allowed.
    public var refusedOrigin = 0
    /// Request heads that did not finish within `headerTimeout`: 408 and closed (slow-loris).
    public var timedOutHeader = 0
    /// Request bodies that paused longer than `bodyTimeout`: 408 and closed.
    public var timedOutBody = 0
    /// Requests the application did not start answering within `httpTimeout`: 503.
    public var timedOutResponse = 0
    /// Connections closed idle: nothing sent within `headerTimeout` of opening, or kept alive
    /// past `keepAliveTimeout` without a new request.
    public var closedIdle = 0
    /// HTTP connections closed because the client did not read its response and more than
    /// `maxResponseBufferBytes` waited for it.
    public var closedSlowHTTPClient = 0
    /// Connections closed because the client sent more than `maxBytesWhileUpgrading` while its
    /// WebSocket upgrade was with the application.
    public var closedUpgradeOverflow = 0
    /// Connections refused (503, closed) because `maxConnections` were open.
    public var refusedMaxConnections = 0
    /// Connections refused because their address had `maxConnectionsPerAddress` open.
    public var refusedPerAddress = 0
    /// Times a WebSocket sent past `maxFramesPerSecond` and reading from it paused (nothing
    /// is dropped: the client waits).
    public var framesPaced = 0
    /// WebSockets closed with 1008 because they sent more frames at once, past their share, than
    /// ten seconds' share (`maxFramesPerSecond`, at least 1,000): more than the server holds.
    public var closedFrameFlood = 0
    /// Data frames a client sent after this server's close frame (before it saw it): dropped,
    /// as RFC 6455 allows (a socket closed for a flood or a full channel has many).
    public var framesAfterClose = 0
    /// HTTP responses cut because the application failed while sending them (`abort`).
    public var httpAborted = 0
    /// HTTP requests in flight closed because the layer lost its data (their replies with it).
    public var httpStoreLost = 0
    /// Streamed HTTP responses cut (503 if not started) because the worker sending them stopped
    /// renewing their lease (`ResponseStreamLeases`): it died, or lost the layer for that long.
    public var httpWorkerLost = 0
    /// Group messages' frames sent to a socket with the server's own system call (one per
    /// socket per hand-over; see `ServerConfiguration.directWrites`).
    public var directSends = 0
    /// Of those, the ones the kernel did not take whole: the rest went through the channel.
    public var directRemainders = 0
    /// WebSocket handshakes accepted through the server's own upgrade handler (see
    /// `ServerConfiguration.fastWebSocketUpgrade`); the others went through NIO's HTTP/1 pipeline.
    public var fastUpgrades = 0
    /// WebSocket sessions in memory: the open sockets' and those of sockets that closed a
    /// moment ago. A figure that stays above the open sockets' count is a leak.
    public var webSocketSessionsAlive = 0

    /// All counters at zero.
    public init() {}
}

/// The counters behind ``ServerStatistics``; they move only on overload and failure paths.
final class ServerCounters: Sendable {
    enum Counter: Int, CaseIterable {
        case sendFullRetried, sendHeldForOutage, sendRecovered, heldDropped, closedChannelFull,
            closedLayerUnavailable, closedSlowClient, closedStoreLost, httpUnavailable, malformedReplies,
            refusedHost, refusedOrigin, timedOutHeader, timedOutBody, timedOutResponse, closedIdle,
            closedSlowHTTPClient, closedUpgradeOverflow, refusedMaxConnections, refusedPerAddress, framesPaced,
            httpAborted, httpStoreLost, closedFrameFlood, framesAfterClose, httpWorkerLost
    }

    private let values = Mutex([Int](repeating: 0, count: Counter.allCases.count))
    /// Direct sends (``ServerStatistics/directSends``): counted on the delivery path, so atomics.
    let directSends = Atomic<Int>(0)
    let directRemainders = Atomic<Int>(0)
    /// Handshakes accepted by the fast upgrade handler.
    let fastUpgrades = Atomic<Int>(0)
    /// WebSocket sessions alive (made, not yet freed).
    let sessionsAlive = Atomic<Int>(0)

    func count(_ counter: Counter, by amount: Int = 1) {
        guard amount > 0 else { return }
        values.withLock { $0[counter.rawValue] += amount }
        ServerMetrics.record(counter, by: amount)
    }

    subscript(_ counter: Counter) -> Int { values.withLock { $0[counter.rawValue] } }

    func snapshot(unroutable: Int) -> ServerStatistics {
        var stats = ServerStatistics()
        stats.sendFullRetried = self[.sendFullRetried]
        stats.sendHeldForOutage = self[.sendHeldForOutage]
        stats.sendRecovered = self[.sendRecovered]
        stats.heldDropped = self[.heldDropped]
        stats.closedChannelFull = self[.closedChannelFull]
        stats.closedLayerUnavailable = self[.closedLayerUnavailable]
        stats.closedSlowClient = self[.closedSlowClient]
        stats.closedStoreLost = self[.closedStoreLost]
        stats.httpUnavailable = self[.httpUnavailable]
        stats.malformedReplies = self[.malformedReplies]
        stats.refusedHost = self[.refusedHost]
        stats.refusedOrigin = self[.refusedOrigin]
        stats.timedOutHeader = self[.timedOutHeader]
        stats.timedOutBody = self[.timedOutBody]
        stats.timedOutResponse = self[.timedOutResponse]
        stats.closedIdle = self[.closedIdle]
        stats.closedSlowHTTPClient = self[.closedSlowHTTPClient]
        stats.closedUpgradeOverflow = self[.closedUpgradeOverflow]
        stats.refusedMaxConnections = self[.refusedMaxConnections]
        stats.refusedPerAddress = self[.refusedPerAddress]
        stats.framesPaced = self[.framesPaced]
        stats.closedFrameFlood = self[.closedFrameFlood]
        stats.framesAfterClose = self[.framesAfterClose]
        stats.httpAborted = self[.httpAborted]
        stats.httpStoreLost = self[.httpStoreLost]
        stats.httpWorkerLost = self[.httpWorkerLost]
        stats.directSends = directSends.load(ordering: .relaxed)
        stats.directRemainders = directRemainders.load(ordering: .relaxed)
        stats.webSocketSessionsAlive = sessionsAlive.load(ordering: .relaxed)
        stats.fastUpgrades = fastUpgrades.load(ordering: .relaxed)
        stats.unroutableReplies = unroutable
        return stats
    }
}
