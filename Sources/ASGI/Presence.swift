import Foundation

/// One member of a group's presence: a user (or a socket id) with however many connections.
public struct PresenceMember: Sendable, Hashable, Codable {
    /// The user's name (or id).
    public var user: String
    /// Connections the user has in the group now.
    public var connections: Int
    /// The metadata given by the user's latest connection (JSON object text).
    public var meta: String

    /// A member.
    public init(user: String, connections: Int, meta: String) {
        self.user = user
        self.connections = connections
        self.meta = meta
    }
}

/// A connection tracked as present, as its server renews it.
public struct PresenceConnection: Sendable, Hashable {
    /// The connection (a socket's reply channel).
    public var connection: String
    /// The user it is present as.
    public var user: String
    /// Its metadata (JSON object text).
    public var meta: String

    /// A connection.
    public init(connection: String, user: String, meta: String) {
        self.connection = connection
        self.user = user
        self.meta = meta
    }
}

/// What changed in a group's presence: users who came (their first connection) and left
/// (their last one), each with the version of that change.
public struct PresenceDiff: Sendable, Hashable {
    /// The group.
    public var group: String
    /// Users now present who were not.
    public var joins: [String]
    /// Users no longer present.
    public var leaves: [String]
    /// Each user's change's ``PresenceChange/version``: diffs about one user from different
    /// servers can arrive in either order, and the higher version is the later change.
    public var versions: [String: Int64]

    /// A diff.
    public init(group: String, joins: [String] = [], leaves: [String] = [], versions: [String: Int64] = [:]) {
        self.group = group
        self.joins = joins
        self.leaves = leaves
        self.versions = versions
    }

    /// Nothing changed.
    public var isEmpty: Bool { joins.isEmpty && leaves.isEmpty }
}

/// A connection's join or leave as the layer applied it.
public struct PresenceChange: Sendable, Hashable {
    /// The user's presence changed: it joined (its first connection) or left (its last).
    public var changed: Bool
    /// The group's presence version after the change. Every change of a group's presence takes
    /// a new version, higher than every earlier one (a microsecond clock of the layer's, or one
    /// more than the last when the clock is behind it): of two diffs about a user, the one
    /// with the higher version is the later, whichever server sent it and whenever it arrives.
    public var version: Int64

    /// A change.
    public init(changed: Bool, version: Int64) {
        self.changed = changed
        self.version = version
    }
}

/// Who is present in a group, and the group's presence version when that was read: a diff
/// with a version up to this one is already in the list.
public struct PresenceSnapshot: Sendable, Hashable {
    /// The members, sorted by user.
    public var members: [PresenceMember]
    /// The group's presence version at the read (0: no change was ever made).
    public var version: Int64

    /// A snapshot.
    public init(members: [PresenceMember], version: Int64) {
        self.members = members
        self.version = version
    }
}

/// The connections a renewal tracked again (their user was absent), and the version of that change.
public struct PresenceRenewal: Sendable, Hashable {
    /// Connections tracked again whose user was absent: their users joined again.
    public var back: [PresenceConnection]
    /// The group's presence version after the renewal.
    public var version: Int64

    /// A renewal's outcome.
    public init(back: [PresenceConnection], version: Int64) {
        self.back = back
        self.version = version
    }
}

/// A layer that keeps who is present in each group: connections (a socket's reply channel)
/// tracked under a user, each with an expiry the connection's server renews. A connection
/// whose server died stops being renewed and is swept out at its expiry, so presence heals
/// without anyone cleaning up.
public protocol ChannelLayerPresence: ChannelLayer {
    /// Tracks `connection` as `user` in `group` until `ttl` from now; changed when this is the
    /// user's only connection there (it joined). Safe to retry after an unknown outcome: a
    /// retried join says changed again rather than nothing.
    func presenceJoin(_ group: String, connection: String, user: String, meta: String, ttl: Duration) async throws(ChannelLayerError)
        -> PresenceChange

    /// Stops tracking `connection` (of `user`); changed when the user has no connection left in
    /// the group (it left). Safe to retry: a retried leave says changed again rather than nothing.
    func presenceLeave(_ group: String, connection: String, user: String) async throws(ChannelLayerError) -> PresenceChange

    /// Pushes the expiry of tracked connections to `ttl` from now (their server's heartbeat),
    /// tracking again any that were swept meanwhile (their server stalled past the TTL);
    /// returns those tracked again whose user was absent (present again because of it).
    func presenceRefresh(_ group: String, connections: [PresenceConnection], ttl: Duration) async throws(ChannelLayerError)
        -> PresenceRenewal

    /// Who is present, sorted by user, with the group's presence version at that read. A
    /// connection past its expiry is listed until a sweep removes it (that sweep's leave has a
    /// later version), so a list and the diffs after it always agree.
    func presenceSnapshot(_ group: String) async throws(ChannelLayerError) -> PresenceSnapshot

    /// Removes every expired connection of every group; the users that left with them.
    func presenceSweep() async throws(ChannelLayerError) -> [PresenceDiff]
}

extension ChannelLayerPresence {
    /// Who is present, sorted by user (see ``presenceSnapshot(_:)``).
    public func presenceList(_ group: String) async throws(ChannelLayerError) -> [PresenceMember] {
        try await presenceSnapshot(group).members
    }
}

/// How long past its expiry a connection is still listed: the interface servers sweep every
/// third of the presence TTL and tell its leave (with a later version) then; a connection
/// expired longer than this is not being swept (no server runs) and is left out of lists.
public enum PresenceSweepGrace {
    /// 60 s.
    public static let seconds: Double = 60
}

/// A group's presence version: a microsecond clock, or one more than `last` when the clock is
/// not past it (a version is never reused or lowered, even if the clock steps back).
public enum PresenceVersion {
    /// The version after `last`.
    public static func next(after last: Int64, now: Date = Date()) -> Int64 {
        let micros = Int64(now.timeIntervalSince1970 * 1_000_000)
        return micros > last ? micros : last + 1
    }
}

/// The frames a socket receives about presence, as Phoenix sends them.
public enum PresenceText {
    /// `{"type":"presence","users":[...],"version":N}`: who is present (names, sorted), and
    /// the version of that list (diffs up to it are in it).
    public static func list(_ members: [PresenceMember], version: Int64 = 0) -> String {
        "{\"type\":\"presence\",\"users\":[" + members.map { JSONText.quote($0.user) }.joined(separator: ",") + "],\"version\":"
            + String(version) + "}"
    }

    /// `{"type":"presence_diff","joins":[...],"leaves":[...],"versions":{"user":N,...}}`: apply a
    /// user's change only when its version is above the last one applied for that user (or the
    /// list's): diffs from different servers can arrive out of order.
    public static func diff(_ diff: PresenceDiff) -> String {
        let versions = diff.versions.keys.sorted().map { JSONText.quote($0) + ":" + String(diff.versions[$0]!) }
        return "{\"type\":\"presence_diff\",\"joins\":[" + diff.joins.map(JSONText.quote).joined(separator: ",") + "],\"leaves\":["
            + diff.leaves.map(JSONText.quote).joined(separator: ",") + "],\"versions\":{" + versions.joined(separator: ",") + "}}"
    }
}

/// JSON text helpers for the frames the framework writes itself.
public enum JSONText {
    /// `value` as a JSON string literal.
    public static func quote(_ value: String) -> String {
        var out = "\""
        for scalar in value.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}
