/// The channel names ASGI 1.0 gives a meaning to.
public enum ASGIChannel {
    /// An HTTP request from an interface server (``HTTPRequestMessage``).
    public static let httpRequest = "http.request"
    /// A client went away before its HTTP response finished (``HTTPDisconnectMessage``).
    public static let httpDisconnect = "http.disconnect"
    /// The prefix of the single-reader channels that carry a large request body (``HTTPBodyChunk``).
    public static let httpRequestBodyPrefix = "http.request.body?"
    /// A WebSocket asks to connect (``WebSocketConnectMessage``).
    public static let websocketConnect = "websocket.connect"
    /// A frame from a WebSocket client (``WebSocketReceiveMessage``).
    public static let websocketReceive = "websocket.receive"
    /// A WebSocket closed (``WebSocketDisconnectMessage``).
    public static let websocketDisconnect = "websocket.disconnect"
    /// The three WebSocket channels, in the order a socket uses them.
    public static let websocket = [websocketConnect, websocketReceive, websocketDisconnect]
    /// Requests to the delay server: `{"channel", "content", "delay"}`.
    public static let delay = "asgi.delay"
}

/// The name of a reply channel: where the answers for one HTTP request or one WebSocket go.
///
/// An interface server names them after its process channel (`daphne.response.<id>!<suffix>`),
/// so one receive on `daphne.response.<id>!` gets the replies of all its connections; a
/// single-reader name (`...?suffix`) is accepted too, as ASGI 1.0 allows either.
public struct ReplyChannelName: Sendable, Hashable, CustomStringConvertible, ExpressibleByStringLiteral {
    /// The full channel name.
    public let rawValue: String

    /// A checked name: a valid channel name that is process-specific (`!`) or single-reader (`?`).
    public init(validating name: String) throws(ChannelLayerError) {
        try ChannelNames.validateChannel(name)
        guard ChannelNames.isProcessSpecific(name) || ChannelNames.isSingleReader(name) else {
            throw ChannelLayerError(.invalidName, "reply channel '\(name)' is neither process-specific ('!') nor single-reader ('?')")
        }
        rawValue = name
    }

    /// A name known to be valid (the server's own, made from its process channel).
    public init(trusted name: String) { rawValue = name }

    /// A literal name, taken as written (tests, examples).
    public init(stringLiteral name: String) { rawValue = name }

    /// `prefix!` for a process-specific name: the channel the owning process receives on; nil for `?` names.
    public var processChannel: String? {
        ChannelNames.isProcessSpecific(rawValue) ? ChannelNames.nonLocalName(rawValue) : nil
    }

    /// A readable form for logs.
    public var description: String { rawValue }
}
