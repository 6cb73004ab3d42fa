import ASGI
import DequeModule
import Logging
import NIOCore
import NIOPosix
import OrderedCollections
import Synchronization

/// Flush, statistics and the inspection operators' tools use (SCAN, never KEYS).
extension RedisChannelLayer {
    /// Deletes every key under this layer's prefix on every shard, with `SCAN`.
    public func flush() async throws(ChannelLayerError) {
        try await withLayerErrors {
            let patterns = [Self.globEscape(configuration.prefix) + "*", Self.globEscape(configuration.statsPrefix) + "*"]
            for index in shards.indices {
                let connection = try await shared(index)
                for pattern in patterns {
                    try await scan(connection, matching: pattern) { keys in
                        _ = try await connection.command(["UNLINK"] + keys.map(RedisArgument.bytes))
                    }
                }
            }
        }
    }

    /// Walks every key matching `pattern` (and of Redis `type`, when given) with `SCAN`, handing
    /// each non-empty batch to `body`. A reply that is not a SCAN reply throws: a walk never
    /// stops early and silently.
    func scan(
        _ connection: RedisConnection, matching pattern: String, type: String? = nil, _ body: ([[UInt8]]) async throws -> Void
    ) async throws {
        var cursor = "0"
        repeat {
            var command: [RedisArgument] = ["SCAN", .text(cursor), "MATCH", .text(pattern), "COUNT", 1000]
            if let type { command += ["TYPE", .text(type)] }
            let reply = try await connection.command(command)
            guard case .array(let parts) = reply, parts.count == 2, let next = parts[0].text, case .array(let found) = parts[1] else {
                throw unexpected(reply, doing: "SCAN")
            }
            let keys = found.compactMap(\.bytes)
            if !keys.isEmpty { try await body(keys) }
            cursor = next
        } while cursor != "0"
    }

    static func globEscape(_ text: String) -> String {
        var out = ""
        for c in text {
            if "*?[]\\".contains(c) { out.append("\\") }
            out.append(c)
        }
        return out
    }

    /// Messages sent and full refusals, summed over the shards.
    public func globalStatistics() async throws(ChannelLayerError) -> GlobalStatistics {
        return try await withLayerErrors {
            var total = GlobalStatistics(malformedMessagesDropped: malformedDropped.load(ordering: .relaxed))
            let keys = [statKey("#global#", "messages_count"), statKey("#global#", "channel_full_count")]
            for index in shards.indices {
                let reply = try await shared(index).command(["MGET"] + keys.map(RedisArgument.bytes))
                guard case .array(let values) = reply, values.count == 2 else { throw unexpected(reply, doing: "MGET") }
                total.messagesCount += values[0].countValue
                total.channelFullCount += values[1].countValue
            }
            return total
        }
    }

    /// How many messages wait on each of `channels`: one pipelined `LLEN` per channel on each
    /// shard that may hold it, a round trip per shard.
    public func pendingCounts(_ channels: [String]) async throws(ChannelLayerError) -> [Int] {
        return try await withLayerErrors {
            var byShard: [Int: [(position: Int, key: [UInt8])]] = [:]
            for (position, channel) in channels.enumerated() {
                try ChannelNames.validateChannel(channel, for: .receive)
                let name = ChannelNames.nonLocalName(channel)
                let indices =
                    ChannelNames.isProcessSpecific(channel) || ChannelNames.isSingleReader(channel)
                    ? [shardIndex(for: name)] : Array(shards.indices)
                for index in indices { byShard[index, default: []].append((position, key(name))) }
            }
            var counts = Array(repeating: 0, count: channels.count)
            for (index, keys) in byShard.sorted(by: { $0.key < $1.key }) where !keys.isEmpty {
                let replies = try await shared(index).pipeline(keys.map { ["LLEN", .bytes($0.key)] })
                for (entry, reply) in zip(keys, replies) { counts[entry.position] += reply.countValue }
            }
            return counts
        }
    }

