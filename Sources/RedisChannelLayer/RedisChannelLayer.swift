import ASGI
import Crypto
import DequeModule
import Logging
import NIOCore
import NIOPosix
import OrderedCollections
import Synchronization

/// The Redis channel layer, byte-compatible with Python's asgi_redis 1.4.
///
/// Channels are Redis lists of body keys, bodies are msgpack strings with an expiry, groups
/// are sorted sets scored by the time of the last add. I/O is non-blocking on SwiftNIO event
/// loops, with hiredis parsing the replies: every ordinary command and script of every task
/// goes through a pipelined connection per server and event loop (the caller's), and only
/// receives that wait in `BLPOP` hold a connection of their own.
public final class RedisChannelLayer: ChannelLayerInspection, ChannelLayerBundling, ChannelLayerCapacities,
    ChannelLayerPendingCounts, ChannelLayerSendMany
{
    /// The URLs, prefix, expiry and limits it runs with.
    public let configuration: RedisChannelLayerConfiguration
    let logger: Logger
    let shards: [RedisConnectionPool]
    let capacities: CapacityTable

    /// The capacity a send to `channel` is held to.
    public func capacity(for channel: String) -> Int { capacities.capacity(for: channel) }
    /// The channel-capacity patterns as the group-send script takes them (count, then pattern, capacity pairs).
    let luaCapacityArgs: [RedisArgument]
    let sendCursor = Atomic<Int>(0)
    let receiveCursor = Atomic<Int>(0)
    /// Which list a batch receive takes its share from first (turns with every batch).
    let fairCursor = Atomic<Int>(0)
    /// Whether the last receive found a message waiting (see `receive`).
    let flowing = Atomic<Bool>(false)
    /// Set when a shard refused `CLIENT ID`: blocking waits then rotate over the shards instead
    /// of racing them (a racer nobody can wake would hold every receive for its whole slice).
    let unblockRefused = Atomic<Bool>(false)
    /// The server refused `BLMOVE` (older than Redis 6.2): blocking takes of one list use
    /// `BLPOP` and a second round trip for the body.
    let moveRefused = Atomic<Bool>(false)
    /// Lists whose blocking take failed after its move may have run: the next blocking take of
    /// such a list looks in its in-hand list first, without waiting.
    let inHandMayHold = Mutex<Set<RedisArgument>>([])
    let malformedDropped = Atomic<Int>(0)
    let undecryptableDropped = Atomic<Int>(0)
    /// asgi_redis's Fernet encryption of bodies, when `symmetricEncryptionKeys` is set.
    let crypter: MultiFernet?
    /// The key of the group journal's field digests on an encrypted layer.
    let journalDigestKey: [UInt8]?
    let membersReached = Atomic<Int>(0)
    let membersMissed = Atomic<Int>(0)
    /// Group sends offered again after a full process channel (see `settleGroupSend`).
    let groupSendsHeld = Atomic<Int>(0)
    /// Process channels that stayed full for a whole group-full wait, skipped until the instant.
    let stalledProcessChannels = Mutex<[String: ContinuousClock.Instant]>([:])
    let isClosed = Atomic<Bool>(false)
    let decoder = MsgPackDecoder()
    /// Bundles' member lists decoded before (a group's next message names the same members).
    let bundleMembers = BundleMembers()
    /// Members of bundled group messages not yet handed out, by list (non-local) name: a
    /// bundle is popped once from Redis and given out one member at a time, in order, before
    /// anything popped after it. Only the one reader of a process channel ever holds these.
    let backlog = Mutex<[String: Deque<ReceivedMessage>]>([:])
    /// Process channels this layer has registered a reader for.
    let registeredReaders = Mutex<Set<String>>([])
    /// Each shard's birth mark as first seen: a registration that vanished while the mark stayed
    /// was evicted (one key); a new mark means the Redis lost its data.
    let birthMarks = Mutex<[Int: [UInt8]]>([:])
    /// Each shard's run id and evicted-key count at the last registration (see
    /// ``registerBundleReader(_:)``).
    let redisLives = Mutex<[Int: RedisLife]>([:])
    /// The group journal entries of open sockets the keeper's last pass saw, per shard and
    /// process channel: what a vanished journal is written again from.
    let journalViews = Mutex<[String: Set<String>]>([:])

    /// A layer on the Redis servers `configuration` names; connections open on first use.
    ///
    /// - Parameters:
    ///   - configuration: the servers, prefix, expiries, capacities and encryption keys.
    ///   - logger: where the layer logs (dropped messages, reconnects).
    ///   - eventLoopGroup: where the connections live; NIO's shared group by default.
    public init(
        configuration: RedisChannelLayerConfiguration, logger: Logger = Logger(label: "channels.redis"),
        eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    ) throws(ChannelLayerError) {
        guard !configuration.hosts.isEmpty else {
            throw ChannelLayerError(.invalidConfiguration, "the Redis layer needs at least one host")
        }
        self.configuration = configuration
        self.logger = logger
        self.shards = configuration.hosts.map {
            RedisConnectionPool(
                endpoint: $0, group: eventLoopGroup, connectTimeout: configuration.connectTimeout,
                commandTimeout: configuration.commandTimeout)
        }
        self.capacities = CapacityTable(
            defaultCapacity: configuration.capacity,
            patterns: configuration.channelCapacities)
        var capacityArgs: [RedisArgument] = [.integer(configuration.channelCapacities.count)]
        for (glob, capacity) in configuration.channelCapacities {
            capacityArgs.append(.text(GlobPatternLua.luaPattern(glob)))
            capacityArgs.append(.integer(capacity))
        }
        self.luaCapacityArgs = capacityArgs
        self.crypter =
            configuration.symmetricEncryptionKeys.isEmpty ? nil : MultiFernet(asgiRedisKeys: configuration.symmetricEncryptionKeys)
        // The group journal's digest key, from the first encryption key (see
        // `journalFieldAndValue`).
        self.journalDigestKey = configuration.symmetricEncryptionKeys.first.map {
            Array(SHA256.hash(data: Array(("channels-group-journal:" + $0).utf8)))
        }
    }

    /// A layer on the servers of these URLs (see ``RedisChannelLayerConfiguration/init(urls:environment:)``).
    public convenience init(
        urls: [String], environment: [String: String] = [:], logger: Logger = Logger(label: "channels.redis")
    ) throws(ChannelLayerError) {
        try self.init(configuration: RedisChannelLayerConfiguration(urls: urls, environment: environment), logger: logger)
    }

    // MARK: Bodies

    /// A message as stored: msgpack, encrypted when keys are set (asgi_redis's `serialize`).
    func seal(_ message: Message) -> [UInt8] {
        let body = MsgPackEncoder.encode(message)
        return crypter?.encrypt(body) ?? body
    }

    /// Bodies whose encryption did not check out (an unknown key, expired, altered), dropped.
    public var undecryptableMessagesDropped: Int { undecryptableDropped.load(ordering: .relaxed) }

    deinit {
        for shard in shards { shard.close() }
    }

    // MARK: Connections

    func checkOpen() throws(ChannelLayerError) {
        if isClosed.load(ordering: .relaxed) { throw ChannelLayerError(.closed, "the Redis layer is closed") }
    }

    /// The shard's shared, pipelined connection on the caller's event loop.
    func shared(_ shard: Int, bulk: Bool = false) async throws(ChannelLayerError) -> RedisConnection {
        try checkOpen()
        return try await shards[shard].shared(bulk: bulk)
    }

    /// A script call on the shard's shared connection.
    func pipelined(
        _ shard: Int, _ script: LuaScript, keys: [RedisArgument], args: [RedisArgument], bulk: Bool = false
    ) async throws -> RedisReply {
        let reply = try await script.run(on: shared(shard, bulk: bulk), keys: keys, args: args)
        // A Redis that refused it for a moment (loading its data set after a restart): thrown
        // as the `connectionLost` that callers already try again after.
        if let message = reply.errorMessage, RedisRefusal.isNotReady(message) {
            throw ChannelLayerError.redisRefused(message, "Redis script \(script.name)")
        }
        return reply
    }

    /// A blocking command (and what follows it) on a connection of its own.
    func onDedicated<T>(_ shard: Int, _ body: (RedisConnection) async throws -> T) async throws -> T {
        try checkOpen()
        return try await shards[shard].withDedicated(body)
    }

    /// Connections opened so far, over all shards (for tests that check nothing leaks).
    public var connectionsOpened: Int { shards.reduce(0) { $0 + $1.connectionsOpened } }

    /// Closes every connection; later calls fail with `closed`.
    public func close() async {
        guard !isClosed.exchange(true, ordering: .relaxed) else { return }
        for shard in shards { shard.close() }
    }
}
