import DequeModule
import Synchronization

/// One group's history in memory.
struct InMemoryHistory {
    var epoch = PublicationText.newEpoch()
    var offset: UInt64 = 0
    var entries = Deque<(offset: UInt64, message: Message, at: ContinuousClock.Instant)>()
    var lastUsed = ContinuousClock.now
    var ttl = Duration.seconds(300)

    mutating func trim(_ retention: HistoryRetention, now: ContinuousClock.Instant) {
        while entries.count > retention.size { entries.removeFirst() }
        while let first = entries.first, now - first.at > retention.ttl { entries.removeFirst() }
        lastUsed = now
        ttl = retention.ttl
    }
}

/// The histories of every group, forgetting those nobody used for longer than their ttl (and at
/// least ten minutes): a room name read once does not stay for the process's life. A socket that
/// comes back to a forgotten room hears of a new epoch.
struct InMemoryHistories {
    var groups: [String: InMemoryHistory] = [:]
    private var operations = 0

    mutating func with<T>(_ group: String, now: ContinuousClock.Instant, _ body: (inout InMemoryHistory) -> T) -> T {
        operations += 1
        if operations >= 1000 {
            operations = 0
            groups = groups.filter { now - $0.value.lastUsed <= max($0.value.ttl, .seconds(600)) }
        }
        var history = groups[group] ?? InMemoryHistory()
        defer { groups[group] = history }
        return body(&history)
    }
}

extension InMemoryChannelLayer: ChannelLayerHistory {
    /// Appends to the group's history; see ``ChannelLayerHistory/historyAppend(_:message:retention:)``.
    public func historyAppend(_ group: String, message: Message, retention: HistoryRetention) async throws(ChannelLayerError)
        -> StreamPosition
    {
        try ChannelNames.validateGroup(group)
        let now = ContinuousClock.now
        return histories.withLock { histories in
            histories.with(group, now: now) { history in
                history.offset += 1
                history.entries.append((history.offset, message, now))
                history.trim(retention, now: now)
                return StreamPosition(offset: history.offset, epoch: history.epoch)
            }
        }
    }

    /// Reads the group's history after a position; see ``ChannelLayerHistory/historyRead(_:after:retention:)``.
    public func historyRead(_ group: String, after position: StreamPosition?, retention: HistoryRetention) async throws(ChannelLayerError)
        -> HistorySlice
    {
        try ChannelNames.validateGroup(group)
        let now = ContinuousClock.now
        return histories.withLock { histories in
            histories.with(group, now: now) { history in
                history.trim(retention, now: now)
                return history.slice(after: position)
            }
        }
    }
}

extension InMemoryHistory {
    /// The entries after `position`, and the top.
    func slice(after position: StreamPosition?) -> HistorySlice {
        let top = StreamPosition(offset: offset, epoch: epoch)
        guard let position, position.epoch == epoch else {
            return HistorySlice(entries: [], top: top, complete: position == nil)
        }
        let after = entries.filter { $0.offset > position.offset }.map { (offset: $0.offset, message: $0.message) }
        return HistorySlice(
            entries: after, top: top, complete: HistorySlice.isComplete(after: position, top: top, firstOffset: after.first?.offset))
    }
}
