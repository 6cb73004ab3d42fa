import ASGI
import Foundation
import Synchronization

/// A consumer: the code that handles one message.
public typealias Consumer = @Sendable (ConsumerContext) async throws -> Void

/// One line of a routing table, as `route(...)` and `include(...)` write it.
public struct RoutingEntry: Sendable {
    enum Kind: Sendable {
        case route(channels: [String], consumer: Consumer, name: String)
        case include([RoutingEntry])
    }

    let kind: Kind
    let filters: [(key: String, pattern: String)]
}

/// `route("http.request", path: "^/hello/", consumer)`: the consumer for a channel when every
/// filter (a regex on a top-level message key, anchored at the start) matches. Named groups,
/// `(?P<name>...)` or `(?<name>...)`, become the consumer's arguments.
public func route(
    _ channel: String, path: String? = nil, method: String? = nil, filters: [String: String] = [:],
    name: String? = nil, _ consumer: @escaping Consumer
) -> RoutingEntry {
    route([channel], path: path, method: method, filters: filters, name: name, consumer)
}

/// A route for several channels (a consumer type that declares the channels it handles).
public func route(
    _ channels: [String], path: String? = nil, method: String? = nil, filters: [String: String] = [:],
    name: String? = nil, _ consumer: @escaping Consumer
) -> RoutingEntry {
    RoutingEntry(
        kind: .route(channels: channels, consumer: consumer, name: name ?? channels.joined(separator: ",")),
        filters: collectFilters(path: path, method: method, filters: filters))
}

/// `include(routes, path: "^/chat/")`: the prefix is matched and stripped from the value the
/// inner routes see; the consumer still gets the original message. Arguments merge.
public func include(
    _ routes: [RoutingEntry], path: String? = nil, method: String? = nil,
    filters: [String: String] = [:]
) -> RoutingEntry {
    RoutingEntry(kind: .include(routes), filters: collectFilters(path: path, method: method, filters: filters))
}

private func collectFilters(path: String?, method: String?, filters: [String: String]) -> [(key: String, pattern: String)] {
    var all: [(key: String, pattern: String)] = []
    if let path { all.append(("path", path)) }
    if let method { all.append(("method", method)) }
    for key in filters.keys.sorted() { all.append((key, filters[key]!)) }
    return all
}

/// Bad routing, found at start-up with the route named.
public struct RoutingError: Error, CustomStringConvertible, Sendable {
    /// What is wrong with a route.
    public enum Code: Sendable, Hashable {
        /// A channel it listens on is not a valid channel name.
        case invalidChannel
        /// A pattern is not a valid regular expression.
        case invalidPattern
        /// A pattern captures a group it does not name (its value could not be a parameter).
        case unnamedGroup
    }

    /// What is wrong.
    public var code: Code
    /// The route's name or pattern.
    public var route: String
    /// What is wrong with it.
    public var reason: String
    /// The route and the reason, for logs and errors.
    public var description: String { "route '\(route)': \(reason)" }
}

/// A compiled routing table.
public struct Router: Sendable {
    struct Filter: @unchecked Sendable {
        // Safety: NSRegularExpression is immutable after creation and documented thread-safe.
        // Swift's `Regex` (runtime pattern, `prefixMatch`, a named group read) measured 8 %
        // slower on the example's routes (428-462 against 395-425 ns a match attempt, -O,
        // session 22), so routing keeps NSRegularExpression.
        let key: String
        let regex: NSRegularExpression
        let names: [String]
    }

    struct CompiledRoute: Sendable {
        let channels: Set<String>
        let filters: [Filter]
        let consumer: Consumer
        let name: String
        /// Each include level's filters, outermost first, then the route's own.
        let levels: [[Filter]]
    }

    let routes: [CompiledRoute]

    /// Every channel some route listens on.
    public let channels: Set<String>

    /// Per channel (as routes name it), the message keys its routes' filters read, sorted: a
    /// match depends on the channel and these values only.
    private let filterKeys: [String: [String]]

    /// Matches already made, by channel and filter values (a room's messages all carry the same
    /// path: its regular expressions run once, not per message).
    let matches = MatchCache()

    /// Compiles the routing entries; throws ``RoutingError`` naming the route with a bad channel
    /// name or pattern.
    public init(_ entries: [RoutingEntry]) throws {
        var routes: [CompiledRoute] = []
        func walk(_ entries: [RoutingEntry], levels: [[Filter]]) throws {
            for entry in entries {
                switch entry.kind {
                case .route(let channels, let consumer, let name):
                    for channel in channels {
                        do { try ChannelNames.validateChannel(channel, for: .receive) } catch {
                            throw RoutingError(code: .invalidChannel, route: name, reason: "\(error)")
                        }
                    }
                    let own = try entry.filters.map { try Self.compile($0, route: name) }
                    routes.append(
                        CompiledRoute(
                            channels: Set(channels), filters: own, consumer: consumer, name: name,
                            levels: levels + [own]))
                case .include(let inner):
                    let own = try entry.filters.map { try Self.compile($0, route: "include(\($0.pattern))") }
                    try walk(inner, levels: levels + [own])
                }
            }
        }
        try walk(entries, levels: [])
        self.routes = routes
        self.channels = routes.reduce(into: Set()) { $0.formUnion($1.channels) }
        var keys: [String: Set<String>] = [:]
        for route in routes {
            let used = Set(route.levels.joined().map(\.key))
            for channel in route.channels { keys[channel, default: []].formUnion(used) }
        }
        self.filterKeys = keys.mapValues { $0.sorted() }
    }

