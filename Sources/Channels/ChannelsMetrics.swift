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
    static let delayScheduled = Counter(label: "channels_delay_scheduled_total")
    static let delayDelivered = Counter(label: "channels_delay_delivered_total")
    static let delayRetried = Counter(label: "channels_delay_retried_total")
    static let delayLate = Counter(label: "channels_delay_late_total")
    static let delayLateness = Timer(label: "channels_delay_lateness_seconds")

    private static let durations = Mutex<[String: Timer]>([:])
    private static let errors = Mutex<[String: Counter]>([:])

    /// `channels_consumer_duration_seconds{route}`, made once per route.
    static func duration(route: String) -> Timer {
        durations.withLock { timers in
            if let timer = timers[route] { return timer }
            let timer = Timer(label: "channels_consumer_duration_seconds", dimensions: [("route", route)])
            timers[route] = timer
            return timer
        }
    }

    /// `channels_consumer_errors_total{route}`: consumers that threw (other than the
    /// deny / close / consume-later signals).
    static func consumerErrors(route: String) -> Counter {
        errors.withLock { counters in
            if let counter = counters[route] { return counter }
            let counter = Counter(label: "channels_consumer_errors_total", dimensions: [("route", route)])
            counters[route] = counter
            return counter
        }
    }
}
