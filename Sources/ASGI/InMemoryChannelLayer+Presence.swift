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
            if let old = entry.connections[connection] {
                if old.user == user {
                    entry.connections[connection] = (user, meta, expires)
                    return false
                }
                _ = entry.remove(connection)
            }
            entry.connections[connection] = (user, meta, expires)
            entry.counts[user, default: 0] += 1
            return entry.counts[user] == 1
        }
    }

    /// Stops tracking a connection; see ``ChannelLayerPresence/presenceLeave(_:connection:)``.
    public func presenceLeave(_ group: String, connection: String) async throws -> String? {
        try ChannelNames.validateGroup(group)
        return presence.withLock { all in
            guard var entry = all[group] else { return nil }
            let gone = entry.remove(connection)
            all[group] = entry.connections.isEmpty ? nil : entry
            return gone
        }
    }

    /// Renews connections' presence; see ``ChannelLayerPresence/presenceRefresh(_:connections:ttl:)``.
    public func presenceRefresh(_ group: String, connections: [String], ttl: Duration) async throws {
        let expires = ContinuousClock.now + ttl
        presence.withLock { all in
            guard var entry = all[group] else { return }
            for connection in connections {
                if let old = entry.connections[connection] { entry.connections[connection] = (old.user, old.meta, expires) }
            }
            all[group] = entry
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
