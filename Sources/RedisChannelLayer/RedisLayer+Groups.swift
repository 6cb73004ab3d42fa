import ASGI
import CoreMetrics
import DequeModule
import Logging
import NIOCore
import NIOPosix
import OrderedCollections
import Synchronization

/// Groups (sorted sets scored by the time of the last add), group sends (bundled per
/// registered process channel) and the registration of bundle readers.
extension RedisChannelLayer {
    /// A new unique channel name for `pattern`, on this process's shard for `!` names.
    public func newChannel(_ pattern: String) async throws -> String {
        try ChannelNames.validatePattern(pattern)
        while true {
            let name = pattern + ChannelNames.randomLetters(12)
            let reply = try await shared(shardIndex(for: name)).command([Array("EXISTS".utf8), key(name)])
            if reply.integer == 0 { return name }
            if case .error = reply { throw unexpected(reply, doing: "EXISTS") }
        }
    }

    /// Adds `channel` to `group` (a sorted-set member scored with the time, as asgi_redis does);
    /// a socket's membership is also recorded in its server's group journal (same round trip).
    public func groupAdd(_ group: String, channel: String) async throws {
        try ChannelNames.validateGroup(group)
        try ChannelNames.validateChannel(channel)
        let gkey = groupKey(group)
        let now = Array(String(Self.unixTime()).utf8)
        let expiry = Array(String(configuration.groupExpiry).utf8)
        let replies = try await shared(shardIndex(for: group)).pipeline(
            [
                [Array("ZADD".utf8), gkey, now, Array(channel.utf8)],
                [Array("EXPIRE".utf8), gkey, expiry],
            ] + journalAdd(group, channel: channel, expiry: expiry))
        if let bad = replies.first(where: { $0.errorMessage != nil }) { throw unexpected(bad, doing: "group add") }
    }

    /// Removes `channel` from `group`.
    public func groupDiscard(_ group: String, channel: String) async throws {
        try ChannelNames.validateGroup(group)
        try ChannelNames.validateChannel(channel)
        let replies = try await shared(shardIndex(for: group)).pipeline(
            [[Array("ZREM".utf8), groupKey(group), Array(channel.utf8)]] + journalDiscard(group, channel: channel))
        if let bad = replies.first(where: { $0.errorMessage != nil }) { throw unexpected(bad, doing: "group discard") }
    }

    /// The unexpired members of `group`.
    public func groupChannels(_ group: String) async throws -> [String] {
        try ChannelNames.validateGroup(group)
        let cutoff = Array(String(Self.unixTime() - Double(configuration.groupExpiry)).utf8)
        let reply = try await pipelined(shardIndex(for: group), Scripts.groupMembers, keys: [groupKey(group)], args: [cutoff])
        guard case .array(let members) = reply else { throw unexpected(reply, doing: "group members") }
        return members.compactMap(\.text)
    }

