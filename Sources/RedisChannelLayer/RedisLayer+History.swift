import ASGI
import Foundation
import Logging

/// Group histories in Redis, for recovery after a reconnect:
///
/// - `<prefix>history:<group>`: a stream, one entry per message, id `<offset>-1`, fields `b`
///   (the message as stored: msgpack, encrypted when keys are set) and `t` (Unix time, seconds);
///   trimmed with `MAXLEN ~ size`, and expiring `ttl` after its last append.
/// - `<prefix>history-meta:<group>`: a hash, `epoch` and `offset` (the last offset given),
///   kept `groupExpiry` after the last use. When it is gone (a Redis restarted empty, a flush),
///   the next use starts a new epoch.
///
/// Both live on the group's shard; `redis-cli XRANGE <prefix>history:<group> - +` shows them.
extension RedisChannelLayer: ChannelLayerHistory {
    /// Appends to the group's history; see `ChannelLayerHistory/historyAppend(_:message:retention:)`.
    public func historyAppend(_ group: String, message: Message, retention: HistoryRetention) async throws(ChannelLayerError)
        -> StreamPosition
    {
        return try await withLayerErrors {
            try ChannelNames.validateGroup(group)
            let body = seal(message)
            guard body.count + 64 <= configuration.maxMessageSize else {
                throw ChannelLayerError.messageTooLarge("history:" + group, size: body.count, limit: configuration.maxMessageSize)
            }
            // Tried again while Redis is unreachable (a restart), under one id: an append that
            // ran before its reply was lost returns the position it took instead of a second one.
            let id = ChannelNames.randomLetters(16)
            let candidate = PublicationText.newEpoch()
            let reply = try await retrying(for: Self.appendRetry, when: { $0.code == .connectionLost }) {
                try await pipelined(
                    shardIndex(for: group), Scripts.historyAppend,
                    keys: [
                        .text(configuration.prefix + "history-meta:" + group), .text(configuration.prefix + "history:" + group),
                        .text(configuration.prefix + "history-ids:" + group),
                    ],
                    args: [
                        .text(candidate), .bytes(body), .integer(retention.size),
                        .integer(max(1, Int(retention.ttl.components.seconds))), .integer(configuration.groupExpirySeconds),
                        .text(String(Self.unixTime())), .text(id),
                    ])
            }
            if let error = reply.errorMessage { throw ChannelLayerError.redisRefused(error, "history append") }
            guard let items = reply.array, items.count == 2, let epoch = items[1].text else {
                throw ChannelLayerError(.backendError, "history append: an unexpected reply")
            }
            return StreamPosition(offset: UInt64(max(0, items[0].countValue)), epoch: epoch)
        }
    }

    /// How long an append is tried again while Redis is unreachable.
    static let appendRetry = Duration.seconds(10)

    /// Appends a publication and sends it to the group's members in one script
    /// (`Scripts.publishMany`); see `ChannelLayerHistory/historyPublish(_:data:retention:)`. Nil
    /// on a sharded layer (the history and the members' channels may live on other servers)
    /// and an encrypted one (Redis cannot make the members' sealed bodies).
    public func historyPublish(_ group: String, data: String, retention: HistoryRetention) async throws(ChannelLayerError)
        -> StreamPosition?
    {
        guard shards.count == 1, crypter == nil else { return nil }
        return try await withLayerErrors {
            try ChannelNames.validateGroup(group)
            let entry = seal(["data": .string(data)])
            guard entry.count + 64 <= configuration.maxMessageSize else {
                throw ChannelLayerError.messageTooLarge("history:" + group, size: entry.count, limit: configuration.maxMessageSize)
            }
            let tail = PublicationText.tail(data: data)
            // The message the script makes: the text (its head is under 80 bytes) and the
            // publication's group, offset and epoch, in under 60 bytes of msgpack around them.
            let size = tail.utf8.count + group.utf8.count + 140
            guard size + 140 <= configuration.maxMessageSize else {
                throw ChannelLayerError.messageTooLarge("group:" + group, size: size, limit: configuration.maxMessageSize)
            }
            return try await publish(group, entry: entry, tail: tail, retention: retention, id: ChannelNames.randomLetters(16))
        }
    }

