import Synchronization

/// What `stats` and the admin page read of the in-memory layer.
extension InMemoryChannelLayer {
    /// Messages sent and full refusals since the layer started.
    public func globalStatistics() async throws(ChannelLayerError) -> GlobalStatistics {
        state.withLock { state in
            GlobalStatistics(messagesCount: state.global.messages, channelFullCount: state.global.full)
        }
    }

    /// One channel's figures: sent, full refusals, pending, the oldest message's age.
    public func channelStatistics(_ channel: String) async throws(ChannelLayerError) -> ChannelStatistics {
        try ChannelNames.validateChannel(channel, for: .receive)
        let key = ChannelNames.nonLocalName(channel)
        let now = ContinuousClock.now
        return state.withLock { state in
            state.purge(key, now: now)
            let counters = state.counters[key] ?? Counters()
            let queue = state.queues[key]
            let age = queue?.first.map { (now - $0.sentAt).seconds } ?? 0
            return ChannelStatistics(
                messagesCount: counters.messages, channelFullCount: counters.full,
                messagesPending: queue?.count ?? 0, messagesMaxAge: age)
        }
    }

    /// How many messages wait on each of `channels`.
    public func pendingCounts(_ channels: [String]) async throws(ChannelLayerError) -> [Int] {
        for channel in channels { try ChannelNames.validateChannel(channel, for: .receive) }
        let now = ContinuousClock.now
        return state.withLock { state in
            channels.map { channel in
                let key = ChannelNames.nonLocalName(channel)
                state.purge(key, now: now)
                return state.queues[key]?.count ?? 0
            }
        }
    }

    /// Names of the channels that hold messages now (for `stats`).
    public func pendingChannels() async throws(ChannelLayerError) -> [String] {
        let now = ContinuousClock.now
        return state.withLock { state in
            state.sweep(now: now)
            return state.queues.keys.sorted()
        }
    }

    /// Names of the groups with members (for `stats`).
    public func groups() async throws(ChannelLayerError) -> [String] {
        let cutoff = ContinuousClock.now - configuration.groupExpiry
        return state.withLock { state in
            state.groups.filter { $0.value.values.contains { $0 > cutoff } }.keys.sorted()
        }
    }
}
