import ASGI
import Crypto
import Foundation

/// Presence in Redis, on the group's shard (inspect with `redis-cli`):
///
/// - `<prefix>presence:<group>`: hash, connection → user (with encryption keys: an HMAC of it);
/// - `<prefix>presence-meta:<group>`: hash, connection → metadata (JSON text; with encryption
///   keys a Fernet token of the user's name and the metadata);
/// - `<prefix>presence-expiry:<group>`: sorted set, connection scored by its expiry (Unix time),
///   pushed forward by the connection's server every few seconds;
/// - `<prefix>presence-users:<group>`: hash, user (or its HMAC) → connections;
/// - `<prefix>presence-groups`: sorted set of groups with presence (per shard), for the sweep.
///
/// A connection past its expiry (its server stopped renewing it: it died) is not listed, and
/// the next sweep removes it and reports its user's leave when it was their last connection.
extension RedisChannelLayer: ChannelLayerPresence {
    private func presenceKeys(_ group: String) -> [RedisArgument] {
        let p = configuration.prefix
        return [
            .text(p + "presence:" + group), .text(p + "presence-meta:" + group), .text(p + "presence-expiry:" + group),
            .text(p + "presence-users:" + group),
        ]
    }

    private var presenceIndex: RedisArgument { .text(configuration.prefix + "presence-groups") }

    /// The field a user is counted under: the name itself, or with encryption keys an HMAC of
    /// it (keyed by the first key), so Redis holds no user name in the clear.
    func presenceUserField(_ user: String) -> String {
        guard let first = configuration.symmetricEncryptionKeys.first else { return user }
        let key = SymmetricKey(data: SHA256.hash(data: Array(("swift-channels presence:" + first).utf8)))
        let mac = HMAC<SHA256>.authenticationCode(for: Array(user.utf8), using: key)
        return "u"
            + mac.prefix(16).map { byte in String(byte, radix: 16).count == 1 ? "0" + String(byte, radix: 16) : String(byte, radix: 16) }
            .joined()
    }

    /// What is stored for a connection beside its user field: the metadata, or with encryption
    /// keys a Fernet token of the user's name and the metadata.
    func presenceValue(user: String, meta: String) -> RedisArgument {
        guard let crypter else { return .text(meta) }
        return .bytes(crypter.encrypt(Array(user.utf8) + [0] + Array(meta.utf8)))
    }

    /// A stored connection back to its user and metadata (nil: a token no key opens).
    func presenceMember(field: String, value: [UInt8]) -> (user: String, meta: String)? {
        guard let crypter else { return (field, String(decoding: value, as: UTF8.self)) }
        guard let plain = try? crypter.decrypt(value, ttl: nil), let zero = plain.firstIndex(of: 0) else { return nil }
        return (String(decoding: plain[..<zero], as: UTF8.self), String(decoding: plain[(zero + 1)...], as: UTF8.self))
    }

    /// Tracks a connection as present; see ``ChannelLayerPresence/presenceJoin(_:connection:user:meta:ttl:)``.
    public func presenceJoin(_ group: String, connection: String, user: String, meta: String, ttl: Duration) async throws -> Bool {
        try ChannelNames.validateGroup(group)
        let reply = try await pipelined(
            shardIndex(for: group), Scripts.presenceJoin, keys: presenceKeys(group) + [presenceIndex],
            args: [
                .text(connection), .text(presenceUserField(user)), presenceValue(user: user, meta: meta),
                .text(String(Self.unixTime() + ttl.seconds)), .text(group),
                .integer(configuration.groupExpiry),
            ])
        if let error = reply.errorMessage { throw ChannelLayerError.redisRefused(error, "presence join") }
        return reply.countValue == 1
    }

    /// Stops tracking a connection; see ``ChannelLayerPresence/presenceLeave(_:connection:user:)``.
    public func presenceLeave(_ group: String, connection: String, user: String) async throws -> Bool {
        try ChannelNames.validateGroup(group)
        let reply = try await pipelined(
            shardIndex(for: group), Scripts.presenceLeave, keys: presenceKeys(group) + [presenceIndex],
            args: [.text(connection), .text(presenceUserField(user)), .text(group)])
        if let error = reply.errorMessage { throw ChannelLayerError.redisRefused(error, "presence leave") }
        return reply.countValue == 1
    }

