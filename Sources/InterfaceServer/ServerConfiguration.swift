import ASGI

/// Settings of the interface server; every field has the default `runserver` uses.
public struct ServerConfiguration: Sendable {
    /// The address to listen on.
    public var host: String
    /// The port to listen on; 0 picks a free one.
    public var port: Int
    /// Listen on a Unix domain socket instead of host and port.
    public var unixSocketPath: String?
    /// The Unix socket's permission bits, set once it is bound: 0o666 (Daphne's), so a proxy
    /// running as another user can connect; 0o660 or 0o600 narrow it to a group or the owner.
    public var unixSocketMode: UInt16 = 0o666
    /// Prefix of this process's reply channel: `<prefix>.<10 letters>!`.
    public var replyChannelPrefix: String
    /// No response started for an HTTP request within this time: 503. A time to first byte: a
    /// response that started (a stream of server-sent events) runs as long as the application wants.
    public var httpTimeout: Duration
    /// From a connection's opening, or a kept-alive connection's first byte, to a complete
    /// request head; past it 408 and close (a connection that sent nothing is just closed).
    public var headerTimeout: Duration
    /// The longest pause between two parts of a request body; past it 408 and close.
    public var bodyTimeout: Duration
    /// Bytes a second a request body must average once its first `bodyTimeout` has passed (0:
    /// no minimum); slower, 408 and close. 240, as ASP.NET Core's Kestrel.
    public var minBodyRate: Int
    /// How long a kept-alive connection may wait idle for its next request.
    public var keepAliveTimeout: Duration
    /// Client connections open at once; past it a new one gets a fast 503 and is closed.
    public var maxConnections: Int
    /// Client connections open at once from one address (nil: no cap). Behind a proxy every
    /// client has the proxy's address: leave it off there.
    public var maxConnectionsPerAddress: Int?
    /// Bytes a client may send while its WebSocket upgrade waits for the application (reading
    /// is paused meanwhile); past it the connection is closed.
    public var maxBytesWhileUpgrading: Int
    /// Response bytes that may wait for an HTTP client that does not read; past it the
    /// connection is closed and the application hears `http.disconnect`.
    public var maxResponseBufferBytes: Int
    /// How long response bytes may wait for a client that reads none of them; past it the
    /// connection is closed (a slow reader that makes progress is not).
    public var writeTimeout: Duration
    /// TLS: the certificate chain (PEM). With `tlsKeyPath`, every connection is TLS
    /// (`https://`, `wss://`), HTTP/2 offered through ALPN.
    public var tlsCertificatePath: String?
    /// TLS: the private key (PEM).
    public var tlsKeyPath: String?
    /// Offer HTTP/2 (ALPN `h2`) on TLS connections.
    public var http2: Bool
    /// Concurrent streams one HTTP/2 connection may open.
    public var http2MaxConcurrentStreams: Int
    /// Stream resets one HTTP/2 connection may cause within 10 seconds; past it the connection
    /// is closed (rapid reset, CVE-2023-44487).
    public var http2MaxResetsPerWindow: Int
    /// No answer to a WebSocket connect within this time: rejected.
    public var websocketConnectTimeout: Duration
    /// Maximum life of a WebSocket; nil for no limit.
    public var websocketTimeout: Duration?
    /// Server-initiated ping interval on WebSockets; nil for none.
    public var pingInterval: Duration?
    /// A ping unanswered for this long closes the socket.
    public var pingTimeout: Duration
    /// How long a socket's presence lasts unless its server renews it (every third of it): a
    /// server that dies has its sockets leave within this plus the sweep (also a third).
    public var presenceTTL: Duration = .seconds(15)
    /// How long this server gathers its sockets' presence changes before it tells each group
    /// one diff of them (a thousand sockets joining at once are a few diffs, not a thousand).
    public var presenceWindow: Duration = .milliseconds(250)
    /// How often this server checks that the sockets following a group are in its member set,
    /// and adds back those missing (an eviction under `maxmemory`; `.zero`: never).
    public var groupCheckInterval: Duration = .seconds(10)
    /// How often the server looks for streamed responses whose worker stopped renewing their
    /// lease (`ResponseStreamLeases`; the worker's lease lasts 20 s by default) and cuts them
    /// (`.zero`: never).
    public var streamLeaseSweep: Duration = .seconds(2)
    /// A group message's frames go to a plain TCP socket with one system call of the server's
    /// own when the channel has nothing unwritten (`DirectSocket.swift`); false: always through the
    /// channel (`runserver --no-direct-writes`).
    public var directWrites = true
    /// A connection's first request, when it is a plain WebSocket upgrade that arrived whole,
    /// is upgraded by the server's own handler (the head parsed in place, the 101 written as
    /// bytes) instead of NIO's HTTP/1 pipeline being built for it and torn down; anything else
    /// goes to that pipeline as before. False: every connection gets the pipeline
    /// (`runserver --no-fast-upgrade`).
    public var fastWebSocketUpgrade = true
    /// Largest request body; past it the answer is 413.
    public var maxBodySize: Int
    /// Bodies larger than this are sent in chunks of this size on a `body_channel`, as they
    /// arrive (a streamed upload holds about this much per connection in the server).
    public var bodyChunkSize: Int
    /// Largest WebSocket frame and reassembled message (1009 past it). The server lowers it (and
    /// `bodyChunkSize`) to what the channel layer's `maxMessageSize` takes.
    public var maxWebSocketMessageSize: Int
    /// The sizes asked for, before the server fitted them to its layer.
    struct Requested: Sendable {
        var maxWebSocketMessageSize: Int
        var bodyChunkSize: Int
    }
    var requested = Requested(maxWebSocketMessageSize: 0, bodyChunkSize: 0)
    /// Largest request head (request line plus headers).
    public var maxHeaderSize: Int
    /// The `Host` names requests may carry (Django's `ALLOWED_HOSTS`; `.example.com` for a
    /// domain and its subdomains, `*` for any); a request naming another host is answered 400.
    /// A WebSocket whose `Origin` names another host is refused with 403.
    public var allowedHosts: [String]
    /// Origins a WebSocket may come from besides those of the allowed hosts (exact origins,
    /// `https://partner.example`; `*` for any).
    public var allowedOrigins: [String]
    /// Makes the tags that stand for reply channels in log lines.
    public var secret: DeploymentSecret
    /// Value of `root_path` in messages.
    public var rootPath: String
    /// Trust `X-Forwarded-For` / `X-Forwarded-Proto` for client address and scheme.
    public var proxyHeaders: Bool
    /// Subprotocols offered back to WebSocket clients that ask for them.
    public var websocketProtocols: [String]
    /// How long a graceful shutdown waits for responses in flight.
    public var shutdownGrace: Duration
    /// How long a send to a full channel (`websocket.receive`, `http.request`) is retried, with
    /// growing pauses and the client's reading paused, before 1013 (WebSocket) or 503 (HTTP).
    public var channelFullTimeout: Duration
    /// How long a WebSocket's frames are held while the layer is unreachable (Redis down)
    /// before the socket is closed with 1011. The socket stays open meanwhile.
    public var layerOutageTimeout: Duration
    /// How long the server may be unable to reach the layer (its registration renewals failing
    /// or hanging) before it closes every socket with 1012: replies and group messages sent to
    /// them meanwhile may be lost (a full or expired process list), and clients that reconnect
    /// recover from their last position. Nil: never. Default 30 s (under the layer's 60 s expiry).
    public var cutOffTimeout: Duration? = .seconds(30)
    /// Messages one connection may have waiting for the layer before reading from it pauses.
    public var maxHeldMessages: Int
    /// Frames a second one WebSocket may send to the layer (in bursts of a tenth of it); past it,
    /// reading from that client pauses until its share is due, so one socket cannot fill
    /// `websocket.receive` for everyone. 0: no limit.
    public var maxFramesPerSecond: Int
    /// Bytes that may wait to be written to one WebSocket client; past it the client is not
    /// reading, and the socket is closed with 1008 so no one else waits on it.
    public var maxQueuedBytesPerSocket: Int
    /// How often the server renews its reply-channel registration with the layer (and so
    /// notices a Redis that came back empty).
    public var readerRegistrationInterval: Duration