    /// One channel's figures: sent, full refusals, pending, the oldest message's age.
    public func channelStatistics(_ channel: String) async throws(ChannelLayerError) -> ChannelStatistics {
        return try await withLayerErrors {
            try ChannelNames.validateChannel(channel, for: .receive)
            let name = ChannelNames.nonLocalName(channel)
            let indices =
                ChannelNames.isProcessSpecific(channel) || ChannelNames.isSingleReader(channel)
                ? [shardIndex(for: name)] : Array(shards.indices)
            let listKey = key(name)
            let counterKeys = [statKey(name, "messages_count"), statKey(name, "channel_full_count")]
            let expiry = configuration.expirySeconds
            var stats = ChannelStatistics()
            for index in indices {
                let connection = try await shared(index)
                var replies = try await connection.pipeline([
                    ["MGET"] + counterKeys.map(RedisArgument.bytes),
                    ["LLEN", .bytes(listKey)],
                    ["LINDEX", .bytes(listKey), 0],
                ])
                if let oldest = replies[2].bytes {
                    replies.append(try await connection.command(["PTTL", .bytes(oldest)]))
                } else {
                    replies.append(.integer(-2))
                }
                if case .array(let counters) = replies[0], counters.count == 2 {
                    stats.messagesCount += counters[0].countValue
                    stats.channelFullCount += counters[1].countValue
                }
                stats.messagesPending += replies[1].countValue
                if let pttl = replies[3].integer, pttl >= 0 {
                    stats.messagesMaxAge = max(stats.messagesMaxAge, Double(expiry) - Double(pttl) / 1000)
                }
            }
            return stats
        }
    }

    /// What each server of the ring does at `maxmemory`, as warnings for the start-up log: a
    /// policy that may evict the layer's keys (anything but `noeviction`, with a `maxmemory` set)
    /// lets group memberships, sessions and a server's registration vanish without a word. A
    /// server that does not answer `CONFIG GET` (managed services rename it) is passed over.
    public func evictionWarnings() async -> [String] {
        var warnings: [String] = []
        for index in shards.indices {
            guard let connection = try? await shared(index),
                let reply = try? await connection.command(["CONFIG", "GET", "maxmemory*"]), case .array(let pairs) = reply
            else { continue }
            var settings: [String: String] = [:]
            for pair in stride(from: 0, to: pairs.count - 1, by: 2) {
                if let name = pairs[pair].bytes, let value = pairs[pair + 1].bytes {
                    settings[String(decoding: name, as: UTF8.self)] = String(decoding: value, as: UTF8.self)
                }
            }
            guard let limit = settings["maxmemory"].flatMap(Int.init), limit > 0, let policy = settings["maxmemory-policy"],
                policy != "noeviction"
            else { continue }
            warnings.append(
                "Redis at \(configuration.hosts[index]) evicts keys when it reaches maxmemory (\(limit) bytes, policy \(policy)): "
                    + "group memberships, sessions and a server's registration can vanish without a word. "
                    + "Set maxmemory-policy noeviction: writes are then refused as out_of_memory (counted, retried) instead.")
        }
        return warnings
    }

    /// The servers of the ring, without credentials.
    public var location: String { configuration.hosts.map(\.description).joined(separator: ",") }

    /// Channels (list names) with waiting messages, found with SCAN, for operators.
    public func pendingChannels() async throws(ChannelLayerError) -> [String] {
        return try await withLayerErrors {
            // Lists in hand show as `<channel>:inhand` (what a reader moved and did not take).
            try await scanNames(under: configuration.prefix, type: "list").filter { !$0.hasPrefix(":group:") }
        }
    }

    /// Groups that have members, found with SCAN, for operators.
    public func groups() async throws(ChannelLayerError) -> [String] {
        return try await withLayerErrors {
            try await scanNames(under: configuration.prefix + ":group:", type: "zset")
        }
    }

    /// Names of keys of one Redis type under a prefix, on every shard, prefix removed.
    func scanNames(under prefix: String, type: String) async throws -> [String] {
        let pattern = Self.globEscape(prefix) + "*"
        let prefixCount = prefix.utf8.count
        var names = Set<String>()
        for index in shards.indices {
            let connection = try await shared(index)
            try await scan(connection, matching: pattern, type: type) { keys in
                names.formUnion(keys.map { String(decoding: $0.dropFirst(prefixCount), as: UTF8.self) })
            }
        }
        return names.sorted()
    }
}
