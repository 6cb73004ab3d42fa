import ASGI
import Channels
import RedisChannelLayer

/// Delayed messages in a Redis sorted set scored by due time, so any number of delay servers
/// share them and each message is taken (and sent) by exactly one.
public final class RedisDelayStore: DelayStore {
    /// The Redis connection.
    public let client: RedisClient
    /// The sorted set that holds the scheduled messages.
    public let key: String

    private static let take = LuaScript(
        name: "delay-take",
        source: """
            local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
            if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
            return due
            """)

    /// A store on `client`, in the sorted set `key`.
    public init(client: RedisClient, key: String = "asgi-delay:scheduled") {
        self.client = client
        self.key = key
    }

    /// Adds `entry`, scored with its due time.
    public func schedule(_ entry: [UInt8], due: Int64) async throws {
        // A random prefix keeps two identical messages distinct members of the set.
        var member = RandomToken.bytes(8)
        member.append(contentsOf: entry)
        try await client.command([Array("ZADD".utf8), Array(key.utf8), Array(String(due).utf8), member])
    }

    /// Removes and returns up to `limit` due entries in one script, so two delay servers never
    /// deliver one twice.
    public func takeDue(now: Int64, limit: Int) async throws -> [[UInt8]] {
        let reply = try await client.run(
            Self.take, keys: [Array(key.utf8)],
            args: [Array(String(now).utf8), Array(String(limit).utf8)])
        return (reply.array ?? []).compactMap { $0.bytes.map { Array($0.dropFirst(8)) } }
    }

    /// When the earliest entry is due, if there is one.
    public func nextDue() async throws -> Int64? {
        let reply = try await client.command([
            Array("ZRANGE".utf8), Array(key.utf8), Array("0".utf8), Array("0".utf8),
            Array("WITHSCORES".utf8),
        ])
        guard let items = reply.array, items.count == 2, let score = items[1].text, let value = Double(score) else { return nil }
        return Int64(value)
    }
}
