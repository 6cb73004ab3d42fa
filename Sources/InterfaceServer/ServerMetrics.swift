import ASGI
import CoreMetrics

/// The interface server's metrics, on swift-metrics: exported by whatever backend the process
/// bootstrapped (Prometheus with `--metrics-port`), free when there is none. Labels are
/// bounded: channel kinds and drop reasons, never names or paths.
enum ServerMetrics {
    static let httpRequests = Counter(label: "channels_http_requests_total")
    static let httpInFlight = Meter(label: "channels_http_requests_in_flight")
    static let websocketsOpen = Meter(label: "channels_websockets_open")
    static let sent = ChannelKind.counters("channels_messages_sent_total")
    static let received = ChannelKind.counters("channels_messages_received_total")
    static let dropped = DropReason.counters()
    static let refusedHost = Counter(label: "channels_requests_refused_total", dimensions: [("reason", "host")])
    static let refusedOrigin = Counter(label: "channels_requests_refused_total", dimensions: [("reason", "origin")])
    /// Publications of followed groups: written from the history in a recovery, not written
    /// again (already delivered), and skipped (missing from the history when a gap was filled).
    static let publicationsRecovered = Counter(label: "channels_publications_total", dimensions: [("outcome", "recovered")])
    static let publicationsDeduplicated = Counter(label: "channels_publications_total", dimensions: [("outcome", "deduplicated")])
    static let publicationsSkipped = Counter(label: "channels_publications_total", dimensions: [("outcome", "skipped")])
    static let publicationsCaughtUp = Counter(label: "channels_publications_total", dimensions: [("outcome", "caught_up")])
    /// Connections a limit acted on: timed out, closed idle or slow, refused over a cap.
    static let limits: [ServerCounters.Counter: Counter] = {
        let names: [(ServerCounters.Counter, String)] = [
            (.timedOutHeader, "header_timeout"), (.timedOutBody, "body_timeout"), (.timedOutResponse, "response_timeout"),
            (.closedIdle, "idle"), (.closedSlowHTTPClient, "slow_http_client"), (.closedUpgradeOverflow, "upgrade_overflow"),
            (.refusedMaxConnections, "max_connections"), (.refusedPerAddress, "per_address"),
            (.framesPaced, "frames_paced"), (.httpAborted, "response_aborted"), (.httpStoreLost, "store_lost"),
            (.closedFrameFlood, "frame_flood"), (.httpWorkerLost, "worker_lost"),
        ]
        return Dictionary(
            uniqueKeysWithValues: names.map { ($0.0, Counter(label: "channels_connection_limits_total", dimensions: [("limit", $0.1)])) })
    }()

    /// The drop (if it is one) behind a server counter. Messages a sender gives up on are
    /// counted by the sender itself, with the reason it knows (full or unreachable).
    static func record(_ counter: ServerCounters.Counter, by amount: Int) {
        let reason: DropReason? =
            switch counter {
            case .closedSlowClient, .closedSlowHTTPClient: .slowClient
            case .malformedReplies: .malformed
            default: nil
            }
        if let reason { dropped[reason]?.increment(by: amount) }
        if counter == .refusedHost { refusedHost.increment(by: amount) }
        if counter == .refusedOrigin { refusedOrigin.increment(by: amount) }
        limits[counter]?.increment(by: amount)
    }
}
