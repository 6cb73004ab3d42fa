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
/// (their last one).
public struct PresenceDiff: Sendable, Hashable {
    /// The group.
    public var group: String
    /// Users now present who were not.
    public var joins: [String]
    /// Users no longer present.
    public var leaves: [String]

    /// A diff.
    public init(group: String, joins: [String] = [], leaves: [String] = []) {
        self.group = group
        self.joins = joins
        self.leaves = leaves
    }

    /// Nothing changed.
    public var isEmpty: Bool { joins.isEmpty && leaves.isEmpty }
}

/// A layer that keeps who is present in each group: connections (a socket's reply channel)
/// tracked under a user, each with an expiry the connection's server renews. A connection
/// whose server died stops being renewed and is swept out at its expiry, so presence heals
/// without anyone cleaning up.
public protocol ChannelLayerPresence: ChannelLayer {
    /// Tracks `connection` as `user` in `group` until `ttl` from now; true when this is the
    /// user's only connection there (it joined). Safe to retry after an unknown outcome: a
    /// retried join says true again rather than nothing.
    func presenceJoin(_ group: String, connection: String, user: String, meta: String, ttl: Duration) async throws -> Bool

    /// Stops tracking `connection` (of `user`); true when the user has no connection left in the
    /// group (it left). Safe to retry: a retried leave says true again rather than nothing.
    func presenceLeave(_ group: String, connection: String, user: String) async throws -> Bool

    /// Pushes the expiry of tracked connections to `ttl` from now (their server's heartbeat),
    /// tracking again any that were swept meanwhile (their server stalled past the TTL);
    /// returns those tracked again whose user was absent (present again because of it).
    func presenceRefresh(_ group: String, connections: [PresenceConnection], ttl: Duration) async throws -> [PresenceConnection]

    /// Who is present, sorted by user; expired connections are not counted.
    func presenceList(_ group: String) async throws -> [PresenceMember]

    /// Removes every expired connection of every group; the users that left with them.
    func presenceSweep() async throws -> [PresenceDiff]
}

/// The frames a socket receives about presence, as Phoenix sends them.
public enum PresenceText {
    /// `{"type":"presence","users":[...]}`: who is present (names, sorted).
    public static func list(_ members: [PresenceMember]) -> String {
        "{\"type\":\"presence\",\"users\":[" + members.map { JSONText.quote($0.user) }.joined(separator: ",") + "]}"
    }

    /// `{"type":"presence_diff","joins":[...],"leaves":[...]}`.
    public static func diff(_ diff: PresenceDiff) -> String {
        "{\"type\":\"presence_diff\",\"joins\":[" + diff.joins.map(JSONText.quote).joined(separator: ",") + "],\"leaves\":["
            + diff.leaves.map(JSONText.quote).joined(separator: ",") + "]}"
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
