import ASGI
import Synchronization

/// The tops of followed groups' histories, for the sockets' tail checks: one read per group at a
/// time, and its answer reused for a moment, so a thousand sockets that check the same group
/// after a burst cost one read.
final class HistoryTops: Sendable {
    private struct Entry {
        var read: Task<StreamPosition?, Never>
        /// When the read finished (nil while it runs).
        var finishedAt: ContinuousClock.Instant?
    }
    private let entries = Mutex<[String: Entry]>([:])
    /// How long a finished read answers for.
    static let reuse = Duration.milliseconds(250)

    /// `group`'s top (nil when it cannot be read now).
    func top(_ group: String, retention: HistoryRetention, history: any ChannelLayerHistory) async -> StreamPosition? {
        let now = ContinuousClock.now
        let read = entries.withLock { entries -> Task<StreamPosition?, Never> in
            if let entry = entries[group], entry.finishedAt.map({ now - $0 < Self.reuse }) ?? true { return entry.read }
            if entries.count > 1024 {
                entries = entries.filter { $0.value.finishedAt.map { now - $0 < Self.reuse } ?? true }
            }
            let read = Task { try? await history.historyRead(group, after: nil, retention: retention).top }
            entries[group] = Entry(read: read, finishedAt: nil)
            return read
        }
        let top = await read.value
        let finished = ContinuousClock.now
        entries.withLock { entries in
            if entries[group]?.finishedAt == nil { entries[group]?.finishedAt = finished }
        }
        return top
    }
}
