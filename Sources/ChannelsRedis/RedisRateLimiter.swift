import ASGI
import Channels
import RedisChannelLayer

/// Rate-limit windows in Redis (`<prefix><key>`, an `INCR` with the window as its TTL, in one
/// script), so every worker on the layer counts the same attempts.
public final class RedisRateLimiter: RateLimiter {
    /// The Redis connection.
    public let client: RedisClient
    /// Key prefix (the layer's prefix and `ratelimit:`).
    public let prefix: String

    private static let hitScript = LuaScript(
        name: "rate-limit-hit",
        source: """
            local count = redis.call('INCR', KEYS[1])
            if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
            local ttl = redis.call('TTL', KEYS[1])
            if ttl < 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]); ttl = tonumber(ARGV[1]) end
            return {count, ttl}
            """)

    /// A limiter on `client`, keys under `prefix`.
    public init(client: RedisClient, prefix: String = "asgi:ratelimit:") {
        self.client = client
        self.prefix = prefix
    }

    /// Counts one attempt for `key`.
    public func hit(_ key: String, window: Int) async throws -> (count: Int, resetIn: Int) {
        let reply = try await client.run(
            Self.hitScript, keys: [.key(prefix, key)], args: [.integer(max(1, window))])
        let items = reply.array ?? []
        return (items.first?.integer.map(Int.init) ?? 1, max(1, items.last?.integer.map(Int.init) ?? window))
    }

    /// The attempts counted for `key` now.
    public func peek(_ key: String) async throws -> (count: Int, resetIn: Int) {
        let name = RedisArgument.key(prefix, key)
        let count = try await client.command("GET", name).text.flatMap { Int($0) } ?? 0
        let ttl = try await client.command("TTL", name).integer.map(Int.init) ?? 0
        return (count, max(0, ttl))
    }
}
