import ASGI

/// Settings of a ``RedisChannelLayer``; the defaults are asgi_redis 1.4's.
public struct RedisChannelLayerConfiguration: Sendable {
    /// The ring of Redis servers; more than one shards channels and groups across them.
    public var hosts: [RedisEndpoint]
    /// Prefix of every message, list and group key.
    public var prefix: String
    /// Prefix of the statistics counters.
    public var statsPrefix: String
    /// How long a message lives (whole seconds in Redis; at least one).
    public var expiry: Duration
    /// How long a group member lives without being re-added (whole seconds; at least one).
    public var groupExpiry: Duration
    /// Messages one channel may hold.
    public var capacity: Int
    /// How long a group send offers again a server's share that its full process channel
    /// refused (the server reads behind) before dropping it (counted); zero drops at once, as
    /// asgi_redis does for every full channel. Plain channels are never waited for.
    public var groupFullWait: Duration = .seconds(2)
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
    /// Keys for asgi_redis's message encryption (`symmetric_encryption_keys`): the first
    /// encrypts, every one decrypts (rotation). Empty: bodies are plain msgpack.
    public var symmetricEncryptionKeys: [String]

    /// `expiry` in whole seconds, as Redis and the scripts take it.
    var expirySeconds: Int { max(1, Int(expiry.components.seconds)) }
    /// `groupExpiry` in whole seconds.
    var groupExpirySeconds: Int { max(1, Int(groupExpiry.components.seconds)) }

    /// Seconds a channel's statistics keys live (asgi_redis's value).
    public static let channelStatisticsExpiry = 3600
    /// Seconds the global statistics keys live (asgi_redis's value).
    public static let globalStatisticsExpiry = 86400
    /// Stored messages of at least this many bytes are sent on a loop's bulk connection, so
    /// small messages are not queued behind them in one pipeline.
    public static let bulkMessageSize = 64 * 1024

    /// A configuration; every argument has asgi_redis 1.4's default.
    public init(
        hosts: [RedisEndpoint] = [RedisEndpoint()],
        prefix: String = "asgi:",
        statsPrefix: String = "asgi-meta:",
        expiry: Duration = .seconds(60),
        groupExpiry: Duration = .seconds(86400),
        capacity: Int = 100,
        channelCapacities: [(String, Int)] = [],
        maxMessageSize: Int = 4 * 1024 * 1024,
        blockingSlice: Duration = .seconds(1),
        connectTimeout: Duration = .seconds(2),
        commandTimeout: Duration = .seconds(5),
        symmetricEncryptionKeys: [String] = []
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
        self.symmetricEncryptionKeys = symmetricEncryptionKeys
    }

    /// The layer options a URL's query may set (besides `capacity.<glob>`).
    public static let optionNames: Set<String> = [
        "prefix", "stats_prefix", "expiry", "group_expiry", "capacity", "max_message_size", "symmetric_encryption_keys",
    ]

    /// The environment variable that holds encryption keys (comma-separated) when no URL sets them.
    public static let encryptionKeysVariable = "CHANNEL_LAYER_ENCRYPTION_KEYS"

    /// Hosts from a list of Redis URLs (see ``RedisEndpoint`` for the forms and connection
    /// options). Query parameters of the first URL set the other fields: `prefix`,
    /// `stats_prefix`, `expiry`, `group_expiry`, `capacity`, `max_message_size`,
    /// `capacity.<glob>=<n>` for per-channel capacities, and `symmetric_encryption_keys`
    /// (comma-separated, each percent-encoded). Without that option, keys come from
    /// `environment[CHANNEL_LAYER_ENCRYPTION_KEYS]` when it is set.
    public init(urls: [String], environment: [String: String] = [:]) throws(ChannelLayerError) {
        self.init()
        guard !urls.isEmpty else {
            throw ChannelLayerError(.invalidConfiguration, "at least one Redis URL is needed")
        }
        hosts = []
        var options: [(key: String, value: String)] = []
        for (index, url) in urls.enumerated() {
            let parsed = try RedisEndpoint.parse(url: url)
            hosts += parsed.endpoints
            if index == 0 { options = parsed.layerOptions }
        }
        if let keys = environment[Self.encryptionKeysVariable], !keys.isEmpty {
            symmetricEncryptionKeys = Self.splitKeys(keys)
        }
        for (key, raw) in options {
            let value = PercentCoding.decode(raw.utf8)
            func int() throws(ChannelLayerError) -> Int {
                guard let n = Int(value), n > 0 else {
                    throw ChannelLayerError(.invalidConfiguration, "'\(key)' must be a positive integer, not '\(value)'")
                }
                return n
            }
            switch key {
            case "prefix":
                // Keys are the prefix and a name: without a separator at its end, 'app' and
                // 'app2' would share keys ('app2x' is both). asgi_redis adds none, so neither do we.
                guard let last = value.last, ":._-/|".contains(last) else {
                    throw ChannelLayerError(
                        .invalidConfiguration,
                        "prefix '\(value)' must end with a separator (':', '.', '_', '-', '/' or '|'), e.g. '\(value):'")
                }
                prefix = value
            case "stats_prefix": statsPrefix = value
            case "expiry": expiry = .seconds(try int())
            case "group_expiry": groupExpiry = .seconds(try int())
            case "capacity": capacity = try int()
            case "max_message_size": maxMessageSize = try int()
            case "symmetric_encryption_keys": symmetricEncryptionKeys = Self.splitKeys(raw)
            case _ where key.hasPrefix("capacity."):
                channelCapacities.append((String(key.dropFirst("capacity.".count)), try int()))
            default:
                throw ChannelLayerError(.invalidConfiguration, "unknown Redis layer option '\(key)'")
            }
        }
    }

    /// Splits a comma-separated list of URLs: only a comma followed by a scheme (`redis://`,
    /// `rediss://`, `unix://`, `redis+sentinel://`) starts a new URL, so the commas inside a
    /// Sentinel URL (hosts, services) or an option value (encryption keys) stay where they are.
    public static func splitURLList(_ text: String) -> [String] {
        var urls: [String] = []
        for piece in text.split(separator: ",", omittingEmptySubsequences: false) {
            if piece.contains("://") || urls.isEmpty {
                urls.append(String(piece))
            } else {
                urls[urls.count - 1] += "," + piece
            }
        }
        return urls.filter { !$0.isEmpty }
    }

    /// Comma-separated keys; each may be percent-encoded (a key holding a comma is `%2C`).
    static func splitKeys(_ text: String) -> [String] {
        text.split(separator: ",").map { PercentCoding.decode($0.utf8) }.filter { !$0.isEmpty }
    }
}
