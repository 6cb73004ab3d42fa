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
/// - `<prefix>presence-version:<group>`: string, the version of the group's last presence change
///   (microseconds of Redis's clock, or one more than the last when that is not past it);
/// - `<prefix>presence-groups`: sorted set of groups with presence (per shard), for the sweep.
///
/// A connection past its expiry (its server stopped renewing it: it died) is removed by the
/// next sweep, which reports its user's leave (with a new version) when it was their last
/// connection; until then it is listed, so a list and the diffs after it always agree.
extension RedisChannelLayer: ChannelLayerPresence {
    private func presenceKeys(_ group: String) -> [RedisArgument] {
        let p = configuration.prefix
        return [
            .text(p + "presence:" + group), .text(p + "presence-meta:" + group), .text(p + "presence-expiry:" + group),
            .text(p + "presence-users:" + group), .text(p + "presence-version:" + group),
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

    /// Tracks a connection as present; see `ChannelLayerPresence/presenceJoin(_:connection:user:meta:ttl:)`.
    public func presenceJoin(_ group: String, connection: String, user: String, meta: String, ttl: Duration) async throws(ChannelLayerError)
        -> PresenceChange
    {
        return try await withLayerErrors {
            try ChannelNames.validateGroup(group)
            let reply = try await pipelined(
                shardIndex(for: group), Scripts.presenceJoin, keys: presenceKeys(group) + [presenceIndex],
                args: [
                    .text(connection), .text(presenceUserField(user)), presenceValue(user: user, meta: meta),
                    .text(String(Self.unixTime() + ttl.seconds)), .text(group),
                    .integer(configuration.groupExpirySeconds),
                ])
            if let error = reply.errorMessage { throw ChannelLayerError.redisRefused(error, "presence join") }
            return try Self.presenceChange(reply, "presence join")
        }
    }

    /// Stops tracking a connection; see `ChannelLayerPresence/presenceLeave(_:connection:user:)`.
    public func presenceLeave(_ group: String, connection: String, user: String) async throws(ChannelLayerError) -> PresenceChange {
        return try await withLayerErrors {
            try ChannelNames.validateGroup(group)
            let reply = try await pipelined(
                shardIndex(for: group), Scripts.presenceLeave, keys: presenceKeys(group) + [presenceIndex],
                args: [.text(connection), .text(presenceUserField(user)), .text(group), .integer(configuration.groupExpirySeconds)])
            if let error = reply.errorMessage { throw ChannelLayerError.redisRefused(error, "presence leave") }
            return try Self.presenceChange(reply, "presence leave")
        }
    }

    /// `{changed (0/1), version}` from a join or leave script.
    private static func presenceChange(_ reply: RedisReply, _ what: String) throws -> PresenceChange {
        guard let items = reply.array, items.count == 2, let changed = items[0].integer, let version = items[1].integer else {
            throw ChannelLayerError(.backendError, "\(what): an unexpected reply from the script")
        }
        return PresenceChange(changed: changed == 1, version: version)
    }

    /// Renews connections' presence; see `ChannelLayerPresence/presenceRefresh(_:connections:ttl:)`.
    public func presenceRefresh(_ group: String, connections: [PresenceConnection], ttl: Duration) async throws(ChannelLayerError)
        -> PresenceRenewal
    {
        return try await withLayerErrors {
            guard !connections.isEmpty else { return PresenceRenewal(back: [], version: 0) }
            var args: [RedisArgument] = [
                .text(String(Self.unixTime() + ttl.seconds)), .text(group), .integer(configuration.groupExpirySeconds),
            ]
            args.reserveCapacity(3 + 3 * connections.count)
            for c in connections {
                args += [.text(c.connection), .text(presenceUserField(c.user)), presenceValue(user: c.user, meta: c.meta)]
            }
            let reply = try await pipelined(
                shardIndex(for: group), Scripts.presenceRefresh, keys: presenceKeys(group) + [presenceIndex], args: args)
            if let error = reply.errorMessage { throw ChannelLayerError.redisRefused(error, "presence refresh") }
            // {version, connection tracked again, ...}
            let items = reply.array ?? []
            let back = Set(items.dropFirst().compactMap(\.text))
            return PresenceRenewal(
                back: connections.filter { back.contains($0.connection) }, version: items.first?.integer ?? 0)
        }
    }

    /// Who is present; see `ChannelLayerPresence/presenceSnapshot(_:)`.
    public func presenceSnapshot(_ group: String) async throws(ChannelLayerError) -> PresenceSnapshot {
        return try await withLayerErrors {
            try ChannelNames.validateGroup(group)
            let reply = try await pipelined(
                shardIndex(for: group), Scripts.presenceList, keys: presenceKeys(group),
                args: [.text(String(Self.unixTime() - PresenceSweepGrace.seconds))])
            if let error = reply.errorMessage { throw ChannelLayerError(.backendError, "presence list: \(error)") }
            // {version, user, meta, user, meta, ...}
            let items = reply.array ?? []
            var members: [String: PresenceMember] = [:]
            var index = 1
            while index + 1 < items.count {
                if let field = items[index].text, let (user, meta) = presenceMember(field: field, value: items[index + 1].bytes ?? []) {
                    members[user, default: PresenceMember(user: user, connections: 0, meta: meta)].connections += 1
                }
                index += 2
            }
            return PresenceSnapshot(members: members.values.sorted { $0.user < $1.user }, version: items.first?.integer ?? 0)
        }
    }

    /// Removes expired connections; see `ChannelLayerPresence/presenceSweep()`.
    public func presenceSweep() async throws(ChannelLayerError) -> [PresenceDiff] {
        return try await withLayerErrors {
            var diffs: [String: PresenceDiff] = [:]
            for shard in shards.indices {
                let reply = try await pipelined(
                    shard, Scripts.presenceSweep, keys: [presenceIndex],
                    args: [.text(configuration.prefix), .text(String(Self.unixTime())), .integer(configuration.groupExpirySeconds)])
                if let error = reply.errorMessage { throw ChannelLayerError.redisRefused(error, "presence sweep") }
                let items = reply.array ?? []
                var index = 0
                // {group, user field, stored value, version} of each user whose last connection went.
                while index + 3 < items.count {
                    if let group = items[index].text, let field = items[index + 1].text,
                        let (user, _) = presenceMember(field: field, value: items[index + 2].bytes ?? [])
                    {
                        diffs[group, default: PresenceDiff(group: group)].leaves.append(user)
                        diffs[group]!.versions[user] = max(diffs[group]!.versions[user] ?? 0, items[index + 3].integer ?? 0)
                    }
                    index += 4
                }
            }
            return diffs.keys.sorted().map { group in
                var diff = diffs[group]!
                diff.leaves.sort()
                return diff
            }
        }
    }
}

extension Duration {
    /// The duration in seconds, as a Double.
    fileprivate var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}

extension Scripts {
    /// `advance(key, expiry)`: sets a group's presence version to the next one and returns it:
    /// Redis's clock in microseconds, or one more than the last when the clock is not past it.
    /// (Written with `%.0f`: Lua's `tostring` rounds a number this large.)
    private static let presenceAdvance = """
        if redis.replicate_commands then redis.replicate_commands() end
        local function advance(key, expiry)
            local t = redis.call('TIME')
            local v = tonumber(t[1]) * 1000000 + tonumber(t[2])
            local last = tonumber(redis.call('GET', key) or '0')
            if v <= last then v = last + 1 end
            if tonumber(expiry) > 0 then
                redis.call('SET', key, string.format('%.0f', v), 'EX', expiry)
            else
                redis.call('SET', key, string.format('%.0f', v))
            end
            return v
        end

        """

    /// KEYS: connections, metas, expiry, users, version, the groups index. ARGV: connection,
    /// user, meta, expiry time, group, key expiry. {1 when the user was not present before, the
    /// group's new version}.
    static let presenceJoin = LuaScript(
        name: "presenceJoin",
        source: presenceAdvance + """
            local old = redis.call('HGET', KEYS[1], ARGV[1])
            redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
            redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
            redis.call('ZADD', KEYS[6], ARGV[4], ARGV[5])
            if old ~= ARGV[2] then
                if old then
                    if redis.call('HINCRBY', KEYS[4], old, -1) <= 0 then redis.call('HDEL', KEYS[4], old) end
                end
                redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
                redis.call('HINCRBY', KEYS[4], ARGV[2], 1)
            end
            for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[6]) end
            local version = advance(KEYS[5], ARGV[6])
            -- This connection is the user's only one: it joined (a retry says so again).
            if tonumber(redis.call('HGET', KEYS[4], ARGV[2])) == 1 then return {1, version} end
            return {0, version}
            """)

    /// KEYS: connections, metas, expiry, users, version, the groups index. ARGV: connection,
    /// user, group, key expiry. {1 when the user has no connection left (a retry says so
    /// again), the group's new version}; an emptied group leaves the index.
    static let presenceLeave = LuaScript(
        name: "presenceLeave",
        source: presenceAdvance + """
            local user = redis.call('HGET', KEYS[1], ARGV[1])
            if user then
                redis.call('HDEL', KEYS[1], ARGV[1])
                redis.call('HDEL', KEYS[2], ARGV[1])
                redis.call('ZREM', KEYS[3], ARGV[1])
                if redis.call('HINCRBY', KEYS[4], user, -1) <= 0 then redis.call('HDEL', KEYS[4], user) end
            end
            if redis.call('HLEN', KEYS[1]) == 0 then redis.call('ZREM', KEYS[6], ARGV[3]) end
            local version = advance(KEYS[5], ARGV[4])
            if redis.call('HEXISTS', KEYS[4], ARGV[2]) == 0 then return {1, version} end
            return {0, version}
            """)

    /// KEYS: connections, metas, expiry, users, version, the groups index. ARGV: expiry time,
    /// group, key expiry, then connection, user, meta for each. Renews each; one that was swept
    /// is tracked again. {the group's version (a new one when a user came back), the
    /// connections tracked again whose user was absent...}.
    static let presenceRefresh = LuaScript(
        name: "presenceRefresh",
        source: presenceAdvance + """
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
            redis.call('ZADD', KEYS[6], at, ARGV[2])
            for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
            local version
            if #back > 0 then
                version = advance(KEYS[5], ARGV[3])
            else
                version = tonumber(redis.call('GET', KEYS[5]) or '0')
                if version > 0 then redis.call('EXPIRE', KEYS[5], ARGV[3]) end
            end
            table.insert(back, 1, version)
            return back
            """)

    /// KEYS: connections, metas, expiry, users, version. ARGV: the oldest expiry listed. {the
    /// group's version, user, meta, user, meta, ...} of the tracked connections: one past its
    /// expiry stays until the sweep removes it (with a leave of a later version), so the list is
    /// the state at its version; one expired longer than ``PresenceSweepGrace`` ago (nobody
    /// sweeps: no interface server runs) is left out.
    static let presenceList = LuaScript(
        name: "presenceList",
        source: """
            local live = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[1], '+inf')
            local out = {tonumber(redis.call('GET', KEYS[5]) or '0')}
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
    /// every group; {group, user field, stored value, version, ...} for each user whose last
    /// connection went (one new version per group that lost connections).
    static let presenceSweep = LuaScript(
        name: "presenceSweep",
        source: presenceAdvance + """
            local prefix, now = ARGV[1], ARGV[2]
            redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(now) - tonumber(ARGV[3]))
            local out = {}
            for _, group in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
                local conns, metas = prefix .. 'presence:' .. group, prefix .. 'presence-meta:' .. group
                local expiry, users = prefix .. 'presence-expiry:' .. group, prefix .. 'presence-users:' .. group
                local gone = redis.call('ZRANGEBYSCORE', expiry, '-inf', now)
                local version = 0
                if #gone > 0 then version = advance(prefix .. 'presence-version:' .. group, ARGV[3]) end
                for _, c in ipairs(gone) do
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
                        out[#out + 1] = version
                    end
                end
                if redis.call('HLEN', conns) == 0 then redis.call('ZREM', KEYS[1], group) end
            end
            return out
            """)
}
