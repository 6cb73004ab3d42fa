import ASGI

/// Where one Redis server is and how to talk to it, parsed from a URL:
///
/// - `redis://[[user]:password@]host[:port][/db][?options]`, plain TCP;
/// - `rediss://...`, the same over TLS;
/// - `unix:///path/to/redis.sock[?db=N&password=...]`, a Unix domain socket;
/// - `redis+sentinel://[:password@]host:port[,host:port...]/service[,service...][/db]`: the
///   master of each service, as Sentinel names it (several services are several shards, as
///   asgi_redis's `RedisSentinelChannelLayer` has them).
///
/// Options are named as redis-py names them: `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`,
/// `ssl_cert_reqs` (`required`, `optional`, `none`), `ssl_check_hostname`,
/// `socket_connect_timeout` and `socket_timeout` (seconds), `socket_keepalive`; and ours:
/// `ssl_server_name` (the name the certificate must carry, when it is not the host),
/// `socket_keepalive_idle` (seconds before the first keepalive probe), `sentinel_password`.
public struct RedisEndpoint: Sendable, Hashable, CustomStringConvertible {
    /// How the server is reached.
    public enum Address: Sendable, Hashable {
        /// A host name or address and a port.
        case tcp(host: String, port: Int)
        /// A Unix domain socket.
        case unixSocket(path: String)
        /// The current master of `service`, asked of these sentinels in turn.
        case sentinel(service: String, sentinels: [SentinelHost])
    }

    /// One `redis-sentinel` process.
    public struct SentinelHost: Sendable, Hashable, CustomStringConvertible {
        /// Its host name or address.
        public var host: String
        /// Its port (26379 by default).
        public var port: Int
        /// A sentinel at `host:port`.
        public init(host: String, port: Int = 26379) {
            self.host = host
            self.port = port
        }
        /// `host:port`.
        public var description: String { "\(host):\(port)" }
    }

    /// How the server is reached.
    public var address: Address
    /// The password for `AUTH`, if any.
    public var password: String?
    /// The ACL user name for `AUTH`, if any (sent only with a password, as redis-py does).
    public var username: String?
    /// The database number for `SELECT`.
    public var database: Int
    /// TLS settings; nil for a plain-text connection.
    public var tls: RedisTLSConfiguration?
    /// How long a connection attempt may take; nil for the layer's setting.
    public var connectTimeout: Duration?
    /// How long a reply may take before the connection is considered dead; nil for the layer's setting.
    public var commandTimeout: Duration?
    /// Whether TCP keepalive probes are sent on idle connections (on by default).
    public var keepalive: Bool
    /// Seconds of silence before the first keepalive probe; nil for the system's default.
    public var keepaliveIdle: Int?
    /// The password the sentinels ask for, if any (the `password` is the master's).
    public var sentinelPassword: String?

    /// A TCP endpoint; the defaults are a local Redis, database 0.
    public init(host: String = "127.0.0.1", port: Int = 6379, password: String? = nil, username: String? = nil, database: Int = 0) {
        self.init(address: .tcp(host: host, port: port), password: password, username: username, database: database)
    }

    /// An endpoint at `address`.
    public init(
        address: Address, password: String? = nil, username: String? = nil, database: Int = 0, tls: RedisTLSConfiguration? = nil
    ) {
        self.address = address
        self.password = password
        self.username = username
        self.database = database
        self.tls = tls
        self.keepalive = true
    }

    /// The host of a TCP endpoint, the socket path of a Unix one, the service of a Sentinel one.
    public var host: String {
        switch address {
        case .tcp(let host, _): host
        case .unixSocket(let path): path
        case .sentinel(let service, _): service
        }
    }

    /// The port of a TCP endpoint; 0 for the others.
    public var port: Int {
        if case .tcp(_, let port) = address { return port }
        return 0
    }

    /// Parses a URL that names one server (a Sentinel URL with one service is one server).
    /// Throws `invalidConfiguration` naming what is wrong, including any option that is
    /// neither a connection option nor a channel layer one.
    public init(url: String) throws(ChannelLayerError) {
        let parsed = try Self.parse(url: url)
        guard parsed.endpoints.count == 1 else {
            throw ChannelLayerError(
                .invalidConfiguration, "'\(Self.redacted(url))' names \(parsed.endpoints.count) services; one is needed here")
        }
        if let unknown = parsed.layerOptions.first(where: {
            !RedisChannelLayerConfiguration.optionNames.contains($0.key) && !$0.key.hasPrefix("capacity.")
        }) {
            throw ChannelLayerError(.invalidConfiguration, "unknown Redis option '\(unknown.key)' in '\(Self.redacted(url))'")
        }
        self = parsed.endpoints[0]
    }

