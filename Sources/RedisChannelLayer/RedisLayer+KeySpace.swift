import ASGI
import DequeModule
import Logging
import NIOCore
import NIOPosix
import OrderedCollections
import Synchronization

/// Where things live: key names in asgi_redis 1.4's layout, and which shard of the ring
/// holds a channel or a group.
extension RedisChannelLayer {
    func key(_ name: String) -> [UInt8] { Array((configuration.prefix + name).utf8) }
    func groupKey(_ group: String) -> [UInt8] { Array((configuration.prefix + ":group:" + group).utf8) }
    /// The group's cached split of its members for group sends (see `Scripts.sendMany`):
    /// deleted by every change this layer makes to the group.
    func groupCacheKey(_ group: String) -> [UInt8] { Array((configuration.prefix + ":groupcache:" + group).utf8) }
    func statKey(_ name: String, _ stat: String) -> [UInt8] {
        Array((configuration.statsPrefix + name + ":" + stat).utf8)
    }

    func shardIndex(for name: String) -> Int {
        Sharding.shard(name, hostCount: shards.count)
    }

    /// `!` and `?` names live on the shard of their (non-local) name; plain ones anywhere.
    func sendShard(for channel: String) -> Int {
        if shards.count == 1 { return 0 }
        if ChannelNames.isProcessSpecific(channel) || ChannelNames.isSingleReader(channel) {
            return shardIndex(for: ChannelNames.nonLocalName(channel))
        }
        return sendCursor.wrappingAdd(1, ordering: .relaxed).oldValue % shards.count
    }
}
