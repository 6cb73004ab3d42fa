import ASGI
import Channels
import RedisChannelLayer

/// Delayed messages in a Redis sorted set scored by due time, so any number of delay servers
/// share them and each message is taken (and sent) by exactly one. The set lives under the
/// layer's prefix (`<prefix>delay`), so each application's delay servers take only its own
/// messages; with the layer's encryption keys its members are sealed.
public final class RedisDelayStore: DelayStore {
    /// The Redis connection.
    public let client: RedisClient
    /// The sorted set that holds the scheduled messages.
    public let key: String
    /// Seals members when set.
    public let encryption: StorageEncryption?

    private static let take = LuaScript(
        name: "delay-take",
        source: """
            local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
            for i = 1, #due, 2 do redis.call('ZREM', KEYS[1], due[i]) end
            return due
            """)

    /// A store on `client`, in the sorted set `key` (give it the layer's prefix and `delay`).
    public init(client: RedisClient, key: String = "asgi:delay", encryption: StorageEncryption? = nil) {
        self.client = client
        self.key = key
        self.encryption = encryption
    }

    /// Adds `entry`, scored with its due time.
    public func schedule(_ entry: [UInt8], due: Int64) async throws {
        // A random prefix keeps two identical messages distinct members of the set.
        var member = RandomToken.bytes(8)
        member.append(contentsOf: encryption?.seal(entry) ?? entry)
        try await client.command(["ZADD", .text(key), .integer(Int(due)), .bytes(member)])
    }

    /// Removes and returns up to `limit` due entries (with when each was due) in one script, so
    /// two delay servers never deliver one twice.
    public func takeDue(now: Int64, limit: Int) async throws -> [DueEntry] {
        let reply = try await client.run(
            Self.take, keys: [.text(key)], args: [.integer(Int(now)), .integer(limit)])
        let items = reply.array ?? []
        return stride(from: 0, to: items.count - 1, by: 2).compactMap { index in
            guard let member = items[index].bytes, let score = items[index + 1].text.flatMap(Double.init) else { return nil }
            let stored = Array(member.dropFirst(8))
            // An entry no key opens is handed on as it is: the delay server drops it as malformed, and counts it.
            let entry = encryption.map { (try? $0.open(stored)) ?? [] } ?? stored
            return DueEntry(entry: entry, due: Int64(score))
        }
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
