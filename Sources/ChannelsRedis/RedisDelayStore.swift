import ASGI
import Channels
import CoreMetrics
import RedisChannelLayer
import Synchronization

/// Delayed messages in a Redis sorted set scored by due time, so any number of delay servers
/// share them and each message is taken (and sent) by exactly one. A taken message is held in
/// `<key>:taken` until its delivery is done; one whose delay server died in between is due
/// again after ``deliveryLease`` (the one it was sending then may arrive twice). The set lives under the
/// layer's prefix (`<prefix>delay`), so each application's delay servers take only its own
/// messages; with the layer's encryption keys its members are sealed.
public final class RedisDelayStore: DelayStore {
    /// The Redis connection.
    public let client: RedisClient
    /// The sorted set that holds the scheduled messages.
    public let key: String
    /// Seals members when set.
    public let encryption: StorageEncryption?

    /// Takes up to ARGV[2] entries due at ARGV[1] into the taken set (KEYS[2], no expiry: what
    /// it holds leaves by a finish or a reclaim), each held there until ARGV[1] + ARGV[3] ms;
    /// first, entries held past their lease (a delay server died between its take and its
    /// sends) are due again. Returns {member, due, ...}, and how many came back.
    private static let take = LuaScript(
        name: "delay-take-held",
        source: """
            local now = tonumber(ARGV[1])
            local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)
            for _, member in ipairs(lapsed) do
                redis.call('ZREM', KEYS[2], member)
                redis.call('ZADD', KEYS[1], now, member)
            end
            local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
            for i = 1, #due, 2 do
                redis.call('ZREM', KEYS[1], due[i])
                redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), due[i])
            end
            return {due, #lapsed}
            """)

    /// Where taken entries are held until their delivery is done: `<key>:taken`, scored by when
    /// their lease lapses.
    public var takenKey: String { key + ":taken" }
    /// How long a taken entry is held for its delivery: if its delay server dies first, the
    /// next take (by any delay server on this Redis) makes it due again.
    public let deliveryLease: Duration?
    /// Entries whose delay server died between the take and the send, due again so far (by this store's takes).
    public var reclaimed: Int { reclaimedCount.load(ordering: .relaxed) }
    private let reclaimedCount = Atomic<Int>(0)
    /// `channels_delay_reclaimed_total`.
    private static let reclaimedMetric = Counter(label: "channels_delay_reclaimed_total")

    /// A store on `client`, in the sorted set `key` (give it the layer's prefix and `delay`);
    /// taken entries are held for `deliveryLease` until delivered.
    public init(
        client: RedisClient, key: String = "asgi:delay", encryption: StorageEncryption? = nil, deliveryLease: Duration = .seconds(30)
    ) {
        self.client = client
        self.key = key
        self.encryption = encryption
        self.deliveryLease = deliveryLease
    }

    /// Adds `entry`, scored with its due time.
    public func schedule(_ entry: [UInt8], due: Int64) async throws {
        // A random prefix keeps two identical messages distinct members of the set.
        var member = RandomToken.bytes(8)
        member.append(contentsOf: encryption?.seal(entry) ?? entry)
        try await client.command(["ZADD", .text(key), .integer(Int(due)), .bytes(member)])
    }

    /// Moves up to `limit` due entries (with when each was due) to the taken set in one script,
    /// so two delay servers never deliver one twice; ``finished(_:)`` lets go of each once
    /// delivered. Entries left there by a delay server that died are due again first.
    public func takeDue(now: Int64, limit: Int) async throws -> [DueEntry] {
        let lease = Int(max(1, (deliveryLease ?? .seconds(30)).nanoseconds / 1_000_000))
        let reply = try await client.run(
            Self.take, keys: [.text(key), .text(takenKey)], args: [.integer(Int(now)), .integer(limit), .integer(lease)])
        guard let parts = reply.array, parts.count == 2 else { return [] }
        if let back = parts[1].integer, back > 0 {
            reclaimedCount.add(Int(back), ordering: .relaxed)
            Self.reclaimedMetric.increment(by: Int(back))
        }
        let items = parts[0].array ?? []
        return stride(from: 0, to: items.count - 1, by: 2).compactMap { index in
            guard let member = items[index].bytes, let score = items[index + 1].text.flatMap(Double.init) else { return nil }
            let stored = Array(member.dropFirst(8))
            // An entry no key opens is handed on as it is: the delay server drops it as malformed, and counts it.
            let entry = encryption.map { (try? $0.open(stored)) ?? [] } ?? stored
            return DueEntry(entry: entry, due: Int64(score), receipt: member)
        }
    }

    /// Lets go of a delivered entry (removes it from the taken set).
    public func finished(_ taken: DueEntry) async throws {
        guard !taken.receipt.isEmpty else { return }
        _ = try await client.command(["ZREM", .text(takenKey), .bytes(taken.receipt)])
    }

    /// Redis's `TIME`: the clock every delay server on this Redis shares.
    public func now() async throws -> Int64? {
        let reply = try await client.command("TIME")
        guard let parts = reply.array, parts.count == 2, let seconds = parts[0].text.flatMap(Int64.init),
            let micros = parts[1].text.flatMap(Int64.init)
        else { return nil }
        return seconds * 1000 + micros / 1000
    }

    /// When the earliest entry is due, if there is one.
    public func nextDue() async throws -> Int64? {
        let reply = try await client.command("ZRANGE", .text(key), 0, 0, "WITHSCORES")
        guard let items = reply.array, items.count == 2, let score = items[1].text, let value = Double(score) else { return nil }
        return Int64(value)
    }
}
