import ASGI
import Logging
import Synchronization

/// A server's registration as a reader of bundled group sends, and how a registration found
/// gone is read: Redis lost its data (restarted empty, flushed: the server closes its sockets
/// with 1012 so that clients reconnect and recover), or only some keys were evicted under
/// `maxmemory` (the server registers again and its group keeper puts memberships back; no
/// socket is closed).
extension RedisChannelLayer {
    /// What tells a Redis that evicted keys from one that lost its data: its run id (new at every
    /// start), its count of evicted keys, and how many `FLUSHALL` / `FLUSHDB` it ran (a flush
    /// while it also evicts, for this database or another, is still a loss).
    struct RedisLife: Sendable, Equatable {
        var runID: String
        var evictedKeys: Int64
        var flushes: Int64 = 0
    }

    /// The registration is a key that lives as long as a group member does (`group_expiry`),
    /// so one that is gone while its reader keeps renewing it means Redis lost its data, unless
    /// the birth mark (a key written once per Redis data set) is still the one seen before, or
    /// it is new but this same Redis (same run id) evicted keys since the last registration.
    public func registerBundleReader(_ processChannel: String) async throws(ChannelLayerError) -> Bool {
        return try await withLayerErrors {
            try ChannelNames.validateChannel(processChannel, for: .receive)
            guard ChannelNames.isProcessSpecific(processChannel) else {
                throw ChannelLayerError(.invalidName, "'\(processChannel)' is not a process channel (it must end in '!')")
            }
            let shard = shardIndex(for: processChannel)
            let reply = try await pipelined(
                shard, Scripts.registerReader,
                keys: [.bytes(statKey(processChannel, "reader")), .bytes(key("born"))],
                args: [
                    "bundles", .integer(configuration.groupExpirySeconds), .text(RandomToken.string(20, from: RandomToken.alphanumerics)),
                ])
            guard let parts = reply.array, parts.count == 2, let existed = parts[0].integer, let mark = parts[1].bytes else {
                throw unexpected(reply, doing: "register a reader")
            }
            // After the script: an eviction up to its run is counted in what this reads.
            let life = await redisLife(shard)
            let previousLife = redisLives.withLock { lives -> RedisLife? in
                defer { if let life { lives[shard] = life } }
                return lives[shard]
            }
            let first = registeredReaders.withLock { $0.insert(processChannel).inserted }
            let known = birthMarks.withLock { marks -> [UInt8]? in
                defer { marks[shard] = mark }
                return marks[shard]
            }
            if first || existed == 1 { return true }
            if known == mark {
                // Only the registration is gone (evicted at maxmemory, say): the data is there.
                logger.warning(
                    "this server's reader registration vanished while the Redis kept its data (evicted?): registered again",
                    metadata: ["reply_channel": "\(processChannel)"])
                return true
            }
            if let life, let previousLife, life.runID == previousLife.runID, life.evictedKeys > previousLife.evictedKeys,
                life.flushes == previousLife.flushes
            {
                // The birth mark went with the registration, but this Redis did not restart and it
                // evicted keys meanwhile: an eviction, not a lost data set.
                logger.warning(
                    "this server's reader registration and the layer's birth mark were evicted (Redis evicted keys under maxmemory; it did not restart): registered again, sockets kept open",
                    metadata: [
                        "reply_channel": "\(processChannel)", "evicted_keys": "\(life.evictedKeys - previousLife.evictedKeys)",
                    ])
                return true
            }
            return false
        }
    }

    /// The shard's run id, evicted-key count and flushes (`INFO server`, `stats`, `commandstats`);
    /// nil when Redis does not say (a managed Redis that renamed `INFO`): then a new birth mark
    /// counts as a loss.
    func redisLife(_ shard: Int) async -> RedisLife? {
        guard
            let replies = try? await shared(shard).pipeline([
                ["INFO", "server"], ["INFO", "stats"], ["INFO", "commandstats"],
            ]),
            replies.count == 3, let server = replies[0].text, let stats = replies[1].text, let commands = replies[2].text,
            let runID = Self.infoField("run_id", in: server),
            let evicted = Self.infoField("evicted_keys", in: stats).flatMap({ Int64($0) })
        else { return nil }
        // `cmdstat_flushall:calls=2,usec=…`; absent when it never ran.
        let flushes = ["cmdstat_flushall", "cmdstat_flushdb"].reduce(Int64(0)) { total, name in
            let calls = Self.infoField(name, in: commands)?.split(separator: ",").first { $0.hasPrefix("calls=") }
            return total + (calls.flatMap { Int64($0.dropFirst("calls=".count)) } ?? 0)
        }
        return RedisLife(runID: runID, evictedKeys: evicted, flushes: flushes)
    }

    /// The value of `name` in an `INFO` reply (`name:value` lines).
    static func infoField(_ name: String, in info: String) -> String? {
        for line in info.split(whereSeparator: \.isNewline) where line.hasPrefix(name + ":") {
            return String(line.dropFirst(name.count + 1))
        }
        return nil
    }
}
