import CoreMetrics

/// What a channel is for, as metrics label it: a small fixed set, never a raw channel name
/// (names carry random parts and would make a label per socket).
public enum ChannelKind: String, Sendable, CaseIterable {
    /// `http.request`, `http.request.body?...`, `http.disconnect`.
    case http
    /// `websocket.connect`, `websocket.receive`, `websocket.disconnect`.
    case websocket
    /// Process-specific channels (with `!`): replies to a server, `websocket.send!...`.
    case process
    /// The application's own channels (`chat-messages`, `asgi.delay`, ...).
    case custom

    /// The kind of `channel`.
    public init(channel: String) {
        if ChannelNames.isProcessSpecific(channel) {
            self = .process
        } else if channel.hasPrefix("http.") {
            self = .http
        } else if channel.hasPrefix("websocket.") {
            self = .websocket
        } else {
            self = .custom
        }
    }
}

/// Why a message was dropped, as the `reason` label of `channels_dropped_total`.
public enum DropReason: String, Sendable, CaseIterable {
    /// The channel stayed full for the whole retry bound.
    case channelFull = "channel_full"
    /// The message expired in the layer before anyone received it.
    case expired
    /// The message could not be read (not msgpack, a reply without a status, a bad close code).
    case malformed
    /// Encrypted with a key the layer does not have, expired, or altered (Redis layer encryption).
    case undecryptable
    /// Over a size limit (a request body, a WebSocket message, a layer message).
    case tooLarge = "too_large"
    /// A reply for a connection this server no longer has.
    case unroutableReply = "unroutable_reply"
    /// A WebSocket client that did not read what it was sent.
    case slowClient = "slow_client"
    /// A send that still failed after its retries (the layer unreachable, a full channel).
    case retriesExhausted = "retries_exhausted"
    /// A message of an ordered sequence that came after its turn had passed (its gap was
    /// skipped as lost: a worker that held it longer than the gap timeout).
    case late
    /// Frames a WebSocket client sent past its share (`--max-frames-per-second`), more at once
    /// than the server holds for it: the socket is closed (1008) and they are dropped.
    case rateExceeded = "rate_exceeded"
}

extension ChannelKind {
    /// One counter per kind, labelled `kind`.
    public static func counters(_ label: String) -> [ChannelKind: Counter] {
        Dictionary(uniqueKeysWithValues: allCases.map { ($0, Counter(label: label, dimensions: [("kind", $0.rawValue)])) })
    }
}

extension DropReason {
    /// `channels_dropped_total`, one counter per reason.
    public static func counters() -> [DropReason: Counter] {
        Dictionary(
            uniqueKeysWithValues: allCases.map { ($0, Counter(label: "channels_dropped_total", dimensions: [("reason", $0.rawValue)])) })
    }
}

/// Metrics every layer emits the same way.
public enum LayerMetrics {
    /// `channels_group_members_reached_total`: members a group send delivered to (members
    /// skipped because their channel was full count as `channels_dropped_total{reason="channel_full"}`).
    public static let groupMembersReached = Counter(label: "channels_group_members_reached_total")
    /// `channels_dropped_total{reason="channel_full"}` for group members skipped.
    public static let groupMembersMissed = Counter(
        label: "channels_dropped_total", dimensions: [("reason", DropReason.channelFull.rawValue)])
    /// `channels_dropped_total{reason="expired"}`: messages that expired in the layer unread.
    public static let expired = Counter(label: "channels_dropped_total", dimensions: [("reason", DropReason.expired.rawValue)])
}
