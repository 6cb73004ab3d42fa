import ASGI
import Channels
import RedisChannelLayer

/// Sessions in Redis, each one string key `<prefix><storage key>` (the layer's prefix and
/// `session:` by default, so two applications on one Redis never share one) with the session
/// age as its TTL. Conditional writes are one Lua script, so they are atomic on the server.
public final class RedisSessionStore: SessionStore {
    /// The Redis connection.
    public let client: RedisClient
    /// The key prefix of session keys.
    public let prefix: String

    private static let conditionalSet = LuaScript(
        name: "session-store",
        source: """
            local current = redis.call('GET', KEYS[1])
            if ARGV[2] == '0' then
                if current then return 0 end
            elseif current ~= ARGV[3] then
                return 0
            end
            redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[4])
            return 1
            """)

    /// A store on `client`, keys under `prefix` (give it the layer's prefix and `session:`).
    public init(client: RedisClient, prefix: String = "asgi:session:") {
        self.client = client
        self.prefix = prefix
    }

    /// A store on the Redis server of this URL.
    public convenience init(url: String, prefix: String = "asgi:session:") throws {
        self.init(client: try RedisClient(url: url), prefix: prefix)
    }

    private func redisKey(_ key: String) -> RedisArgument { .key(prefix, key) }

    /// The stored bytes, or nil when missing or expired.
    public func load(_ key: String) async throws -> [UInt8]? {
        try await client.command("GET", redisKey(key)).bytes
    }

    /// The stored bytes of several sessions, in one `MGET`.
    public func load(many keys: [String]) async throws -> [[UInt8]?] {
        if keys.count < 2 { return keys.isEmpty ? [] : [try await load(keys[0])] }
        let reply = try await client.command(["MGET"] + keys.map(redisKey))
        guard let values = reply.array, values.count == keys.count else {
            throw ChannelLayerError(.backendError, "session store: an unexpected MGET reply")
        }
        return values.map(\.bytes)
    }

    /// Writes only if the stored value is still `expected` (a compare-and-set script); false when
    /// someone else wrote first.
    public func store(_ key: String, data: [UInt8], expected: [UInt8]?, ttl: Duration) async throws -> Bool {
        let reply = try await client.run(
            Self.conditionalSet, keys: [redisKey(key)],
            args: [.bytes(data), expected == nil ? "0" : "1", .bytes(expected ?? []), .integer(max(1, Int(ttl.components.seconds)))])
        return reply.integer == 1
    }

    /// Removes the session.
    public func delete(_ key: String) async throws {
        try await client.command("DEL", redisKey(key))
    }
}
