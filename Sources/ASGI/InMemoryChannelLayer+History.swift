import DequeModule
import Synchronization

/// One group's history in memory.
struct InMemoryHistory {
    var epoch = PublicationText.newEpoch()
    var offset: UInt64 = 0
    var entries = Deque<(offset: UInt64, message: Message, at: ContinuousClock.Instant)>()

    mutating func trim(_ retention: HistoryRetention, now: ContinuousClock.Instant) {
        while entries.count > retention.size { entries.removeFirst() }
        while let first = entries.first, now - first.at > retention.ttl { entries.removeFirst() }
    }
}

extension InMemoryChannelLayer: ChannelLayerHistory {
    /// Appends to the group's history; see ``ChannelLayerHistory/historyAppend(_:message:retention:)``.
    public func historyAppend(_ group: String, message: Message, retention: HistoryRetention) async throws -> StreamPosition {
        try ChannelNames.validateGroup(group)
        let now = ContinuousClock.now
        return histories.withLock { histories in
            var history = histories[group] ?? InMemoryHistory()
            history.offset += 1
            history.entries.append((history.offset, message, now))
            history.trim(retention, now: now)
            histories[group] = history
            return StreamPosition(offset: history.offset, epoch: history.epoch)
        }
    }

    /// Reads the group's history after a position; see ``ChannelLayerHistory/historyRead(_:after:retention:)``.
    public func historyRead(_ group: String, after position: StreamPosition?, retention: HistoryRetention) async throws -> HistorySlice {
        try ChannelNames.validateGroup(group)
        let now = ContinuousClock.now
        return histories.withLock { histories in
            var history = histories[group] ?? InMemoryHistory()
            history.trim(retention, now: now)
            histories[group] = history
            let top = StreamPosition(offset: history.offset, epoch: history.epoch)
            guard let position, position.epoch == history.epoch else {
                return HistorySlice(entries: [], top: top, complete: position == nil)
            }
            let entries = history.entries.filter { $0.offset > position.offset }.map { (offset: $0.offset, message: $0.message) }
            return HistorySlice(
                entries: entries, top: top,
                complete: HistorySlice.isComplete(after: position, top: top, firstOffset: entries.first?.offset))
        }
    }
}