    static func compile(_ filter: (key: String, pattern: String), route: String) throws -> Filter {
        let pattern = filter.pattern.replacingOccurrences(of: "(?P<", with: "(?<")
        let regex: NSRegularExpression
        do {
            regex = try NSRegularExpression(pattern: pattern)
        } catch {
            throw RoutingError(
                code: .invalidPattern, route: route, reason: "the \(filter.key) pattern '\(filter.pattern)' is not a valid regex")
        }
        var names: [String] = []
        let nameFinder = try NSRegularExpression(pattern: #"\(\?<([A-Za-z_][A-Za-z0-9_]*)>"#)
        for match in nameFinder.matches(in: pattern, range: NSRange(pattern.startIndex..., in: pattern)) {
            if let range = Range(match.range(at: 1), in: pattern) { names.append(String(pattern[range])) }
        }
        if regex.numberOfCaptureGroups != names.count {
            throw RoutingError(
                code: .unnamedGroup, route: route,
                reason:
                    "the \(filter.key) pattern '\(filter.pattern)' has a positional capture group; name it (?P<name>...) or make it (?:...)"
            )
        }
        return Filter(key: filter.key, regex: regex, names: names)
    }

    /// The first route whose channel and filters match, with the captured arguments.
    public func match(channel: String, message: Message) -> (consumer: Consumer, parameters: [String: String], name: String)? {
        let listenName = ChannelNames.nonLocalName(channel)
        // The values the routes of this channel (and of its non-local name) can look at.
        var keys = filterKeys[channel] ?? []
        if listenName != channel, let more = filterKeys[listenName] { keys = Array(Set(keys).union(more)).sorted() }
        var values: [String?] = []
        values.reserveCapacity(keys.count)
        for key in keys {
            switch message[key] {
            case .string(let s)?: values.append(s)
            case .bytes(let b)?: values.append(String(decoding: b, as: UTF8.self))
            default: values.append(nil)
            }
        }
        // Long values (a client's 8 KB path) are matched afresh, not kept: the cache holds at
        // most `limit` entries of `MatchCache.longestValues` bytes.
        let length = values.reduce(0) { $0 + ($1?.utf8.count ?? 0) }
        let key = MatchCache.Key(channel: channel, values: values)
        let found: (index: Int, parameters: [String: String])?
        if length <= MatchCache.longestValues, let cached = matches[key] {
            found = cached.match
        } else {
            found = firstMatch(channel: channel, listenName: listenName, message: message)
            if length <= MatchCache.longestValues { matches[key] = MatchCache.Entry(match: found) }
        }
        guard let found else { return nil }
        let route = routes[found.index]
        return (route.consumer, found.parameters, route.name)
    }

    /// The index of the first route whose channel and filters match, and the arguments captured.
    func firstMatch(channel: String, listenName: String, message: Message) -> (index: Int, parameters: [String: String])? {
        routeLoop: for (index, route) in routes.enumerated() where route.channels.contains(channel) || route.channels.contains(listenName) {
            var remaining: [String: String] = [:]
            var parameters: [String: String] = [:]
            for level in route.levels {
                for filter in level {
                    let value: String
                    if let stripped = remaining[filter.key] {
                        value = stripped
                    } else {
                        switch message[filter.key] {
                        case .string(let s)?: value = s
                        case .bytes(let b)?: value = String(decoding: b, as: UTF8.self)
                        default: continue routeLoop
                        }
                    }
                    let range = NSRange(value.startIndex..., in: value)
                    guard let match = filter.regex.firstMatch(in: value, options: [.anchored], range: range) else {
                        continue routeLoop
                    }
                    for name in filter.names {
                        let r = match.range(withName: name)
                        if r.location != NSNotFound, let swiftRange = Range(r, in: value) {
                            parameters[name] = String(value[swiftRange])
                        }
                    }
                    // Strip what this level matched so inner levels see the rest.
                    if let matched = Range(match.range, in: value) {
                        remaining[filter.key] = String(value[matched.upperBound...])
                    }
                }
            }
            return (index, parameters)
        }
        return nil
    }
}

/// Routing results by channel and filter values, at most ``limit`` of them (emptied when full:
/// a process that sees more distinct paths than that matches them afresh), for values of at
/// most ``longestValues`` bytes.
final class MatchCache: Sendable {
    struct Key: Hashable, Sendable {
        let channel: String
        let values: [String?]
    }

    struct Entry: Sendable {
        let match: (index: Int, parameters: [String: String])?
    }

    static let limit = 4096
    /// The most bytes of values an entry is kept for (room paths are short; a flood of long,
    /// distinct paths grew a server by 13 MB more than without the cache).
    static let longestValues = 256
    private let entries = Mutex<[Key: Entry]>([:])

    subscript(key: Key) -> Entry? {
        get { entries.withLock { $0[key] } }
        set {
            entries.withLock { entries in
                if entries.count >= Self.limit { entries.removeAll(keepingCapacity: true) }
                entries[key] = newValue
            }
        }
    }

    var count: Int { entries.withLock { $0.count } }
}
