import CoreMetrics
import Synchronization

/// The metrics backend of a process with `--metrics-port`: every counter and meter is a
/// Prometheus one (what `/metrics` prints) that also keeps its value here, where the admin page
/// reads it directly (no Prometheus text printed and parsed back). Recorders and timers are
/// Prometheus's alone.
final class MetricTallies: Sendable {
    /// One series: a label and its dimensions.
    struct Series: Hashable, Sendable {
        let label: String
        let dimensions: [String: String]
    }

    private let values = Mutex<[Series: Value]>([:])

    /// A series' running value (the box the handlers update).
    final class Value: Sendable {
        private let bits = Atomic<UInt64>(0.0.bitPattern)
        var current: Double { Double(bitPattern: bits.load(ordering: .relaxed)) }
        func add(_ amount: Double) {
            var old = bits.load(ordering: .relaxed)
            while true {
                let (exchanged, original) = bits.compareExchange(
                    expected: old, desired: (Double(bitPattern: old) + amount).bitPattern, ordering: .relaxed)
                if exchanged { return }
                old = original
            }
        }
        func set(_ value: Double) { bits.store(value.bitPattern, ordering: .relaxed) }
    }

    func value(_ label: String, _ dimensions: [(String, String)]) -> Value {
        let series = Series(label: label, dimensions: Dictionary(dimensions, uniquingKeysWith: { _, last in last }))
        return values.withLock { values in
            if let value = values[series] { return value }
            let value = Value()
            values[series] = value
            return value
        }
    }

    /// Every series of `label` with its value.
    func series(_ label: String) -> [(dimensions: [String: String], value: Double)] {
        values.withLock { values in values.compactMap { $0.key.label == label ? ($0.key.dimensions, $0.value.current) : nil } }
    }

    /// The sum of `label` over its series.
    func total(_ label: String) -> Double { series(label).reduce(0) { $0 + $1.value } }

    /// The sums of `label` by the value of its dimension `key`.
    func totals(_ label: String, by key: String) -> [String: Double] {
        series(label).reduce(into: [:]) { $0[$1.dimensions[key] ?? "?", default: 0] += $1.value }
    }
}

/// `factory`'s metrics, with their counters and meters also kept in `tallies`.
struct TallyingMetricsFactory: MetricsFactory {
    let factory: any MetricsFactory
    let tallies: MetricTallies

    func makeCounter(label: String, dimensions: [(String, String)]) -> any CounterHandler {
        TalliedCounter(inner: factory.makeCounter(label: label, dimensions: dimensions), value: tallies.value(label, dimensions))
    }

    func makeFloatingPointCounter(label: String, dimensions: [(String, String)]) -> any FloatingPointCounterHandler {
        factory.makeFloatingPointCounter(label: label, dimensions: dimensions)
    }

    func makeMeter(label: String, dimensions: [(String, String)]) -> any MeterHandler {
        TalliedMeter(inner: factory.makeMeter(label: label, dimensions: dimensions), value: tallies.value(label, dimensions))
    }

    func makeRecorder(label: String, dimensions: [(String, String)], aggregate: Bool) -> any RecorderHandler {
        factory.makeRecorder(label: label, dimensions: dimensions, aggregate: aggregate)
    }

    func makeTimer(label: String, dimensions: [(String, String)]) -> any TimerHandler {
        factory.makeTimer(label: label, dimensions: dimensions)
    }

    func destroyCounter(_ handler: any CounterHandler) {
        factory.destroyCounter((handler as? TalliedCounter)?.inner ?? handler)
    }

    func destroyFloatingPointCounter(_ handler: any FloatingPointCounterHandler) { factory.destroyFloatingPointCounter(handler) }

    func destroyMeter(_ handler: any MeterHandler) {
        factory.destroyMeter((handler as? TalliedMeter)?.inner ?? handler)
    }

    func destroyRecorder(_ handler: any RecorderHandler) { factory.destroyRecorder(handler) }

    func destroyTimer(_ handler: any TimerHandler) { factory.destroyTimer(handler) }
}

private final class TalliedCounter: CounterHandler {
    let inner: any CounterHandler
    let value: MetricTallies.Value

    init(inner: any CounterHandler, value: MetricTallies.Value) {
        self.inner = inner
        self.value = value
    }

    func increment(by amount: Int64) {
        inner.increment(by: amount)
        value.add(Double(amount))
    }

    func reset() {
        inner.reset()
        value.set(0)
    }
}

private final class TalliedMeter: MeterHandler {
    let inner: any MeterHandler
    let value: MetricTallies.Value

    init(inner: any MeterHandler, value: MetricTallies.Value) {
        self.inner = inner
        self.value = value
    }

    func set(_ value: Int64) {
        inner.set(value)
        self.value.set(Double(value))
    }

    func set(_ value: Double) {
        inner.set(value)
        self.value.set(value)
    }

    func increment(by amount: Double) {
        inner.increment(by: amount)
        value.add(amount)
    }

    func decrement(by amount: Double) {
        inner.decrement(by: amount)
        value.add(-amount)
    }
}
