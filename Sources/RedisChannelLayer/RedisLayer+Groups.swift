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
    public func newChannel(_ pattern: String) async throws(ChannelLayerError) -> String {
        return try await withLayerErrors {
            try ChannelNames.validatePattern(pattern)
            while true {
                let name = pattern + ChannelNames.randomLetters(12)
                let reply = try await shared(shardIndex(for: name)).command(["EXISTS", .bytes(key(name))])
                if reply.integer == 0 { return name }
                if case .error = reply { throw unexpected(reply, doing: "EXISTS") }
            }
        }
    }

    /// Adds `channel` to `group` (a sorted-set member scored with the time, as asgi_redis does);
    /// a socket's membership is also recorded in its server's group journal (same round trip).
    public func groupAdd(_ group: String, channel: String) async throws(ChannelLayerError) {
        try await withLayerErrors {
            try ChannelNames.validateGroup(group)
            try ChannelNames.validateChannel(channel)
            let gkey = groupKey(group)
            let now = RedisArgument.text(String(Self.unixTime()))
            let expiry = configuration.groupExpirySeconds
            let commands: [[RedisArgument]] =
                [
                    ["ZADD", .bytes(gkey), now, .text(channel)],
                    ["EXPIRE", .bytes(gkey), .integer(expiry)],
                    ["DEL", .bytes(groupCacheKey(group))],
                ] + journalAdd(group, channel: channel, expiry: expiry)
            try await changeMembership(group, channel: channel, joined: true, commands: commands, doing: "group add")
        }
    }

    /// Removes `channel` from `group`.
    public func groupDiscard(_ group: String, channel: String) async throws(ChannelLayerError) {
        try await withLayerErrors {
            try ChannelNames.validateGroup(group)
            try ChannelNames.validateChannel(channel)
            let commands: [[RedisArgument]] =
                [["ZREM", .bytes(groupKey(group)), .text(channel)], ["DEL", .bytes(groupCacheKey(group))]]
                + journalDiscard(group, channel: channel)
            try await changeMembership(group, channel: channel, joined: false, commands: commands, doing: "group discard")
        }
    }

    /// The unexpired members of `group`.
    public func groupChannels(_ group: String) async throws(ChannelLayerError) -> [String] {
        return try await withLayerErrors {
            try ChannelNames.validateGroup(group)
            let cutoff = RedisArgument.text(String(Self.unixTime() - Double(configuration.groupExpirySeconds)))
            let reply = try await pipelined(
                shardIndex(for: group), Scripts.groupMembers, keys: [.bytes(groupKey(group)), .bytes(groupCacheKey(group))], args: [cutoff])
            guard case .array(let members) = reply else { throw unexpected(reply, doing: "group members") }
            return members.compactMap(\.text)
        }
    }

    /// Sends `message` to every member of `group`, one script per shard; members whose channel is
    /// full are skipped and counted (``groupMembersMissed``).
    public func sendGroup(_ group: String, message: Message) async throws(ChannelLayerError) {
        try await withLayerErrors {
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

            func args(mode: String, members: [String]) -> [RedisArgument] {
                groupSendArgs(mode: mode, plainBody: plainBody, localHead: localHead, members: members)
            }
            let globalKeys = groupSendGlobalKeys
            if let crypter {
                try await sendGroupSealed(group, message: message, crypter: crypter, globalKeys: globalKeys) {
                    args(mode: "bodies", members: [])
                }
                return
            }

            if shards.count == 1 {
                let scriptArgs = args(mode: "group", members: [])
                let keys: [RedisArgument] = [
                    .key(configuration.prefix, ":group:", group), globalKeys[0], globalKeys[1], .bytes(groupCacheKey(group)),
                ]
                let reply = try await pipelined(0, Scripts.sendMany, keys: keys, args: scriptArgs)
                try await settleGroupSend(reply, shard: 0, group: group, globalKeys: globalKeys)
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
                        try await self.settleGroupSend(reply, shard: index, group: group, globalKeys: globalKeys)
                    }
                }
                try await tasks.waitForAll()
            }
        }
    }

    /// The arguments of `Scripts.sendMany` (see there) for `mode`, the message's bodies and, in
    /// mode "list", the members.
    func groupSendArgs(mode: String, plainBody: [UInt8], localHead: [UInt8], members: [String]) -> [RedisArgument] {
        // 24 random hex digits: the script numbers the bodies it stores after them.
        var keyBase: [UInt8] = []
        keyBase.reserveCapacity(32)
        RandomToken.uuid4Hex(into: &keyBase)
        keyBase.removeLast(8)
        var out: [RedisArgument] = [
            .text(mode), .text(String(Self.unixTime() - Double(configuration.groupExpirySeconds))), .text(configuration.prefix),
            .text(configuration.statsPrefix), .integer(configuration.expirySeconds),
            .integer(RedisChannelLayerConfiguration.channelStatisticsExpiry),
            .integer(RedisChannelLayerConfiguration.globalStatisticsExpiry), .bytes(plainBody), .bytes(localHead), .bytes(keyBase),
            .integer(configuration.capacity),
        ]
        out.reserveCapacity(out.count + luaCapacityArgs.count + members.count + 1)
        out += luaCapacityArgs
        if mode == "group" { out.append(.integer(Self.groupCacheLongestLife)) }
        for member in members { out.append(.text(member)) }
        return out
    }

    /// The global counters a group send adds to: messages stored, sends refused as full.
    var groupSendGlobalKeys: [RedisArgument] {
        let stats = configuration.statsPrefix
        return [.key(stats, "#global#", ":messages_count"), .key(stats, "#global#", ":channel_full_count")]
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
                            ["MGET"] + local.keys.map { .bytes(self.statKey($0, "reader")) })
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
                    try await self.settleGroupSend(reply, shard: index, group: group, globalKeys: globalKeys)
                }
            }
            try await tasks.waitForAll()
        }
    }

    /// Counts what a group-send script reports: members reached, and members missed because
    /// their channel was full (logged: capacity is a promise the user can reason about).
    /// Counts a group send's script reply. Messages refused because a server's process channel
    /// was full (that server reads behind) are offered again with growing pauses for up to
    /// ``RedisChannelLayerConfiguration/groupFullWait``: the sender waits (backpressure back to
    /// whoever sends to it) instead of dropping a whole server's share of the group. What is
    /// still refused then is dropped, counted and logged, and its process channel is skipped
    /// without waiting for a while (a stuck server does not slow every group send down).
    func settleGroupSend(_ reply: RedisReply, shard: Int, group: String, globalKeys: [RedisArgument]) async throws {
        var (reached, missed, refused) = try parseGroupSend(reply)
        let clock = ContinuousClock()
        let deadline = clock.now + configuration.groupFullWait
        var backoff = Backoff(first: .milliseconds(2), cap: .milliseconds(50))
        while !refused.isEmpty {
            let now = clock.now
            let stalled = stalledProcessChannels.withLock { stalled in
                stalled = stalled.filter { $0.value > now }
                return stalled
            }
            let skipped = refused.filter { stalled[$0.list] != nil }
            refused.removeAll { stalled[$0.list] != nil }
            missed += skipped.reduce(0) { $0 + $1.count }
            if refused.isEmpty || now >= deadline || Task.isCancelled {
                if !refused.isEmpty {
                    let until = now + Self.stalledSkip
                    stalledProcessChannels.withLock { stalled in
                        for item in refused { stalled[item.list] = until }
                    }
                    logger.warning(
                        "a server's process channel stayed full for the whole group-full wait: dropping its share of group sends for a while",
                        metadata: ["channel": "\(refused[0].list)", "wait": "\(configuration.groupFullWait)"])
                }
                missed += refused.reduce(0) { $0 + $1.count }
                break
            }
            try? await Task.sleep(for: min(backoff.next(), deadline - now))
            groupSendsHeld.add(1, ordering: .relaxed)
            var args = groupRetryArgs()
            for item in refused { args += [.text(item.list), .bytes(item.body), .integer(item.count)] }
            let again = try await pipelined(shard, Scripts.sendMany, keys: [.bytes([])] + globalKeys, args: args)
            let parsed = try parseGroupSend(again)
            reached += parsed.reached
            refused = parsed.refused
        }
        membersReached.add(reached, ordering: .relaxed)
        LayerMetrics.groupMembersReached.increment(by: reached)
        if missed > 0 {
            membersMissed.add(missed, ordering: .relaxed)
            LayerMetrics.groupMembersMissed.increment(by: missed)
            logger.warning(
                "group send skipped members whose channel is full",
                metadata: ["group": "\(group)", "missed": "\(missed)", "reached": "\(reached)"])
        }
    }

    /// The longest a group's cached split of its members is used (seconds, Redis's clock)
    /// before a send reads the whole set again, whatever its fingerprint says.
    static let groupCacheLongestLife = 2

    /// How long a process channel that stayed full for a whole wait is skipped without waiting.
    static let stalledSkip = Duration.seconds(10)

    /// A group-send script reply: members reached and missed (plain channels that were full:
    /// dropped, as asgi_redis does), and the messages refused on process channels.
    private func parseGroupSend(
        _ reply: RedisReply
    ) throws(ChannelLayerError) -> (reached: Int, missed: Int, refused: [(list: String, body: [UInt8], count: Int)]) {
        guard case .array(let items) = reply, items.count >= 4, (items.count - 4) % 3 == 0 else {
            throw unexpected(reply, doing: "group send")
        }
        var refused: [(list: String, body: [UInt8], count: Int)] = []
        var missed = items[3].countValue
        for index in stride(from: 4, to: items.count, by: 3) {
            guard let list = items[index].text, let body = items[index + 1].bytes else {
                throw unexpected(reply, doing: "group send")
            }
            let count = items[index + 2].countValue
            refused.append((list, body, count))
            missed -= count
        }
        return (items[2].countValue, missed, refused)
    }

    /// The script's arguments for offering stored bodies again (mode "bodies"), with a key base
    /// of their own (the bodies are stored under new keys).
    private func groupRetryArgs() -> [RedisArgument] {
        var keyBase: [UInt8] = []
        keyBase.reserveCapacity(32)
        RandomToken.uuid4Hex(into: &keyBase)
        keyBase.removeLast(8)
        return [
            .text("bodies"), .text("0"), .text(configuration.prefix), .text(configuration.statsPrefix),
            .integer(configuration.expirySeconds), .integer(RedisChannelLayerConfiguration.channelStatisticsExpiry),
            .integer(RedisChannelLayerConfiguration.globalStatisticsExpiry),
            .bytes([]), .bytes([]), .bytes(keyBase), .integer(configuration.capacity),
        ] + luaCapacityArgs
    }

    /// Times a group send waited because a server's process channel was full and offered its
    /// share again.
    public var groupSendsHeldBack: Int { groupSendsHeld.load(ordering: .relaxed) }

    /// Group members this process's group sends have reached, and missed (channel full).
    public var groupMembersReached: Int { membersReached.load(ordering: .relaxed) }
    /// Group members a group send skipped because their channel was full.
    public var groupMembersMissed: Int { membersMissed.load(ordering: .relaxed) }

    /// The configured size limit.
    public var maxMessageSize: Int { configuration.maxMessageSize }

    /// `groups`, `flush` and `statistics`.
    public var extensions: Set<String> { standardLayerExtensions }

    static func unixTime() -> Double { WallClock.seconds }
}
