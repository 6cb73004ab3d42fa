/// A shell-style pattern (`fnmatch`): `*` any run, `?` one character, `[abc]`, `[a-z]`,
/// `[!abc]`; anything else matches itself. Used for per-channel capacities and channel filters.
public struct GlobPattern: Sendable, Hashable, CustomStringConvertible {
    /// The pattern as written.
    public let pattern: String
    private let tokens: [Token]

    private enum Token: Sendable, Hashable {
        case literal(UInt8)
        case any
        case anyRun
        case set(ranges: [ClosedRange<UInt8>], negated: Bool)
    }

    /// Compiles a pattern: `*` any run of characters, `?` one character, `[...]` a set, as `fnmatch` does.
    public init(_ pattern: String) {
        self.pattern = pattern
        var tokens: [Token] = []
        let bytes = Array(pattern.utf8)
        var i = 0
        while i < bytes.count {
            let c = bytes[i]
            switch c {
            case UInt8(ascii: "*"):
                if tokens.last != .anyRun { tokens.append(.anyRun) }
                i += 1
            case UInt8(ascii: "?"):
                tokens.append(.any); i += 1
            case UInt8(ascii: "["):
                var j = i + 1
                var negated = false
                if j < bytes.count && bytes[j] == UInt8(ascii: "!") { negated = true; j += 1 }
                var ranges: [ClosedRange<UInt8>] = []
                var first = true
                while j < bytes.count && (bytes[j] != UInt8(ascii: "]") || first) {
                    first = false
                    if j + 2 < bytes.count && bytes[j + 1] == UInt8(ascii: "-") && bytes[j + 2] != UInt8(ascii: "]") {
                        let lo = bytes[j], hi = bytes[j + 2]
                        if lo <= hi { ranges.append(lo...hi) }
                        j += 3
                    } else {
                        ranges.append(bytes[j]...bytes[j]); j += 1
                    }
                }
                if j < bytes.count {
                    tokens.append(.set(ranges: ranges, negated: negated))
                    i = j + 1
                } else {
                    // An unclosed '[' is a literal, as in fnmatch.
                    tokens.append(.literal(c)); i += 1
                }
            default:
                tokens.append(.literal(c)); i += 1
            }
        }
        self.tokens = tokens
    }

    /// The pattern as written.
    public var description: String { pattern }

    /// Whether the whole of `name` matches.
    public func matches(_ name: String) -> Bool {
        let s = Array(name.utf8)
        // Iterative wildcard matching with one backtrack point: linear for practical patterns.
        var ti = 0, si = 0
        var starToken = -1, starString = 0
        while si < s.count {
            if ti < tokens.count {
                switch tokens[ti] {
                case .anyRun:
                    starToken = ti; starString = si; ti += 1
                    continue
                case .any:
                    ti += 1; si += 1
                    continue
                case .literal(let c) where c == s[si]:
                    ti += 1; si += 1
                    continue
                case .set(let ranges, let negated) where ranges.contains(where: { $0.contains(s[si]) }) != negated:
                    ti += 1; si += 1
                    continue
                default:
                    break
                }
            }
            guard starToken >= 0 else { return false }
            ti = starToken + 1
            starString += 1
            si = starString
        }
        while ti < tokens.count, tokens[ti] == .anyRun { ti += 1 }
        return ti == tokens.count
    }
}

/// Capacities per channel: the first matching pattern wins, else the default.
public struct CapacityTable: Sendable {
    /// The capacity of a channel no pattern matches.
    public var defaultCapacity: Int
    /// Capacities by pattern; the first match wins.
    public var patterns: [(GlobPattern, Int)]

    /// Capacities from a default and `(pattern, capacity)` pairs, then the ordering wait
    /// channels' entry (``waitChannelPattern``, unless a pair names that pattern itself): a pair
    /// that matches a wait channel first still wins.
    public init(defaultCapacity: Int = 100, patterns: [(String, Int)] = []) {
        self.defaultCapacity = defaultCapacity
        var all = patterns
        if !patterns.contains(where: { $0.0 == Self.waitChannelPattern }) {
            all.append((Self.waitChannelPattern, Self.waitChannelCapacity(defaultCapacity: defaultCapacity)))
        }
        self.patterns = all.map { (GlobPattern($0.0), $0.1) }
    }

    /// Prefix of the wait channels where ordering parks a socket's early messages.
    public static let waitChannelPrefix = "__wait__."
    /// The name a wait channel's statistics are counted under: ordering parks each message on
    /// `<wait channel>.<order>`, and one socket's counters stay one pair of keys, not a pair
    /// per order it ever parked.
    public static func statisticsName(_ name: String) -> String {
        guard name.hasPrefix(waitChannelPrefix),
            let dot = name.utf8.dropFirst(waitChannelPrefix.utf8.count).firstIndex(of: UInt8(ascii: "."))
        else { return name }
        return String(name[..<dot])
    }

    /// The pattern of the wait channels' entry every table ends with.
    public static let waitChannelPattern = waitChannelPrefix + "*"

    /// What a wait channel (see `enforceOrdering`) holds unless configured otherwise: ten
    /// times the default capacity, at least 1,000. It must take every message of one socket
    /// that can be in flight at once (its `websocket.receive` backlog plus what the workers
    /// hold), or the workers that park and the one that drains would wait on each other.
    public static func waitChannelCapacity(defaultCapacity: Int) -> Int { max(1000, defaultCapacity * 10) }

    /// The capacity of a channel, matched on its non-local name for `!` channels: the first
    /// pattern that matches, else the default.
    public func capacity(for channel: String) -> Int {
        let name = ChannelNames.nonLocalName(channel)
        for (pattern, capacity) in patterns where pattern.matches(name) {
            return capacity
        }
        return defaultCapacity
    }
}