    /// Sends `message` to every member of `group`, one script per shard; members whose channel is
    /// full are skipped and counted (``groupMembersMissed``).
    public func sendGroup(_ group: String, message: Message) async throws {
        try ChannelNames.validateGroup(group)
        guard message[asgiChannelKey] == nil else {
            throw ChannelLayerError(.invalidMessage, "messages must not contain the reserved key '\(asgiChannelKey)'")
        }
        let plainBody = MsgPackEncoder.encode(message)
        guard plainBody.count + 140 <= configuration.maxMessageSize else {
            throw ChannelLayerError.messageTooLarge("group:" + group, size: plainBody.count, limit: configuration.maxMessageSize)
        }
        // The body for `!` members: the same map with one more entry, whose value (the
        // member's full name) the script appends.
        var localHead: [UInt8] = []
        MsgPackEncoder.writeMapHeader(count: message.count + 1, into: &localHead)
        for (k, v) in message.fields {
            MsgPackEncoder.writeString(k, into: &localHead)
            MsgPackEncoder.write(v, into: &localHead)
        }
        MsgPackEncoder.writeString(asgiChannelKey, into: &localHead)

        let cutoff = String(Self.unixTime() - Double(configuration.groupExpiry))
        func args(mode: String, members: [String]) -> [RedisArgument] {
            // 24 random hex digits: the script numbers the bodies it stores after them.
            var keyBase: [UInt8] = []
            keyBase.reserveCapacity(32)
            RandomToken.uuid4Hex(into: &keyBase)
            keyBase.removeLast(8)
            var out: [RedisArgument] = [
                .text(mode), .text(cutoff), .text(configuration.prefix), .text(configuration.statsPrefix),
                .integer(configuration.expiry), .integer(RedisChannelLayerConfiguration.channelStatisticsExpiry),
                .integer(RedisChannelLayerConfiguration.globalStatisticsExpiry),
                .bytes(plainBody), .bytes(localHead), .bytes(keyBase), .integer(configuration.capacity),
            ]
            out.reserveCapacity(out.count + luaCapacityArgs.count + members.count)
            out += luaCapacityArgs
            for member in members { out.append(.text(member)) }
            return out
        }
        let stats = configuration.statsPrefix
        let globalKeys: [RedisArgument] = [
            .joined3(stats, "#global#", ":messages_count"), .joined3(stats, "#global#", ":channel_full_count"),
        ]
        if let crypter {
            try await sendGroupSealed(group, message: message, crypter: crypter, globalKeys: globalKeys) {
                args(mode: "bodies", members: [])
            }
            return
        }

        if shards.count == 1 {
            let scriptArgs = args(mode: "group", members: [])
            let keys: [RedisArgument] = [.joined3(configuration.prefix, ":group:", group), globalKeys[0], globalKeys[1]]
            let reply = try await pipelined(0, Scripts.sendMany, keys: keys, args: scriptArgs)
            try countGroupSend(reply, group: group)
            return
        }
        // Sharded: members from the group's shard, then one script per destination shard.
        let members = try await groupChannels(group)
        var byShard: [Int: [String]] = [:]
        for member in members { byShard[sendShard(for: member), default: []].append(member) }
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            for (index, names) in byShard {
                let scriptArgs = args(mode: "list", members: names)
                tasks.addTask {
                    let reply = try await self.pipelined(index, Scripts.sendMany, keys: [.bytes([])] + globalKeys, args: scriptArgs)
                    try self.countGroupSend(reply, group: group)
                }
            }
            try await tasks.waitForAll()
        }
    }

    /// A group send on an encrypted layer: Redis cannot build the members' bodies, so they are
    /// made (and encrypted) here: one body for every plain member, one per process channel whose
    /// reader reads bundles, one per member for the others; then one script per shard stores them.
    func sendGroupSealed(
        _ group: String, message: Message, crypter: MultiFernet, globalKeys: [RedisArgument],
        makeArgs: () -> [RedisArgument]
    ) async throws {
        let members = try await groupChannels(group)
        var byShard: [Int: [String]] = [:]
        for member in members { byShard[sendShard(for: member), default: []].append(member) }
        var baseArgs: [Int: [RedisArgument]] = [:]
        for index in byShard.keys { baseArgs[index] = makeArgs() }
        let plainBody = crypter.encrypt(MsgPackEncoder.encode(message))
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            for (index, names) in byShard {
                let base = baseArgs[index] ?? []
                tasks.addTask {
                    // Process channels on this shard, in first-seen order, with their members.
                    var local: OrderedDictionary<String, [String]> = [:]
                    var triples: [String] = []
                    var bodies: [[UInt8]] = []
                    var counts: [Int] = []
                    var plainMembers: [String] = []
                    for name in names {
                        if let bang = name.firstIndex(of: "!") {
                            local[String(name[...bang]), default: []].append(name)
                        } else {
                            plainMembers.append(name)
                        }
                    }
                    var forms: [String?] = []
                    if !local.isEmpty {
                        let reply = try await self.shared(index).command(
                            [Array("MGET".utf8)] + local.keys.map { self.statKey($0, "reader") })
                        forms = (reply.array ?? []).map(\.text)
                    }
                    for name in plainMembers {
                        triples.append(name)
                        bodies.append(plainBody)
                        counts.append(1)
                    }
                    for (offset, entry) in local.enumerated() {
                        let bundles = offset < forms.count && forms[offset] == "bundles"
                        if bundles {
                            var sealed = message
                            sealed[asgiChannelKey] = .array(entry.value.map { .string($0) })
                            triples.append(entry.key)
                            bodies.append(self.seal(sealed))
                            counts.append(entry.value.count)
                        } else {
                            for member in entry.value {
                                var sealed = message
                                sealed[asgiChannelKey] = .string(member)
                                triples.append(entry.key)
                                bodies.append(self.seal(sealed))
                                counts.append(1)
                            }
                        }
                    }
                    var scriptArgs = base
                    for i in triples.indices {
                        scriptArgs.append(.text(triples[i]))
                        scriptArgs.append(.bytes(bodies[i]))
                        scriptArgs.append(.integer(counts[i]))
                    }
                    let reply = try await self.pipelined(index, Scripts.sendMany, keys: [.bytes([])] + globalKeys, args: scriptArgs)
                    try self.countGroupSend(reply, group: group)
                }
            }
            try await tasks.waitForAll()
        }
    }

    /// Counts what a group-send script reports: members reached, and members missed because
    /// their channel was full (logged: capacity is a promise the user can reason about).
    func countGroupSend(_ reply: RedisReply, group: String) throws(ChannelLayerError) {
        guard case .array(let counts) = reply, counts.count == 4 else { throw unexpected(reply, doing: "group send") }
        membersReached.add(counts[2].countValue, ordering: .relaxed)
        LayerMetrics.groupMembersReached.increment(by: counts[2].countValue)
        let missed = counts[3].countValue
        if missed > 0 {
            membersMissed.add(missed, ordering: .relaxed)
            LayerMetrics.groupMembersMissed.increment(by: missed)
            logger.warning(
                "group send skipped members whose channel is full",
                metadata: [
                    "group": "\(group)", "missed": "\(missed)", "reached": "\(counts[2].countValue)",
                ])
        }
    }

    /// Group members this process's group sends have reached, and missed (channel full).
    public var groupMembersReached: Int { membersReached.load(ordering: .relaxed) }
    /// Group members a group send skipped because their channel was full.
    public var groupMembersMissed: Int { membersMissed.load(ordering: .relaxed) }

    /// The configured size limit.
    public var maxMessageSize: Int { configuration.maxMessageSize }

    static func unixTime() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
