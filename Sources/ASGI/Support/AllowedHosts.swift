/// Which `Host` names a server answers and which `Origin`s may open its WebSockets, in the
/// spirit of Django's `ALLOWED_HOSTS` and Channels' `AllowedHostsOriginValidator`.
///
/// A pattern is a host name (`chat.example.com`, matched exactly), a name with a leading dot
/// (`.example.com`: that domain and every subdomain), an IP address, or `*` (any host, only
/// when given explicitly). Matching ignores case, a port, and a trailing dot.
public struct AllowedHosts: Sendable, Hashable {
    /// The patterns as given.
    public let patterns: [String]
    /// Origins allowed besides those whose host is allowed: exact origins
    /// (`https://partner.example`), or `*` for any.
    public let extraOrigins: Set<String>

    /// The names a loopback server answers by default.
    public static let loopbackNames = ["localhost", "127.0.0.1", "::1"]

    /// Hosts matching `patterns`, and origins whose host matches or that are in `origins`.
    public init(_ patterns: [String], origins: [String] = []) {
        self.patterns = patterns.map { Self.normalize($0) }
        self.extraOrigins = Set(origins.map { $0.lowercased() })
    }

    /// True when `host` (a bare name or a `Host` header value with its port) is allowed.
    public func allows(host: String) -> Bool {
        guard let name = Self.hostName(fromHeader: host) else { return false }
        return patterns.contains { pattern in
            if pattern == "*" { return true }
            if pattern.hasPrefix(".") { return name == pattern.dropFirst() || name.hasSuffix(pattern) }
            return name == pattern
        }
    }

    /// True when a browser page of `origin` may open a WebSocket here: its host is allowed, or
    /// it is one of the extra origins. `null` and malformed origins are refused (unless `*`).
    public func allows(origin: String) -> Bool {
        let lowered = origin.lowercased()
        if extraOrigins.contains("*") || extraOrigins.contains(lowered) { return true }
        guard let schemeEnd = lowered.firstRange(of: "://") else { return false }
        let scheme = lowered[..<schemeEnd.lowerBound]
        guard scheme == "http" || scheme == "https" else { return false }
        let authority = lowered[schemeEnd.upperBound...]
        guard !authority.contains("/"), !authority.contains("@") else { return false }
        return allows(host: String(authority))
    }

    /// The host name of a `Host` header value (`name`, `name:port`, `[v6]:port`), lowercased,
    /// without a trailing dot; nil when it is not a valid host (Django's validation).
    public static func hostName(fromHeader value: String) -> String? {
        let lowered = value.lowercased()
        var name: Substring
        var port: Substring?
        if lowered.hasPrefix("[") {
            guard let close = lowered.firstIndex(of: "]") else { return nil }
            name = lowered[lowered.index(after: lowered.startIndex)..<close]
            let after = lowered[lowered.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { return nil }
                port = after.dropFirst()
                if let port, port.isEmpty || !port.allSatisfy({ $0.isASCII && $0.isNumber }) { return nil }
            }
            guard name.contains(":"), name.allSatisfy({ $0.isHexDigit || $0 == ":" || $0 == "." }) else { return nil }
            return String(name)
        }
        if let colon = lowered.lastIndex(of: ":") {
            name = lowered[..<colon]
            port = lowered[lowered.index(after: colon)...]
        } else {
            name = Substring(lowered)
        }
        if let port, port.isEmpty || !port.allSatisfy({ $0.isASCII && $0.isNumber }) { return nil }
        if name.hasSuffix(".") { name = name.dropLast() }
        guard !name.isEmpty,
            name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "." || $0 == "-") })
        else { return nil }
        return String(name)
    }

    private static func normalize(_ pattern: String) -> String {
        var pattern = pattern.lowercased()
        if pattern.hasPrefix("[") && pattern.hasSuffix("]") { pattern = String(pattern.dropFirst().dropLast()) }
        if pattern.count > 1, pattern.hasSuffix(".") { pattern.removeLast() }
        return pattern
    }
}