    /// One publication under `id` (a retry of the same publication uses the same id), tried
    /// again while Redis is unreachable.
    func publish(_ group: String, entry: [UInt8], tail: String, retention: HistoryRetention, id: String) async throws -> StreamPosition {
        let globalKeys = groupSendGlobalKeys
        let keys: [RedisArgument] = [
            .bytes(groupKey(group)), globalKeys[0], globalKeys[1], .bytes(groupCacheKey(group)),
            .text(configuration.prefix + "history-meta:" + group), .text(configuration.prefix + "history:" + group),
            .text(configuration.prefix + "history-ids:" + group),
        ]
        let candidate = PublicationText.newEpoch()
        let reply = try await retrying(for: Self.appendRetry, when: { $0.code == .connectionLost }) {
            // Made for each try: a fresh key base for the bodies, the time now.
            var args = groupSendArgs(mode: "group", plainBody: [], localHead: [], members: [])
            args += [
                .text(candidate), .bytes(entry), .integer(retention.size), .integer(max(1, Int(retention.ttl.components.seconds))),
                .integer(configuration.groupExpirySeconds), .text(String(Self.unixTime())), .text(id), .text(tail), .text(group),
            ]
            return try await pipelined(0, Scripts.publishMany, keys: keys, args: args)
        }
        if let error = reply.errorMessage { throw ChannelLayerError.redisRefused(error, "group publish") }
        guard let items = reply.array, items.count >= 6, let epoch = items[1].text else {
            throw ChannelLayerError(.backendError, "group publish: an unexpected reply")
        }
        let position = StreamPosition(offset: UInt64(max(0, items[0].countValue)), epoch: epoch)
        try await settleGroupSend(.array(Array(items.dropFirst(2))), shard: 0, group: group, globalKeys: globalKeys)
        return position
    }

    /// Reads the group's history after a position; see `ChannelLayerHistory/historyRead(_:after:retention:)`.
    public func historyRead(_ group: String, after position: StreamPosition?, retention: HistoryRetention) async throws(ChannelLayerError)
        -> HistorySlice
    {
        return try await withLayerErrors {
            try ChannelNames.validateGroup(group)
            let reply = try await pipelined(
                shardIndex(for: group), Scripts.historyRead,
                keys: [.text(configuration.prefix + "history-meta:" + group), .text(configuration.prefix + "history:" + group)],
                args: [
                    .text(PublicationText.newEpoch()), .integer(configuration.groupExpirySeconds),
                    .text(position.map { String(min($0.offset, UInt64(Int64.max) - 1) + 1) } ?? "-1"), .integer(retention.size),
                ])
            if let error = reply.errorMessage { throw ChannelLayerError.redisRefused(error, "history read") }
            guard let items = reply.array, items.count == 3, let epoch = items[1].text else {
                throw ChannelLayerError(.backendError, "history read: an unexpected reply")
            }
            let top = StreamPosition(offset: UInt64(max(0, items[0].countValue)), epoch: epoch)
            guard let position, position.epoch == epoch else {
                return HistorySlice(entries: [], top: top, complete: position == nil)
            }
            let oldest = Self.unixTime() - Double(retention.ttl.components.seconds)
            var entries: [(offset: UInt64, message: Message)] = []
            var unreadable = false
            for entry in items[2].array ?? [] {
                // [id, [field, value, ...]]
                guard let parts = entry.array, parts.count == 2, let id = parts[0].text,
                    let offset = UInt64(id.split(separator: "-").first ?? ""), let fields = parts[1].array
                else { continue }
                var body: [UInt8]?
                var time = 0.0
                var index = 0
                while index + 1 < fields.count {
                    switch fields[index].text {
                    case "b": body = fields[index + 1].bytes
                    case "t": time = Double(fields[index + 1].text ?? "") ?? 0
                    default: break
                    }
                    index += 2
                }
                // Past its time: gone, as if trimmed (the reader hears the gap).
                guard time >= oldest, let body else { continue }
                do {
                    entries.append((offset, try open(body)))
                } catch {
                    unreadable = true
                    logger.warning(
                        "a history entry does not decode; skipped",
                        metadata: ["group": "\(group)", "offset": "\(offset)", "error": "\(error)"])
                }
            }
            let complete = !unreadable && HistorySlice.isComplete(after: position, top: top, firstOffset: entries.first?.offset)
            return HistorySlice(entries: entries, top: top, complete: complete)
        }
    }

    /// A stored body back to a message (decrypted when keys are set).
    private func open(_ body: [UInt8]) throws -> Message {
        var body = body
        if let crypter { body = try crypter.decrypt(body, ttl: nil) }
        return try decoder.decodeMessage(body)
    }

