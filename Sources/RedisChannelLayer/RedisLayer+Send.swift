import ASGI
import DequeModule
import Logging
import NIOCore
import NIOPosix
import OrderedCollections
import Synchronization

/// Sending to one channel: one Lua script stores the body and appends it, checking capacity.
extension RedisChannelLayer {
    /// Queues `message` on `channel` (body key + list push in one script, as asgi_redis does);
    /// throws `channelFull` at capacity.
    public func send(_ message: Message, to channel: String) async throws(ChannelLayerError) {
        try await withLayerErrors {
            try ChannelNames.validateChannel(channel)
            guard message[asgiChannelKey] == nil else {
                throw ChannelLayerError(.invalidMessage, "messages must not contain the reserved key '\(asgiChannelKey)'")
            }
            let listName = ChannelNames.nonLocalName(channel)
            var stored = message
            if listName != channel { stored[asgiChannelKey] = .string(channel) }
            let body = seal(stored)
            guard body.count <= configuration.maxMessageSize else {
                throw ChannelLayerError.messageTooLarge(channel, size: body.count, limit: configuration.maxMessageSize)
            }
            let shard = sendShard(for: channel)
            let prefix = configuration.prefix, stats = configuration.statsPrefix
            let statsName = CapacityTable.statisticsName(listName)
            let keys: [RedisArgument] = [
                .uuidKey(prefix: prefix), .key(prefix, listName),
                .key(stats, statsName, ":messages_count"), .key(stats, "#global#", ":messages_count"),
                .key(stats, statsName, ":channel_full_count"), .key(stats, "#global#", ":channel_full_count"),
            ]
            let args: [RedisArgument] = [
                .bytes(body), .integer(configuration.expirySeconds), .integer(capacities.capacity(for: channel)),
                .integer(RedisChannelLayerConfiguration.channelStatisticsExpiry),
                .integer(RedisChannelLayerConfiguration.globalStatisticsExpiry),
            ]
            let bulk = body.count >= RedisChannelLayerConfiguration.bulkMessageSize
            let reply = try await pipelined(shard, Scripts.send, keys: keys, args: args, bulk: bulk)
            switch reply {
            case .integer(1): return
            case .integer(0): throw ChannelLayerError.channelFull(channel)
            default: throw unexpected(reply, doing: "send to '\(channel)'")
            }
        }
    }

    /// One script stores a run of messages.
    public var sendsManyAtOnce: Bool { true }

    /// How long a run's receipt is kept (seconds): longer than a server holds a message while
    /// Redis is unreachable (`--layer-outage-timeout`, 120 s by default).
    static let receiptExpiry = 600

    /// The most body bytes one run's script carries (more waits for the next run): a run of
    /// large messages does not hold Redis on one script for long.
    static let largestRunBytes = 256 * 1024

    /// Queues `messages` on `channel` in their order with one script (one round trip): as many
    /// as the channel has room for, the first ones, up to `largestRunBytes` of bodies. A
    /// message the layer refuses (too large, with the reserved key) ends the run before it:
    /// thrown when it is the first. With a `receipt`, a second call for the same run stores
    /// nothing again and returns what the first stored (the holder's last run is kept
    /// `receiptExpiry` seconds, under the prefix, `run:` and the holder).
    public func sendMany(_ messages: [Message], to channel: String, receipt: RunReceipt?) async throws(ChannelLayerError) -> Int {
        guard messages.count > 1 || receipt != nil else {
            guard let message = messages.first else { return 0 }
            try await send(message, to: channel)
            return 1
        }
        guard !messages.isEmpty else { return 0 }
        return try await withLayerErrors {
            try ChannelNames.validateChannel(channel)
            let listName = ChannelNames.nonLocalName(channel)
            var bodies: [[UInt8]] = []
            bodies.reserveCapacity(messages.count)
            var total = 0
            for message in messages {
                do {
                    guard message[asgiChannelKey] == nil else {
                        throw ChannelLayerError(.invalidMessage, "messages must not contain the reserved key '\(asgiChannelKey)'")
                    }
                    var stored = message
                    if listName != channel { stored[asgiChannelKey] = .string(channel) }
                    let body = seal(stored)
                    guard body.count <= configuration.maxMessageSize else {
                        throw ChannelLayerError.messageTooLarge(channel, size: body.count, limit: configuration.maxMessageSize)
                    }
                    if !bodies.isEmpty, total + body.count > Self.largestRunBytes { break }
                    bodies.append(body)
                    total += body.count
                } catch {
                    // The ones before it go; it is refused when its turn comes first.
                    if bodies.isEmpty { throw error }
                    break
                }
            }
            if bodies.count == 1, receipt == nil {
                try await send(messages[0], to: channel)
                return 1
            }
            let shard = sendShard(for: channel)
            let prefix = configuration.prefix, stats = configuration.statsPrefix
            let statsName = CapacityTable.statisticsName(listName)
            var keys: [RedisArgument] = [
                .key(prefix, listName),
                .key(stats, statsName, ":messages_count"), .key(stats, "#global#", ":messages_count"),
                .key(stats, statsName, ":channel_full_count"), .key(stats, "#global#", ":channel_full_count"),
                .key(prefix, "run:", receipt?.holder ?? "-"),
            ]
            var args: [RedisArgument] = [
                .integer(configuration.expirySeconds), .integer(capacities.capacity(for: channel)),
                .integer(RedisChannelLayerConfiguration.channelStatisticsExpiry),
                .integer(RedisChannelLayerConfiguration.globalStatisticsExpiry),
                .integer(receipt == nil ? 0 : Self.receiptExpiry), .integer(receipt?.number ?? 0),
            ]
            keys.reserveCapacity(keys.count + bodies.count)
            args.reserveCapacity(args.count + bodies.count)
            for body in bodies {
                keys.append(.uuidKey(prefix: prefix))
                args.append(.bytes(body))
            }
            let bulk = total >= RedisChannelLayerConfiguration.bulkMessageSize
            let reply = try await pipelined(shard, Scripts.sendRun, keys: keys, args: args, bulk: bulk)
            switch reply {
            case .integer(let stored) where stored > 0 && stored <= bodies.count: return Int(stored)
            case .integer(0): throw ChannelLayerError.channelFull(channel)
            default: throw unexpected(reply, doing: "send \(bodies.count) messages to '\(channel)'")
            }
        }
    }

    func unexpected(_ reply: RedisReply, doing what: String) -> ChannelLayerError {
        if case .error(let e) = reply {
            return ChannelLayerError.redisRefused(e, "Redis refused \(what)")
        }
        return ChannelLayerError(.backendError, "unexpected Redis reply to \(what): \(reply)")
    }
}
