import ASGI
import CoreMetrics

/// The Redis layer's metrics, per shard (labelled `host:port/db`: as many values as configured
/// servers), on swift-metrics.
struct RedisMetrics: Sendable {
    /// `channels_redis_round_trip_seconds{shard}`: one pipelined request, written to answered
    /// (blocking receives are not timed: their wait is not a round trip).
    let roundTrip: Timer
    /// `channels_redis_reconnects_total{shard}`: the shared connection opened again after it died.
    let reconnects: Counter
    /// `channels_redis_failed_requests_total{shard}`: requests that failed with the connection
    /// (retries included; what callers finally see is `channels_layer_errors_total{code}`).
    let failedRequests: Counter

    /// `channels_dropped_total{reason="malformed"}`: bodies that are not valid msgpack.
    static let malformed = Counter(label: "channels_dropped_total", dimensions: [("reason", DropReason.malformed.rawValue)])

    /// `channels_dropped_total{reason="undecryptable"}`: bodies no configured key decrypts.
    static let undecryptable = Counter(label: "channels_dropped_total", dimensions: [("reason", DropReason.undecryptable.rawValue)])

    init(endpoint: RedisEndpoint) {
        let shard = [("shard", endpoint.metricsLabel)]
        roundTrip = Timer(label: "channels_redis_round_trip_seconds", dimensions: shard)
        reconnects = Counter(label: "channels_redis_reconnects_total", dimensions: shard)
        failedRequests = Counter(label: "channels_redis_failed_requests_total", dimensions: shard)
    }
}
