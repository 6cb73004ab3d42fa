import ASGI

/// Settings of the interface server; every field has the default `runserver` uses.
public struct ServerConfiguration: Sendable {
    /// The address to listen on.
    public var host: String
    /// The port to listen on; 0 picks a free one.
    public var port: Int
    /// Listen on a Unix domain socket instead of host and port.
    public var unixSocketPath: String?
    /// Prefix of this process's reply channel: `<prefix>.<10 letters>!`.
    public var replyChannelPrefix: String
    /// No reply to an HTTP request within this time: 503.
    public var httpTimeout: Duration
    /// No answer to a WebSocket connect within this time: rejected.
    public var websocketConnectTimeout: Duration
    /// Maximum life of a WebSocket; nil for no limit.
    public var websocketTimeout: Duration?
    /// Server-initiated ping interval on WebSockets; nil for none.
    public var pingInterval: Duration?
    /// A ping unanswered for this long closes the socket.
    public var pingTimeout: Duration
    /// Largest request body; past it the answer is 413.
    public var maxBodySize: Int
    /// Bodies larger than this are sent in chunks on a `body_channel`.
    public var bodyChunkSize: Int
    /// Largest WebSocket frame and reassembled message (1009 past it).
    public var maxWebSocketMessageSize: Int
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
    /// Messages one connection may have waiting for the layer before reading from it pauses.
    public var maxHeldMessages: Int
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
        websocketConnectTimeout: Duration = .seconds(5),
        websocketTimeout: Duration? = nil,
        pingInterval: Duration? = .seconds(20),
        pingTimeout: Duration = .seconds(30),
        maxBodySize: Int = 16 * 1024 * 1024,
        bodyChunkSize: Int = 1024 * 1024,
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
        readerRegistrationInterval: Duration = .seconds(2)
    ) {
        self.host = host
        self.port = port
        self.unixSocketPath = unixSocketPath
        self.replyChannelPrefix = replyChannelPrefix
        self.httpTimeout = httpTimeout
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
        self.readerRegistrationInterval = readerRegistrationInterval
    }
}