    /// Puts back missing followers; see `ChannelLayerHistory/groupRestore(_:channels:)`.
    public func groupRestore(_ group: String, channels: [String]) async throws(ChannelLayerError) -> [String] {
        return try await withLayerErrors {
            try ChannelNames.validateGroup(group)
            guard !channels.isEmpty else { return [] }
            var args: [RedisArgument] = [.text(String(Self.unixTime())), .integer(configuration.groupExpirySeconds)]
            args += channels.map { .text($0) }
            let reply = try await pipelined(
                shardIndex(for: group), Scripts.groupRestore, keys: [.bytes(groupKey(group)), .bytes(groupCacheKey(group))], args: args)
            if let error = reply.errorMessage { throw ChannelLayerError.redisRefused(error, "group restore") }
            return (reply.array ?? []).compactMap(\.text)
        }
    }

    /// Removes channels from a group; see `ChannelLayerHistory/groupRemove(_:channels:)`.
    public func groupRemove(_ group: String, channels: [String]) async throws(ChannelLayerError) {
        try await withLayerErrors {
            try ChannelNames.validateGroup(group)
            guard !channels.isEmpty else { return }
            let replies = try await shared(shardIndex(for: group)).pipeline([
                ["ZREM", .bytes(groupKey(group))] + channels.map(RedisArgument.text), ["DEL", .bytes(groupCacheKey(group))],
            ])
            if let bad = replies.first(where: { $0.errorMessage != nil }) { throw unexpected(bad, doing: "group remove") }
        }
    }
}

extension Scripts {
    /// KEYS: the group set, its send cache. ARGV: now, group expiry, then the channels. Adds (scored now) each
    /// channel that is not a member, refreshes the set's expiry when it added any; the
    /// channels added.
    static let groupRestore = LuaScript(
        name: "groupRestore",
        source: """
            local added = {}
            for i = 3, #ARGV do
                if redis.call('ZADD', KEYS[1], 'NX', ARGV[1], ARGV[i]) == 1 then added[#added + 1] = ARGV[i] end
            end
            if #added > 0 then
                redis.call('EXPIRE', KEYS[1], ARGV[2])
                redis.call('DEL', KEYS[2])
            end
            return added
            """)

    /// Both history scripts start here: the history's epoch, or (none: new, or lost with a
    /// Redis that restarted empty) a new one from ARGV[1], with an empty stream.
    static let historyEpoch = """
        local epoch = redis.call('HGET', KEYS[1], 'epoch')
        if not epoch then
            epoch = ARGV[1]
            redis.call('DEL', KEYS[2])
            redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
        end
        """

    /// KEYS: meta, stream, ids. ARGV: candidate epoch, body, size, ttl, meta expiry, now, the
    /// append's id. An id already appended in this epoch (its reply was lost) returns the offset
    /// it took; the newest 256 ids are kept.
    static let historyAppend = LuaScript(
        name: "historyAppend",
        source: """
            \(historyEpoch)
            local id = epoch .. ':' .. ARGV[7]
            local known = redis.call('ZSCORE', KEYS[3], id)
            if known then return {tonumber(known), epoch} end
            local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
            redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], offset .. '-1', 'b', ARGV[2], 't', ARGV[6])
            redis.call('EXPIRE', KEYS[2], ARGV[4])
            redis.call('EXPIRE', KEYS[1], ARGV[5])
            redis.call('ZADD', KEYS[3], offset, id)
            redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -257)
            redis.call('EXPIRE', KEYS[3], ARGV[4])
            return {offset, epoch}
            """)

    /// KEYS: meta, stream. ARGV: candidate epoch, meta expiry, first offset wanted (-1: none),
    /// count. Returns {top offset, epoch, entries}.
    static let historyRead = LuaScript(
        name: "historyRead",
        source: """
            \(historyEpoch)
            redis.call('EXPIRE', KEYS[1], ARGV[2])
            local top = tonumber(redis.call('HGET', KEYS[1], 'offset'))
            local entries = {}
            local first = tonumber(ARGV[3])
            if first >= 0 and first <= top then
                -- The newest `size` at most (MAXLEN ~ may have kept more than the retention).
                first = math.max(first, top - tonumber(ARGV[4]) + 1)
                entries = redis.call('XRANGE', KEYS[2], first .. '-0', '+', 'COUNT', ARGV[4])
            end
            return {top, epoch, entries}
            """)
}
