import ASGI

/// Where one Redis server is: parsed from `redis://[[user]:password@]host[:port][/db]`.
public struct RedisEndpoint: Sendable, Hashable, CustomStringConvertible {
    /// The server's host name or address.
    public var host: String
    /// The server's port.
    public var port: Int
    /// The password for `AUTH`, if any.
    public var password: String?
    /// The ACL user name for `AUTH`, if any.
    public var username: String?
    /// The database number for `SELECT`.
    public var database: Int

    /// An endpoint; the defaults are a local Redis, database 0.
    public init(host: String = "127.0.0.1", port: Int = 6379, password: String? = nil, username: String? = nil, database: Int = 0) {
        self.host = host
        self.port = port
        self.password = password
        self.username = username
        self.database = database
    }

    /// Parses a `redis://` URL; throws `invalidConfiguration` naming what is wrong.
    public init(url: String) throws(ChannelLayerError) {
        func bad(_ why: String) -> ChannelLayerError {
            ChannelLayerError(.invalidConfiguration, "invalid Redis URL '\(url)': \(why)")
        }
        guard url.hasPrefix("redis://") else { throw bad("it must start with redis://") }
        var rest = Substring(url.dropFirst("redis://".count))
        if let q = rest.firstIndex(of: "?") { rest = rest[..<q] }
        var database = 0
        if let slash = rest.firstIndex(of: "/") {
            let dbText = rest[rest.index(after: slash)...]
            if !dbText.isEmpty {
                guard let db = Int(dbText), db >= 0 else { throw bad("database '\(dbText)' is not a number") }
                database = db
            }
            rest = rest[..<slash]
        }
        var password: String? = nil
        var username: String? = nil
        if let at = rest.lastIndex(of: "@") {
            let credentials = rest[..<at]
            rest = rest[rest.index(after: at)...]
            if let colon = credentials.firstIndex(of: ":") {
                let user = credentials[..<colon]
                username = user.isEmpty ? nil : String(user)
                password = PercentCoding.decode(credentials[credentials.index(after: colon)...].utf8)
            } else if !credentials.isEmpty {
                password = PercentCoding.decode(credentials.utf8)
            }
        }
        var host = String(rest)
        var port = 6379
        if host.hasPrefix("["), let close = host.firstIndex(of: "]") {
            let after = host[host.index(after: close)...]
            let inner = String(host[host.index(after: host.startIndex)..<close])
            if after.hasPrefix(":") {
                guard let p = Int(after.dropFirst()), (1...65535).contains(p) else { throw bad("bad port") }
                port = p
            }
            host = inner
        } else if let colon = host.lastIndex(of: ":") {
            let portText = host[host.index(after: colon)...]
            guard let p = Int(portText), (1...65535).contains(p) else { throw bad("port '\(portText)' is not a port number") }
            port = p
            host = String(host[..<colon])
        }
        if host.isEmpty { host = "127.0.0.1" }
        if host == "localhost" { host = "127.0.0.1" }
        self.init(host: host, port: port, password: password, username: username, database: database)
    }

    /// The endpoint as a URL, without the password.
    public var description: String { "redis://\(host):\(port)/\(database)" }
}