    /// A configuration; every argument has the default `runserver` uses.
    public init(
        host: String = "127.0.0.1",
        port: Int = 8000,
        unixSocketPath: String? = nil,
        replyChannelPrefix: String = "swift.response",
        httpTimeout: Duration = .seconds(60),
        headerTimeout: Duration = .seconds(10),
        bodyTimeout: Duration = .seconds(30),
        minBodyRate: Int = 240,
        keepAliveTimeout: Duration = .seconds(20),
        maxConnections: Int = 10_000,
        maxConnectionsPerAddress: Int? = nil,
        maxBytesWhileUpgrading: Int = 64 * 1024,
        maxResponseBufferBytes: Int = 16 * 1024 * 1024,
        writeTimeout: Duration = .seconds(30),
        tlsCertificatePath: String? = nil,
        tlsKeyPath: String? = nil,
        http2: Bool = true,
        http2MaxConcurrentStreams: Int = 100,
        http2MaxResetsPerWindow: Int = 200,
        websocketConnectTimeout: Duration = .seconds(5),
        websocketTimeout: Duration? = nil,
        pingInterval: Duration? = .seconds(20),
        pingTimeout: Duration = .seconds(30),
        maxBodySize: Int = 16 * 1024 * 1024,
        bodyChunkSize: Int = 256 * 1024,
        maxWebSocketMessageSize: Int = 1024 * 1024,
        maxHeaderSize: Int = 64 * 1024,
        allowedHosts: [String] = AllowedHosts.loopbackNames,
        allowedOrigins: [String] = [],
        secret: DeploymentSecret = .random(),
        rootPath: String = "",
        proxyHeaders: Bool = false,
        websocketProtocols: [String] = [],
        shutdownGrace: Duration = .seconds(10),
        channelFullTimeout: Duration = .seconds(10),
        layerOutageTimeout: Duration = .seconds(120),
        maxHeldMessages: Int = 64,
        maxQueuedBytesPerSocket: Int = 4 * 1024 * 1024,
        maxFramesPerSecond: Int = 1000,
        readerRegistrationInterval: Duration = .seconds(2)
    ) {
        self.host = host
        self.port = port
        self.unixSocketPath = unixSocketPath
        self.replyChannelPrefix = replyChannelPrefix
        self.httpTimeout = httpTimeout
        self.headerTimeout = headerTimeout
        self.bodyTimeout = bodyTimeout
        self.minBodyRate = minBodyRate
        self.keepAliveTimeout = keepAliveTimeout
        self.maxConnections = maxConnections
        self.maxConnectionsPerAddress = maxConnectionsPerAddress
        self.maxBytesWhileUpgrading = maxBytesWhileUpgrading
        self.maxResponseBufferBytes = maxResponseBufferBytes
        self.writeTimeout = writeTimeout
        self.tlsCertificatePath = tlsCertificatePath
        self.tlsKeyPath = tlsKeyPath
        self.http2 = http2
        self.http2MaxConcurrentStreams = http2MaxConcurrentStreams
        self.http2MaxResetsPerWindow = http2MaxResetsPerWindow
        self.websocketConnectTimeout = websocketConnectTimeout
        self.websocketTimeout = websocketTimeout
        self.pingInterval = pingInterval
        self.pingTimeout = pingTimeout
        self.maxBodySize = maxBodySize
        self.bodyChunkSize = bodyChunkSize
        self.maxWebSocketMessageSize = maxWebSocketMessageSize
        self.maxHeaderSize = maxHeaderSize
        self.allowedHosts = allowedHosts
        self.allowedOrigins = allowedOrigins
        self.secret = secret
        self.rootPath = rootPath
        self.proxyHeaders = proxyHeaders
        self.websocketProtocols = websocketProtocols
        self.shutdownGrace = shutdownGrace
        self.channelFullTimeout = channelFullTimeout
        self.layerOutageTimeout = layerOutageTimeout
        self.maxHeldMessages = maxHeldMessages
        self.maxQueuedBytesPerSocket = maxQueuedBytesPerSocket
        self.maxFramesPerSecond = maxFramesPerSecond
        self.readerRegistrationInterval = readerRegistrationInterval
    }
}

extension ServerConfiguration {
    /// The deadlines of an HTTP connection.
    var connectionTimeouts: HTTPConnectionStateMachine.Timeouts {
        .init(
            header: headerTimeout, body: bodyTimeout, firstByte: httpTimeout, keepAlive: keepAliveTimeout,
            minBodyRate: minBodyRate)
    }
}

extension ServerConfiguration {
    /// Room kept in a layer message for what rides with a frame (reply channel, path, order)
    /// and, for a body chunk, with the request head.
    static let frameHeadroom = 4096

    /// The configuration with WebSocket messages and body chunks no larger than a layer with a
    /// `limit` per message takes (at least 1 KiB each); ``requested`` keeps what was asked.
    func fitted(toLayerLimit limit: Int) -> ServerConfiguration {
        var fitted = self
        fitted.requested = Requested(maxWebSocketMessageSize: maxWebSocketMessageSize, bodyChunkSize: bodyChunkSize)
        fitted.maxWebSocketMessageSize = min(maxWebSocketMessageSize, max(1024, limit - Self.frameHeadroom))
        fitted.bodyChunkSize = min(bodyChunkSize, max(1024, limit - Self.frameHeadroom - maxHeaderSize))
        return fitted
    }
}
