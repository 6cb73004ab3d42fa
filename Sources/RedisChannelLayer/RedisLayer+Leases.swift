import ASGI

/// Leases (``ChannelLayerLeases``): a pool is a sorted set, `<prefix>leases:<pool>` (lease →
/// the millisecond it lapses, on Redis's `TIME`), and a hash of the holders' notes,
/// `<prefix>leases-note:<pool>`, both on the pool's shard. No channel has a `:` in its name,
/// so neither key can be a channel's list.
extension RedisChannelLayer: ChannelLayerLeases {
    private func leaseKeys(_ pool: String) -> [RedisArgument] {
        [.key(configuration.prefix, "leases:" + pool), .key(configuration.prefix, "leases-note:" + pool)]
    }

    /// Takes or renews the lease on `name` in `pool` for `duration`, with `note` (in Redis, lapsing on its `TIME`).
    public func holdLease(_ name: String, in pool: String, note: String, for duration: Duration) async throws(ChannelLayerError) {
        try await withLayerErrors {
            let reply = try await pipelined(
                shardIndex(for: pool), Scripts.holdLease, keys: leaseKeys(pool),
                args: [.text(name), .text(note), .integer(Self.milliseconds(duration))])
            if case .error = reply { throw unexpected(reply, doing: "hold a lease") }
        }
    }

    /// Takes the lease on `name` in `pool` only when there is none; returns whether it took it.
    public func takeFreeLease(_ name: String, in pool: String, note: String, for duration: Duration) async throws(ChannelLayerError)
        -> Bool
    {
        try await withLayerErrors {
            let reply = try await pipelined(
                shardIndex(for: pool), Scripts.takeFreeLease, keys: leaseKeys(pool),
                args: [.text(name), .text(note), .integer(Self.milliseconds(duration))])
            guard let taken = reply.integer else { throw unexpected(reply, doing: "take a free lease") }
            return taken == 1
        }
    }

    /// Claims up to `max` lapsed leases of `pool` for `duration` each, in one step.
    public func claimLapsedLeases(in pool: String, max: Int, for duration: Duration) async throws(ChannelLayerError)
        -> [ChannelLayerLease]
    {
        try await withLayerErrors {
            let reply = try await pipelined(
                shardIndex(for: pool), Scripts.claimLapsedLeases, keys: leaseKeys(pool),
                args: [.integer(Swift.max(0, max)), .integer(Self.milliseconds(duration))])
            guard let items = reply.array else { throw unexpected(reply, doing: "claim lapsed leases") }
            return stride(from: 0, to: items.count - 1, by: 2).compactMap { index in
                guard let name = items[index].bytes, let note = items[index + 1].bytes else { return nil }
                return ChannelLayerLease(name: String(decoding: name, as: UTF8.self), note: String(decoding: note, as: UTF8.self))
            }
        }
    }

    /// Gives up the lease on `name` in `pool` (with `note`: only while its note is that one).
    public func releaseLease(_ name: String, in pool: String, ifNote note: String?) async throws(ChannelLayerError) {
        try await withLayerErrors {
            let reply = try await pipelined(
                shardIndex(for: pool), Scripts.releaseLease, keys: leaseKeys(pool),
                args: [.text(name), note.map { .text("=" + $0) } ?? .text("")])
            if case .error = reply { throw unexpected(reply, doing: "release a lease") }
        }
    }

    private static func milliseconds(_ duration: Duration) -> Int {
        Int(Swift.max(1, Swift.min(duration.nanoseconds / 1_000_000, Int64(Int32.max))))
    }
}
