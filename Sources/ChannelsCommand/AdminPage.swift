import ASGI
import DequeModule
import Foundation
import ServiceLifecycle
import Synchronization

/// `runserver --admin`: the live operations page and the JSON behind it, served on the metrics
/// port. The process figures are the values of the same counters `/metrics` prints (read from
/// ``MetricTallies``, not parsed back from the text) and the layer's come from the same
/// ``LayerSnapshot`` `stats` prints, so the three always agree. A
/// sample every `interval` is kept for `keep` samples (ten minutes) for the page's charts.
final class AdminPage: Sendable {
    /// The process's own figures (sums over the registry's series).
    struct ProcessFigures: Codable, Sendable, Equatable {
        var websocketsOpen: Double = 0
        var httpRequestsInFlight: Double = 0
        var httpRequests: Double = 0
        var sent: [String: Double] = [:]
        var received: [String: Double] = [:]
        var dropped: [String: Double] = [:]
        var groupSends: Double = 0
        var groupMembersReached: Double = 0
        var consumerErrors: Double = 0
        var delayScheduled: Double = 0
        var delayDelivered: Double = 0
        var delayLate: Double = 0
        var layerErrors: [String: Double] = [:]
    }

    /// One point of the charts: counters as totals (the page turns them into rates).
    struct Sample: Codable, Sendable, Equatable {
        var time: Double
        var websocketsOpen: Double
        var httpRequestsInFlight: Double
        var sent: Double
        var received: Double
        var dropped: Double
        var pending: Int
    }

    /// What `/admin/stats.json` answers.
    struct Report: Codable, Sendable {
        var time: Double
        var intervalSeconds: Double
        var layer: LayerSnapshot
        var process: ProcessFigures
        var history: [Sample]
    }

    let layer: any ChannelLayer
    let routed: Set<String>
    let tallies: MetricTallies
    /// Required (as `Authorization: Bearer …` or `?token=…`) when set.
    let token: String?
    let interval: Duration
    let keep: Int
    private let samples = Mutex<Deque<Sample>>([])

    init(
        layer: any ChannelLayer, routed: Set<String>, tallies: MetricTallies, token: String?,
        interval: Duration = .seconds(2), keep: Int = 300
    ) {
        self.layer = layer
        self.routed = routed
        self.tallies = tallies
        self.token = token
        self.interval = interval
        self.keep = keep
    }

    /// The cookie a browser keeps the token in after its first `?token=` visit.
    static let cookieName = "channels_admin"

    /// Whether a request may see the page: always without a token, else with the right one
    /// (`Authorization: Bearer`, `?token=`, or the cookie the first visit set).
    func allows(authorization: String?, query: [String: String], cookie: String? = nil) -> Bool {
        guard let token else { return true }
        if let cookie, DeploymentSecret.constantTimeEquals(Array(cookie.utf8), Array(token.utf8)) { return true }
        // Compared in constant time: a timing difference would leak the token byte by byte.
        let expected = Array(token.utf8)
        if let authorization, authorization.hasPrefix("Bearer "),
            DeploymentSecret.constantTimeEquals(Array(authorization.utf8.dropFirst(7)), expected)
        {
            return true
        }
        return query["token"].map { DeploymentSecret.constantTimeEquals(Array($0.utf8), expected) } ?? false
    }

    /// The process's figures now: the counters' values, summed over their series.
    func processFigures() -> ProcessFigures {
        var figures = ProcessFigures()
        figures.websocketsOpen = tallies.total("channels_websockets_open")
        figures.httpRequestsInFlight = tallies.total("channels_http_requests_in_flight")
        figures.httpRequests = tallies.total("channels_http_requests_total")
        figures.sent = tallies.totals("channels_messages_sent_total", by: "kind")
        figures.received = tallies.totals("channels_messages_received_total", by: "kind")
        figures.dropped = tallies.totals("channels_dropped_total", by: "reason")
        figures.groupSends = tallies.total("channels_group_sends_total")
        figures.groupMembersReached = tallies.total("channels_group_members_reached_total")
        figures.consumerErrors = tallies.total("channels_consumer_errors_total")
        figures.delayScheduled = tallies.total("channels_delay_scheduled_total")
        figures.delayDelivered = tallies.total("channels_delay_delivered_total")
        figures.delayLate = tallies.total("channels_delay_late_total")
        figures.layerErrors = tallies.totals("channels_layer_errors_total", by: "code")
        return figures
    }

    /// Takes one sample for the charts.
    func sample() async {
        let figures = processFigures()
        let pending = (try? await LayerSnapshot.take(of: layer, channels: [], routed: routed).pendingTotal) ?? 0
        let point = Sample(
            time: WallClock.seconds, websocketsOpen: figures.websocketsOpen,
            httpRequestsInFlight: figures.httpRequestsInFlight, sent: figures.sent.values.reduce(0, +),
            received: figures.received.values.reduce(0, +), dropped: figures.dropped.values.reduce(0, +), pending: pending)
        samples.withLock { samples in
            samples.append(point)
            while samples.count > keep { samples.removeFirst() }
        }
    }

    /// The page's data: the layer (channels named, or the routed and pending ones), the
    /// process's figures and the samples so far.
    func report(channels: [String]) async throws -> Report {
        let snapshot = try await LayerSnapshot.take(of: layer, channels: channels, routed: routed)
        return Report(
            time: WallClock.seconds, intervalSeconds: interval.seconds, layer: snapshot, process: processFigures(),
            history: samples.withLock { Array($0) })
    }

    func reportJSON(channels: [String]) async throws -> [UInt8] {
        Array(try LayerSnapshot.encoder.encode(try await report(channels: channels)))
    }
}

/// The sampler: a sample at once and then every `interval`, until the shutdown.
struct AdminSampler: Service, CustomStringConvertible {
    let page: AdminPage
    var description: String { "admin-sampler" }

    func run() async throws {
        try? await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                await page.sample()
                // A chart's clock: one sample per interval.
                try await Task.sleep(for: page.interval)
            }
        }
    }
}