    /// Renews connections' presence; see ``ChannelLayerPresence/presenceRefresh(_:connections:ttl:)``.
    public func presenceRefresh(_ group: String, connections: [PresenceConnection], ttl: Duration) async throws -> [PresenceConnection] {
        guard !connections.isEmpty else { return [] }
        var args: [RedisArgument] = [
            .text(String(Self.unixTime() + ttl.seconds)), .text(group), .integer(configuration.groupExpiry),
        ]
        args.reserveCapacity(3 + 3 * connections.count)
        for c in connections {
            args += [.text(c.connection), .text(presenceUserField(c.user)), presenceValue(user: c.user, meta: c.meta)]
        }
        let reply = try await pipelined(
            shardIndex(for: group), Scripts.presenceRefresh, keys: presenceKeys(group) + [presenceIndex], args: args)
        if let error = reply.errorMessage { throw ChannelLayerError.redisRefused(error, "presence refresh") }
        let back = Set((reply.array ?? []).compactMap(\.text))
        return connections.filter { back.contains($0.connection) }
    }

    /// Who is present; see ``ChannelLayerPresence/presenceList(_:)``.
    public func presenceList(_ group: String) async throws -> [PresenceMember] {
        try ChannelNames.validateGroup(group)
        let reply = try await pipelined(
            shardIndex(for: group), Scripts.presenceList, keys: presenceKeys(group), args: [.text(String(Self.unixTime()))])
        if let error = reply.errorMessage { throw ChannelLayerError(.backendError, "presence list: \(error)") }
        let items = reply.array ?? []
        var members: [String: PresenceMember] = [:]
        var index = 0
        while index + 1 < items.count {
            if let field = items[index].text, let (user, meta) = presenceMember(field: field, value: items[index + 1].bytes ?? []) {
                members[user, default: PresenceMember(user: user, connections: 0, meta: meta)].connections += 1
            }
            index += 2
        }
        return members.values.sorted { $0.user < $1.user }
    }

    /// Removes expired connections; see ``ChannelLayerPresence/presenceSweep()``.
    public func presenceSweep() async throws -> [PresenceDiff] {
        var diffs: [String: [String]] = [:]
        for shard in shards.indices {
            let reply = try await pipelined(
                shard, Scripts.presenceSweep, keys: [presenceIndex],
                args: [.text(configuration.prefix), .text(String(Self.unixTime())), .integer(configuration.groupExpiry)])
            if let error = reply.errorMessage { throw ChannelLayerError.redisRefused(error, "presence sweep") }
            let items = reply.array ?? []
            var index = 0
            // {group, user field, stored value} of each user whose last connection went.
            while index + 2 < items.count {
                if let group = items[index].text, let field = items[index + 1].text,
                    let (user, _) = presenceMember(field: field, value: items[index + 2].bytes ?? [])
                {
                    diffs[group, default: []].append(user)
                }
                index += 3
            }
        }
        return diffs.keys.sorted().map { PresenceDiff(group: $0, leaves: diffs[$0]!.sorted()) }
    }
}

extension Duration {
    /// The duration in seconds, as a Double.
    fileprivate var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}

extension Scripts {
    /// KEYS: connections, metas, expiry, users, the groups index. ARGV: connection, user, meta,
    /// expiry time, group, key expiry. 1 when the user was not present before.
    static let presenceJoin = LuaScript(
        name: "presenceJoin",
        source: """
            local old = redis.call('HGET', KEYS[1], ARGV[1])
            redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
            redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
            redis.call('ZADD', KEYS[5], ARGV[4], ARGV[5])
            if old ~= ARGV[2] then
                if old then
                    if redis.call('HINCRBY', KEYS[4], old, -1) <= 0 then redis.call('HDEL', KEYS[4], old) end
                end
                redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
                redis.call('HINCRBY', KEYS[4], ARGV[2], 1)
            end
            for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[6]) end
            -- This connection is the user's only one: it joined (a retry says so again).
            if tonumber(redis.call('HGET', KEYS[4], ARGV[2])) == 1 then return 1 end
            return 0
            """)

