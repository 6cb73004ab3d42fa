import ASGI
import CoreMetrics
import Synchronization

/// The framework's metrics (worker, consumers, delay server), on swift-metrics: exported by
/// whatever backend the process bootstrapped (Prometheus with `--metrics-port`), free when
/// there is none. Labels are bounded: channel kinds, drop reasons and route names (the
/// routing table's, never a path).
enum ChannelsMetrics {
    static let received = ChannelKind.counters("channels_messages_received_total")
    static let sent = ChannelKind.counters("channels_messages_sent_total")
    static let groupSends = Counter(label: "channels_group_sends_total")
    static let dropped = DropReason.counters()
    /// `channels_ordering_skipped_total`: messages of ordered sequences given up as lost (a
    /// gap skipped after the gap timeout, or proven lost by the gap before it).
    static let orderingSkipped = Counter(label: "channels_ordering_skipped_total")
    /// `channels_ordering_resumed_total`: ordered sockets whose every watching worker stopped
    /// (killed) while messages waited, taken over by this worker (see `OrderingSweeper`).
    static let orderingResumed = Counter(label: "channels_ordering_resumed_total")
    /// `channels_ordering_resent_held_total`: ordered messages marked as sent again after a lost
    /// connection, held back for `resentGrace` when their turn came (see `OrderingGate`).
    static let resentHeldBack = Counter(label: "channels_ordering_resent_held_total")
    static let delayScheduled = Counter(label: "channels_delay_scheduled_total")
    static let delayDelivered = Counter(label: "channels_delay_delivered_total")
    static let delayRetried = Counter(label: "channels_delay_retried_total")
    static let delayLate = Counter(label: "channels_delay_late_total")
    static let delayLateness = Timer(label: "channels_delay_lateness_seconds")

    /// A route's metrics, made once per route name.
    struct RouteMetrics {
        /// `channels_consumer_duration_seconds{route}`.
        let duration: Timer
        /// `channels_consumer_errors_total{route}`: consumers that threw (other than the
        /// deny / close / consume-later signals).
        let errors: Counter
    }

    private static let routes = Mutex<[String: RouteMetrics]>([:])

    /// The metrics of the route named `route`.
    static func route(_ route: String) -> RouteMetrics {
        routes.withLock { routes in
            if let metrics = routes[route] { return metrics }
            let label = [("route", route)]
            let metrics = RouteMetrics(
                duration: Timer(label: "channels_consumer_duration_seconds", dimensions: label),
                errors: Counter(label: "channels_consumer_errors_total", dimensions: label))
            routes[route] = metrics
            return metrics
        }
    }
}