    /// The endpoints a URL names (one, or one per Sentinel service) and the options in its
    /// query that are not connection options (the channel layer's own: `prefix`, `expiry`, ...),
    /// with their values still percent-encoded.
    public static func parse(url: String) throws(ChannelLayerError) -> (
        endpoints: [RedisEndpoint], layerOptions: [(key: String, value: String)]
    ) {
        func bad(_ why: String) -> ChannelLayerError {
            ChannelLayerError(.invalidConfiguration, "invalid Redis URL '\(redacted(url))': \(Redaction.scrub(why, of: url))")
        }
        guard let schemeEnd = url.firstRange(of: "://") else {
            throw bad("it has no scheme (redis://, rediss://, unix:// or redis+sentinel://)")
        }
        let scheme = url[..<schemeEnd.lowerBound].lowercased()
        var rest = Substring(url[schemeEnd.upperBound...])
        var query: Substring = ""
        if let q = rest.firstIndex(of: "?") {
            query = rest[rest.index(after: q)...]
            rest = rest[..<q]
        }
        // Credentials: everything before the last '@' of the authority (for unix://, of the
        // part before the socket path: `unix://[user:password@]/path`).
        let authorityEnd = scheme == "unix" ? rest.endIndex : (rest.firstIndex(of: "/") ?? rest.endIndex)
        var password: String? = nil
        var username: String? = nil
        if let at = rest[..<authorityEnd].lastIndex(of: "@") {
            let credentials = rest[..<at]
            rest = rest[rest.index(after: at)...]
            if let colon = credentials.firstIndex(of: ":") {
                let user = credentials[..<colon]
                username = user.isEmpty ? nil : PercentCoding.decode(user.utf8)
                password = PercentCoding.decode(credentials[credentials.index(after: colon)...].utf8)
            } else if !credentials.isEmpty {
                // `redis://name@host` names a user, as in any URL; it is not a password.
                username = PercentCoding.decode(credentials.utf8)
            }
        }

        var template = RedisEndpoint(address: .tcp(host: "127.0.0.1", port: 6379), password: password, username: username)
        if scheme == "rediss" { template.tls = RedisTLSConfiguration() }
        var layerOptions: [(key: String, value: String)] = []
        var sslOptionSeen: String? = nil
        for pair in query.split(separator: "&") where !pair.isEmpty {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let key = String(parts[0])
            let raw = parts.count == 2 ? String(parts[1]) : ""
            let value = PercentCoding.decode(raw.utf8)
            func seconds() throws(ChannelLayerError) -> Duration {
                guard let s = Double(value), s > 0, s.isFinite else {
                    throw bad("'\(key)' must be a positive number of seconds, not '\(value)'")
                }
                return .nanoseconds(Int64(s * 1_000_000_000))
            }
            func bool() throws(ChannelLayerError) -> Bool {
                switch value.lowercased() {
                case "1", "t", "true", "y", "yes", "on": return true
                case "0", "f", "false", "n", "no", "off", "": return false
                default: throw bad("'\(key)' must be true or false, not '\(value)'")
                }
            }
            if key.hasPrefix("ssl_") { sslOptionSeen = key }
            switch key {
            case "db":
                guard let db = Int(value), db >= 0 else { throw bad("database '\(value)' is not a number") }
                template.database = db
            case "password": template.password = value
            case "username": template.username = value
            case "ssl_ca_certs": template.tls?.caCertificatesPath = value
            case "ssl_certfile": template.tls?.certificatePath = value
            case "ssl_keyfile": template.tls?.privateKeyPath = value
            case "ssl_cert_reqs":
                let lowered = value.lowercased()
                guard
                    let v = RedisTLSConfiguration.Verification(
                        rawValue: lowered.hasPrefix("cert_") ? String(lowered.dropFirst(5)) : lowered)
                else {
                    throw bad("'ssl_cert_reqs' must be required, optional or none, not '\(value)'")
                }
                template.tls?.verification = v
            case "ssl_check_hostname": template.tls?.checkHostname = try bool()
            case "ssl_server_name": template.tls?.serverName = value
            case "socket_connect_timeout": template.connectTimeout = try seconds()
            case "socket_timeout": template.commandTimeout = try seconds()
            case "socket_keepalive": template.keepalive = try bool()
            case "socket_keepalive_idle":
                guard let s = Int(value), s > 0 else { throw bad("'socket_keepalive_idle' must be a positive number of seconds") }
                template.keepaliveIdle = s
            case "sentinel_password": template.sentinelPassword = value
            default: layerOptions.append((key, raw))
            }
        }
        if let sslOptionSeen, template.tls == nil {
            throw bad("'\(sslOptionSeen)' needs a rediss:// URL")
        }
        if let tls = template.tls, (tls.certificatePath == nil) != (tls.privateKeyPath == nil) {
            throw bad("ssl_certfile and ssl_keyfile go together (mutual TLS needs both)")
        }

        switch scheme {
        case "redis", "rediss":
            var hostPart = rest
            if let slash = rest.firstIndex(of: "/") {
                hostPart = rest[..<slash]
                let dbText = rest[rest.index(after: slash)...]
                if !dbText.isEmpty {
                    guard let db = Int(dbText), db >= 0 else { throw bad("database '\(dbText)' is not a number") }
                    template.database = db
                }
            }
            let (host, port) = try hostAndPort(hostPart, defaultPort: 6379, bad: bad)
            template.address = .tcp(host: host, port: port)
            // `localhost` is connected to as 127.0.0.1, but its certificate names `localhost`.
            if hostPart.lowercased().hasPrefix("localhost"), template.tls?.serverName == nil { template.tls?.serverName = "localhost" }
            return ([template], layerOptions)
        case "unix":
            let path = String(rest)
            guard path.hasPrefix("/") else { throw bad("a socket path must be absolute (unix:///path/to/redis.sock)") }
            template.address = .unixSocket(path: path)
            return ([template], layerOptions)
        case "redis+sentinel":
            let segments = rest.split(separator: "/", omittingEmptySubsequences: false)
            guard segments.count >= 2, !segments[0].isEmpty else {
                throw bad("it needs sentinel hosts and a service: redis+sentinel://host:port/service")
            }
            var sentinels: [SentinelHost] = []
            for hostPort in segments[0].split(separator: ",") {
                let (host, port) = try hostAndPort(hostPort, defaultPort: 26379, bad: bad)
                sentinels.append(SentinelHost(host: host, port: port))
            }
            let services = segments[1].split(separator: ",").map { PercentCoding.decode($0.utf8) }
            guard !services.isEmpty else { throw bad("it names no service") }
            if segments.count >= 3, !segments[2].isEmpty {
                guard let db = Int(segments[2]), db >= 0 else { throw bad("database '\(segments[2])' is not a number") }
                template.database = db
            }
            guard segments.count <= 3 else { throw bad("too many path segments") }
            return (
                services.map { service in
                    var endpoint = template
                    endpoint.address = .sentinel(service: service, sentinels: sentinels)
                    return endpoint
                }, layerOptions
            )
        default:
            throw bad("unknown scheme '\(scheme)' (redis://, rediss://, unix:// or redis+sentinel://)")
        }
    }

