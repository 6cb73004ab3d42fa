import Foundation
import Synchronization

/// One group's presence in memory.
struct InMemoryPresence {
    var connections: [String: (user: String, meta: String, expires: ContinuousClock.Instant)] = [:]
    var counts: [String: Int] = [:]
    /// The version of the group's last change (``PresenceVersion``). A group nobody is in is
    /// forgotten, version included: its next change is still above every version given here.
    var version: Int64 = 0

    /// The last version given in this process, whatever the group: a group that was emptied
    /// (and forgotten) and joined again in the same microsecond, or after the clock stepped
    /// back, still gets a higher one.
    private static let lastIssued = Mutex<Int64>(0)

    /// A change was made: the group's next version.
    mutating func advance() -> Int64 {
        let last = version
        version = Self.lastIssued.withLock { issued in
            issued = PresenceVersion.next(after: max(issued, last))
            return issued
        }
        return version
    }

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
    public func presenceJoin(_ group: String, connection: String, user: String, meta: String, ttl: Duration) async throws(ChannelLayerError)
        -> PresenceChange
    {
        try ChannelNames.validateGroup(group)
        let expires = ContinuousClock.now + ttl
        return presence.withLock { all in
            var entry = all[group] ?? InMemoryPresence()
            defer { all[group] = entry }
            if let old = entry.connections[connection], old.user != user { _ = entry.remove(connection) }
            if entry.connections[connection] == nil { entry.counts[user, default: 0] += 1 }
            entry.connections[connection] = (user, meta, expires)
            return PresenceChange(changed: entry.counts[user] == 1, version: entry.advance())
        }
    }

    /// Stops tracking a connection; see ``ChannelLayerPresence/presenceLeave(_:connection:user:)``.
    public func presenceLeave(_ group: String, connection: String, user: String) async throws(ChannelLayerError) -> PresenceChange {
        try ChannelNames.validateGroup(group)
        return presence.withLock { all in
            var entry = all[group] ?? InMemoryPresence()
            _ = entry.remove(connection)
            let version = entry.advance()
            all[group] = entry.connections.isEmpty ? nil : entry
            return PresenceChange(changed: entry.counts[user] == nil, version: version)
        }
    }

    /// Renews connections' presence; see ``ChannelLayerPresence/presenceRefresh(_:connections:ttl:)``.
    public func presenceRefresh(_ group: String, connections: [PresenceConnection], ttl: Duration) async throws(ChannelLayerError)
        -> PresenceRenewal
    {
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
            let version = back.isEmpty ? entry.version : entry.advance()
            all[group] = entry.connections.isEmpty ? nil : entry
            return PresenceRenewal(back: back, version: version)
        }
    }

    /// Who is present; see ``ChannelLayerPresence/presenceSnapshot(_:)``.
    public func presenceSnapshot(_ group: String) async throws(ChannelLayerError) -> PresenceSnapshot {
        try ChannelNames.validateGroup(group)
        // One past its expiry stays until the sweep removes it (with a leave of a later
        // version), so the list is the state at its version; unless nobody sweeps.
        let oldest = ContinuousClock.now - .seconds(PresenceSweepGrace.seconds)
        return presence.withLock { all in
            var members: [String: PresenceMember] = [:]
            for entry in (all[group]?.connections.values).map(Array.init) ?? [] where entry.expires > oldest {
                members[entry.user, default: PresenceMember(user: entry.user, connections: 0, meta: entry.meta)].connections += 1
            }
            return PresenceSnapshot(
                members: members.values.sorted { $0.user < $1.user },
                version: all[group]?.version ?? 0)
        }
    }

    /// Removes expired connections; see ``ChannelLayerPresence/presenceSweep()``.
    public func presenceSweep() async throws(ChannelLayerError) -> [PresenceDiff] {
        let now = ContinuousClock.now
        return presence.withLock { all in
            var diffs: [PresenceDiff] = []
            for group in all.keys.sorted() {
                guard var entry = all[group] else { continue }
                let expired = entry.connections.filter { $0.value.expires <= now }.map(\.key).sorted()
                guard !expired.isEmpty else { continue }
                let leaves = expired.compactMap { entry.remove($0) }
                let version = entry.advance()
                all[group] = entry.connections.isEmpty ? nil : entry
                if !leaves.isEmpty {
                    diffs.append(
                        PresenceDiff(
                            group: group, leaves: leaves.sorted(),
                            versions: Dictionary(leaves.map { ($0, version) }, uniquingKeysWith: max)))
                }
            }
            return diffs
        }
    }
}
