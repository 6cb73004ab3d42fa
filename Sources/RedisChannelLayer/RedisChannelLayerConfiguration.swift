import ASGI

/// Settings of a ``RedisChannelLayer``; the defaults are asgi_redis 1.4's.
public struct RedisChannelLayerConfiguration: Sendable {
    /// The ring of Redis servers; more than one shards channels and groups across them.
    public var hosts: [RedisEndpoint]
    /// Prefix of every message, list and group key.
    public var prefix: String
    /// Prefix of the statistics counters.
    public var statsPrefix: String
    /// Seconds a message lives.
    public var expiry: Int
    /// Seconds a group member lives without being re-added.
    public var groupExpiry: Int
    /// Messages one channel may hold.
    public var capacity: Int
    /// Per-channel capacities by glob pattern; the first match wins.
    public var channelCapacities: [(String, Int)]
    /// The largest encoded message a send accepts.
    public var maxMessageSize: Int
    /// Longest single `BLPOP`: how soon a blocked receive notices cancellation or shutdown.
    public var blockingSlice: Duration
    /// How long a connection attempt may take before it fails.
    public var connectTimeout: Duration
    /// How long a reply may take before the connection is considered dead.
    public var commandTimeout: Duration

    /// Seconds a channel's statistics keys live (asgi_redis's value).
    public static let channelStatisticsExpiry = 3600
    /// Seconds the global statistics keys live (asgi_redis's value).
    public static let globalStatisticsExpiry = 86400

    /// A configuration; every argument has asgi_redis 1.4's default.
    public init(
        hosts: [RedisEndpoint] = [RedisEndpoint()],
        prefix: String = "asgi:",
        statsPrefix: String = "asgi-meta:",
        expiry: Int = 60,
        groupExpiry: Int = 86400,
        capacity: Int = 100,
        channelCapacities: [(String, Int)] = [],
        maxMessageSize: Int = 4 * 1024 * 1024,
        blockingSlice: Duration = .seconds(1),
        connectTimeout: Duration = .seconds(2),
        commandTimeout: Duration = .seconds(5)
    ) {
        self.hosts = hosts
        self.prefix = prefix
        self.statsPrefix = statsPrefix
        self.expiry = expiry
        self.groupExpiry = groupExpiry
        self.capacity = capacity
        self.channelCapacities = channelCapacities
        self.maxMessageSize = maxMessageSize
        self.blockingSlice = blockingSlice
        self.connectTimeout = connectTimeout
        self.commandTimeout = commandTimeout
    }

    /// Hosts from a list of `redis://` URLs. Query parameters of the first URL set the
    /// other fields: `prefix`, `stats_prefix`, `expiry`, `group_expiry`, `capacity`, `max_message_size`,
    /// and `capacity.<glob>=<n>` for per-channel capacities.
    public init(urls: [String]) throws(ChannelLayerError) {
        self.init()
        guard !urls.isEmpty else {
            throw ChannelLayerError(.invalidConfiguration, "at least one Redis URL is needed")
        }
        hosts = []
        for url in urls {
            hosts.append(try RedisEndpoint(url: url))
        }
        if let query = urls[0].split(separator: "?", maxSplits: 1).dropFirst().first {
            for pair in query.split(separator: "&") {
                let parts = pair.split(separator: "=", maxSplits: 1).map(String.init)
                guard parts.count == 2 else { continue }
                let (key, value) = (parts[0], PercentCoding.decode(parts[1].utf8))
                func int() throws(ChannelLayerError) -> Int {
                    guard let n = Int(value), n > 0 else {
                        throw ChannelLayerError(.invalidConfiguration, "'\(key)' must be a positive integer, not '\(value)'")
                    }
                    return n
                }
                switch key {
                case "prefix": prefix = value
                case "stats_prefix": statsPrefix = value
                case "expiry": expiry = try int()
                case "group_expiry": groupExpiry = try int()
                case "capacity": capacity = try int()
                case "max_message_size": maxMessageSize = try int()
                case _ where key.hasPrefix("capacity."):
                    channelCapacities.append((String(key.dropFirst("capacity.".count)), try int()))
                default:
                    throw ChannelLayerError(.invalidConfiguration, "unknown Redis layer option '\(key)'")
                }
            }
        }
    }
}
