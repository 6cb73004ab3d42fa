import Synchronization

/// Leases in this process's memory. Every holder is in this process, so one lapses only when
/// a holder stopped renewing it without releasing it (a task that ended early): the same
/// rules as the Redis layer's, for the code and the tests above the layer.
extension InMemoryChannelLayer: ChannelLayerLeases {
    /// Takes or renews the lease on `name` in `pool` for `duration`, with `note` (in this process).
    public func holdLease(_ name: String, in pool: String, note: String, for duration: Duration) async throws(ChannelLayerError) {
        let until = ContinuousClock.now + duration
        leaseState.withLock { $0[pool, default: [:]][name] = (until, note) }
    }

    /// Takes the lease on `name` in `pool` only when there is none; returns whether it took it.
    public func takeFreeLease(_ name: String, in pool: String, note: String, for duration: Duration) async throws(ChannelLayerError)
        -> Bool
    {
        let until = ContinuousClock.now + duration
        return leaseState.withLock { pools in
            guard pools[pool]?[name] == nil else { return false }
            pools[pool, default: [:]][name] = (until, note)
            return true
        }
    }

    /// Claims up to `max` lapsed leases of `pool` for `duration` each, in one step.
    public func claimLapsedLeases(in pool: String, max: Int, for duration: Duration) async throws(ChannelLayerError)
        -> [ChannelLayerLease]
    {
        let now = ContinuousClock.now
        return leaseState.withLock { pools in
            guard var leases = pools[pool] else { return [] }
            let lapsed = leases.filter { $0.value.until <= now }.sorted { $0.value.until < $1.value.until }.prefix(Swift.max(0, max))
            for (name, lease) in lapsed { leases[name] = (now + duration, lease.note) }
            pools[pool] = leases
            return lapsed.map { ChannelLayerLease(name: $0.key, note: $0.value.note) }
        }
    }

    /// Gives up the lease on `name` in `pool` (with `note`: only while its note is that one).
    public func releaseLease(_ name: String, in pool: String, ifNote note: String?) async throws(ChannelLayerError) {
        leaseState.withLock { pools in
            guard let lease = pools[pool]?[name], note == nil || lease.note == note else { return }
            pools[pool]?[name] = nil
            if pools[pool]?.isEmpty == true { pools[pool] = nil }
        }
    }
}