    private static func hostAndPort(
        _ text: Substring, defaultPort: Int, bad: (String) -> ChannelLayerError
    ) throws(ChannelLayerError) -> (String, Int) {
        var host = String(text)
        var port = defaultPort
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
        return (host, port)
    }

    /// A URL with its password and secret options replaced by `***`, for error messages and logs.
    static func redacted(_ url: String) -> String { Redaction.redact(url) }

    /// The endpoint as a URL, without the password.
    public var description: String {
        let user = username.map { "\($0)@" } ?? ""
        switch address {
        case .tcp(let host, let port):
            let shown = host.contains(":") ? "[\(host)]" : host
            return "\(tls == nil ? "redis" : "rediss")://\(user)\(shown):\(port)/\(database)"
        case .unixSocket(let path):
            return "unix://\(user)\(path)?db=\(database)"
        case .sentinel(let service, let sentinels):
            return "redis+sentinel://\(sentinels.map(\.description).joined(separator: ","))/\(service)/\(database)"
        }
    }

    /// The label of this server in metrics: `host:port/db`, `path/db` or `sentinel:service/db`.
    var metricsLabel: String {
        switch address {
        case .tcp(let host, let port): "\(host):\(port)/\(database)"
        case .unixSocket(let path): "\(path)/\(database)"
        case .sentinel(let service, _): "sentinel:\(service)/\(database)"
        }
    }
}
