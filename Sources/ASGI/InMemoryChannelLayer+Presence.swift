import Synchronization

/// One group's presence in memory.
struct InMemoryPresence {
    var connections: [String: (user: String, meta: String, expires: ContinuousClock.Instant)] = [:]
    var counts: [String: Int] = [:]

    /// Removes a connection; the user when it was their last.
    mutating func remove(_ connection: String) -> String? {
        guard let entry = connections.removeValue(forKey: connection) else { return nil }
        let left = (counts[entry.user] ?? 1) - 1
        if left <= 0 {
            counts.removeValue(forKey: entry.user)
            return entry.user
        }
        counts[entry.user] = left
        return nil
    }
}

extension InMemoryChannelLayer: ChannelLayerPresence {
    /// Tracks a connection as present; see ``ChannelLayerPresence/presenceJoin(_:connection:user:meta:ttl:)``.
    public func presenceJoin(_ group: String, connection: String, user: String, meta: String, ttl: Duration) async throws -> Bool {
        try ChannelNames.validateGroup(group)
        let expires = ContinuousClock.now + ttl
        return presence.withLock { all in
            var entry = all[group] ?? InMemoryPresence()
            defer { all[group] = entry }
            if let old = entry.connections[connection], old.user != user { _ = entry.remove(connection) }
            if entry.connections[connection] == nil { entry.counts[user, default: 0] += 1 }
            entry.connections[connection] = (user, meta, expires)
            return entry.counts[user] == 1
        }
    }

    /// Stops tracking a connection; see ``ChannelLayerPresence/presenceLeave(_:connection:user:)``.
    public func presenceLeave(_ group: String, connection: String, user: String) async throws -> Bool {
        try ChannelNames.validateGroup(group)
        return presence.withLock { all in
            guard var entry = all[group] else { return true }
            _ = entry.remove(connection)
            all[group] = entry.connections.isEmpty ? nil : entry
            return entry.counts[user] == nil
        }
    }

    /// Renews connections' presence; see ``ChannelLayerPresence/presenceRefresh(_:connections:ttl:)``.
    public func presenceRefresh(_ group: String, connections: [PresenceConnection], ttl: Duration) async throws -> [PresenceConnection] {
        let expires = ContinuousClock.now + ttl
        return presence.withLock { all in
            var entry = all[group] ?? InMemoryPresence()
            var back: [PresenceConnection] = []
            for c in connections {
                if entry.connections[c.connection] == nil {
                    entry.counts[c.user, default: 0] += 1
                    if entry.counts[c.user] == 1 { back.append(c) }
                }
                entry.connections[c.connection] = (c.user, c.meta, expires)
            }
            all[group] = entry.connections.isEmpty ? nil : entry
            return back
        }
    }

    /// Who is present; see ``ChannelLayerPresence/presenceList(_:)``.
    public func presenceList(_ group: String) async throws -> [PresenceMember] {
        try ChannelNames.validateGroup(group)
        let now = ContinuousClock.now
        return presence.withLock { all in
            var members: [String: PresenceMember] = [:]
            for entry in (all[group]?.connections.values).map(Array.init) ?? [] where entry.expires > now {
                members[entry.user, default: PresenceMember(user: entry.user, connections: 0, meta: entry.meta)].connections += 1
            }
            return members.values.sorted { $0.user < $1.user }
        }
    }

    /// Removes expired connections; see ``ChannelLayerPresence/presenceSweep()``.
    public func presenceSweep() async throws -> [PresenceDiff] {
        let now = ContinuousClock.now
        return presence.withLock { all in
            var diffs: [PresenceDiff] = []
            for group in all.keys.sorted() {
                guard var entry = all[group] else { continue }
                let expired = entry.connections.filter { $0.value.expires <= now }.map(\.key).sorted()
                guard !expired.isEmpty else { continue }
                let leaves = expired.compactMap { entry.remove($0) }
                all[group] = entry.connections.isEmpty ? nil : entry
                if !leaves.isEmpty { diffs.append(PresenceDiff(group: group, leaves: leaves.sorted())) }
            }
            return diffs
        }
    }
}