    /// KEYS: connections, metas, expiry, users, the groups index. ARGV: connection, user, group.
    /// 1 when the user has no connection left (a retry says so again); an emptied group leaves
    /// the index.
    static let presenceLeave = LuaScript(
        name: "presenceLeave",
        source: """
            local user = redis.call('HGET', KEYS[1], ARGV[1])
            if user then
                redis.call('HDEL', KEYS[1], ARGV[1])
                redis.call('HDEL', KEYS[2], ARGV[1])
                redis.call('ZREM', KEYS[3], ARGV[1])
                if redis.call('HINCRBY', KEYS[4], user, -1) <= 0 then redis.call('HDEL', KEYS[4], user) end
            end
            if redis.call('HLEN', KEYS[1]) == 0 then redis.call('ZREM', KEYS[5], ARGV[3]) end
            if redis.call('HEXISTS', KEYS[4], ARGV[2]) == 0 then return 1 end
            return 0
            """)

    /// KEYS: connections, metas, expiry, users, the groups index. ARGV: expiry time, group, key
    /// expiry, then connection, user, meta for each. Renews each; one that was swept is tracked
    /// again. The connections tracked again whose user was absent.
    static let presenceRefresh = LuaScript(
        name: "presenceRefresh",
        source: """
            local at = ARGV[1]
            local back = {}
            for i = 4, #ARGV, 3 do
                local c, user = ARGV[i], ARGV[i + 1]
                if redis.call('ZADD', KEYS[3], at, c) == 1 then
                    redis.call('HSET', KEYS[1], c, user)
                    redis.call('HSET', KEYS[2], c, ARGV[i + 2])
                    if redis.call('HINCRBY', KEYS[4], user, 1) == 1 then back[#back + 1] = c end
                end
            end
            redis.call('ZADD', KEYS[5], at, ARGV[2])
            for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
            return back
            """)

    /// KEYS: connections, metas, expiry, users. ARGV: now. {user, meta, user, meta, ...} of
    /// the connections not expired.
    static let presenceList = LuaScript(
        name: "presenceList",
        source: """
            local live = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[1], '+inf')
            local out = {}
            -- In slices: unpack() takes a few thousand values at most.
            for first = 1, #live, 500 do
                local last = math.min(first + 499, #live)
                local users = redis.call('HMGET', KEYS[1], unpack(live, first, last))
                local metas = redis.call('HMGET', KEYS[2], unpack(live, first, last))
                for i = 1, last - first + 1 do
                    if users[i] then
                        out[#out + 1] = users[i]
                        out[#out + 1] = metas[i] or '{}'
                    end
                end
            end
            return out
            """)

    /// KEYS: the groups index. ARGV: prefix, now, key expiry. Removes expired connections of
    /// every group; {group, user field, stored value, ...} for each user whose last connection went.
    static let presenceSweep = LuaScript(
        name: "presenceSweep",
        source: """
            local prefix, now = ARGV[1], ARGV[2]
            redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(now) - tonumber(ARGV[3]))
            local out = {}
            for _, group in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
                local conns, metas = prefix .. 'presence:' .. group, prefix .. 'presence-meta:' .. group
                local expiry, users = prefix .. 'presence-expiry:' .. group, prefix .. 'presence-users:' .. group
                for _, c in ipairs(redis.call('ZRANGEBYSCORE', expiry, '-inf', now)) do
                    local user = redis.call('HGET', conns, c)
                    local value = redis.call('HGET', metas, c) or ''
                    redis.call('HDEL', conns, c)
                    redis.call('HDEL', metas, c)
                    redis.call('ZREM', expiry, c)
                    if user and redis.call('HINCRBY', users, user, -1) <= 0 then
                        redis.call('HDEL', users, user)
                        out[#out + 1] = group
                        out[#out + 1] = user
                        out[#out + 1] = value
                    end
                end
                if redis.call('HLEN', conns) == 0 then redis.call('ZREM', KEYS[1], group) end
            end
            return out
            """)
}
