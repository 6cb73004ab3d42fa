import ASGI
import DequeModule
import Logging
import NIOCore
import NIOPosix
import OrderedCollections
import Synchronization

/// The Redis channel layer, byte-compatible with Python's asgi_redis 1.4.
///
/// Channels are Redis lists of body keys, bodies are msgpack strings with an expiry, groups
/// are sorted sets scored by the time of the last add. I/O is non-blocking on SwiftNIO event
/// loops, with hiredis parsing the replies: every ordinary command and script of every task
/// shares one pipelined connection per server, and only receives that wait in `BLPOP` hold
/// a connection of their own.
public final class RedisChannelLayer: ChannelLayerInspection {
    public let configuration: RedisChannelLayerConfiguration
    private let logger: Logger
    private let shards: [RedisConnections]
    private let capacities: CapacityTable
    private let luaCapacityArgs: [[UInt8]]
    private let sendCursor = Atomic<Int>(0)
    private let receiveCursor = Atomic<Int>(0)
    /// Whether the last receive found a message waiting (see `receive`).
    private let flowing = Atomic<Bool>(false)
    private let malformedDropped = Atomic<Int>(0)
    private let membersReached = Atomic<Int>(0)
    private let membersMissed = Atomic<Int>(0)
    private let isClosed = Atomic<Bool>(false)
    private let decoder = MsgPackDecoder()
    /// Members of bundled group messages not yet handed out, by list (non-local) name: a
    /// bundle is popped once from Redis and given out one member at a time, in order, before
    /// anything popped after it. Only the one reader of a process channel ever holds these.
    private let backlog = Mutex<[String: Deque<ReceivedMessage>]>([:])
    /// Process channels this layer has registered a reader for.
    private let registeredReaders = Mutex<Set<String>>([])

    /// - Parameter eventLoopGroup: where the connections live; NIO's shared group by default.
    public init(configuration: RedisChannelLayerConfiguration, logger: Logger = Logger(label: "channels.redis"),
                eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) throws(ChannelLayerError) {
        guard !configuration.hosts.isEmpty else {
            throw ChannelLayerError(.invalidConfiguration, "the Redis layer needs at least one host")
        }
        self.configuration = configuration
        self.logger = logger
        self.shards = configuration.hosts.map {
            RedisConnections(endpoint: $0, group: eventLoopGroup, connectTimeout: configuration.connectTimeout,
                             commandTimeout: configuration.commandTimeout)
        }
        self.capacities = CapacityTable(defaultCapacity: configuration.capacity,
                                        patterns: configuration.channelCapacities)
        var capacityArgs: [[UInt8]] = [Array(String(configuration.channelCapacities.count).utf8)]
        for (glob, capacity) in configuration.channelCapacities {
            capacityArgs.append(Array(GlobPatternLua.luaPattern(glob).utf8))
            capacityArgs.append(Array(String(capacity).utf8))
        }
        self.luaCapacityArgs = capacityArgs
    }

    /// A layer on the servers of these `redis://` URLs.
    public convenience init(urls: [String], logger: Logger = Logger(label: "channels.redis")) throws(ChannelLayerError) {
        try self.init(configuration: RedisChannelLayerConfiguration(urls: urls), logger: logger)
    }

    deinit {
        for shard in shards { shard.close() }
    }

    // MARK: Connections

    private func checkOpen() throws(ChannelLayerError) {
        if isClosed.load(ordering: .relaxed) { throw ChannelLayerError(.closed, "the Redis layer is closed") }
    }

    /// The shard's shared, pipelined connection.
    private func shared(_ shard: Int) async throws(ChannelLayerError) -> RedisConnection {
        try checkOpen()
        return try await shards[shard].shared()
    }

    /// A script call on the shard's shared connection.
    private func pipelined(_ shard: Int, _ script: LuaScript, keys: [[UInt8]], args: [[UInt8]]) async throws -> RedisReply {
        try await script.run(on: shared(shard), keys: keys, args: args)
    }

    /// A blocking command (and what follows it) on a connection of its own.
    private func onDedicated<T>(_ shard: Int, _ body: (RedisConnection) async throws -> T) async throws -> T {
        try checkOpen()
        return try await shards[shard].withDedicated(body)
    }

    // MARK: Keys

    private func key(_ name: String) -> [UInt8] { Array((configuration.prefix + name).utf8) }
    private func groupKey(_ group: String) -> [UInt8] { Array((configuration.prefix + ":group:" + group).utf8) }
    private func statKey(_ name: String, _ stat: String) -> [UInt8] {
        Array((configuration.statsPrefix + name + ":" + stat).utf8)
    }

    /// `prefix` + 32 lowercase hex characters of a random version-4 UUID, as Python writes it.
    private func newBodyKey() -> [UInt8] {
        var out = Array(configuration.prefix.utf8)
        RandomToken.uuid4Hex(into: &out)
        return out
    }

    private func shardIndex(for name: String) -> Int {
        Sharding.shard(name, hostCount: shards.count)
    }

    /// `!` and `?` names live on the shard of their (non-local) name; plain ones anywhere.
    private func sendShard(for channel: String) -> Int {
        if shards.count == 1 { return 0 }
        if ChannelNames.isProcessSpecific(channel) || ChannelNames.isSingleReader(channel) {
            return shardIndex(for: ChannelNames.nonLocalName(channel))
        }
        return sendCursor.wrappingAdd(1, ordering: .relaxed).oldValue % shards.count
    }

    // MARK: Send

    public func send(_ message: Message, to channel: String) async throws {
        try ChannelNames.validateChannel(channel)
        guard message[asgiChannelKey] == nil else {
            throw ChannelLayerError(.invalidMessage, "messages must not contain the reserved key '\(asgiChannelKey)'")
        }
        let listName = ChannelNames.nonLocalName(channel)
        var stored = message
        if listName != channel { stored[asgiChannelKey] = .string(channel) }
        let body = MsgPackEncoder.encode(stored)
        guard body.count <= configuration.maxMessageSize else {
            throw ChannelLayerError.messageTooLarge(channel, size: body.count, limit: configuration.maxMessageSize)
        }
        let shard = sendShard(for: channel)
        let keys = [
            newBodyKey(), key(listName),
            statKey(listName, "messages_count"), statKey("#global#", "messages_count"),
            statKey(listName, "channel_full_count"), statKey("#global#", "channel_full_count"),
        ]
        let args: [[UInt8]] = [
            body, Array(String(configuration.expiry).utf8), Array(String(capacities.capacity(for: channel)).utf8),
            Array(String(RedisChannelLayerConfiguration.channelStatisticsExpiry).utf8),
            Array(String(RedisChannelLayerConfiguration.globalStatisticsExpiry).utf8),
        ]
        let reply = try await pipelined(shard, Scripts.send, keys: keys, args: args)
        switch reply {
        case .integer(1): return
        case .integer(0): throw ChannelLayerError.channelFull(channel)
        default: throw unexpected(reply, doing: "send to '\(channel)'")
        }
    }

    private func unexpected(_ reply: RedisReply, doing what: String) -> ChannelLayerError {
        if case .error(let e) = reply {
            return ChannelLayerError(.backendError, "Redis refused \(what): \(e)")
        }
        return ChannelLayerError(.backendError, "unexpected Redis reply to \(what): \(reply)")
    }

    // MARK: Receive

    public func receive(channels: [String], timeout: Duration) async throws -> ReceivedMessage? {
        for channel in channels { try ChannelNames.validateChannel(channel, for: .receive) }
        guard !channels.isEmpty else { return nil }
        if let waiting = fromBacklog(channels, max: 1).first { return waiting }
        let plan = receivePlan(channels)
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        // While messages are flowing (the last receive found one), first a non-blocking look:
        // one script, shared with concurrent calls through the automatic pipeline, so a busy
        // channel costs one shared round trip per message. An idle layer goes straight to
        // BLPOP + take-body: two round trips. Non-blocking receives are always one script.
        if timeout <= .zero || plan.count > 1 || flowing.load(ordering: .relaxed) {
            while true {
                var sawMalformed = false
                for (shard, lists) in plan.shuffled() {
                    let reply = try await pipelined(shard, Scripts.receive, keys: lists.shuffled(), args: [])
                    guard case .array(let pair) = reply, pair.count == 2,
                          let list = pair[0].bytes, let body = pair[1].bytes else {
                        if case .error = reply { throw unexpected(reply, doing: "receive") }
                        continue
                    }
                    if let received = handOut(decodeReceived(list: list, body: body), max: 1).first {
                        flowing.store(true, ordering: .relaxed)
                        return received
                    }
                    sawMalformed = true
                }
                if sawMalformed { continue }
                flowing.store(false, ordering: .relaxed)
                if timeout <= .zero { return nil }
                break
            }
        }
        var poppedUnusable = false
        while true {
            let remaining = deadline - clock.now
            if remaining <= .milliseconds(1) || Task.isCancelled {
                // Skipping bad bodies may have used up the time while good ones wait behind
                // them: one last look without blocking.
                return poppedUnusable ? try await receive(channels: channels, timeout: .zero) : nil
            }
            let slice = min(remaining, configuration.blockingSlice)
            let outcome: ReceivedMessage?? = if plan.count == 1 {
                try await blockingPop(shard: plan[0].shard, lists: plan[0].lists, wait: slice)
            } else {
                try await blockingPopMany(plan: plan, wait: slice)
            }
            switch outcome {
            case .some(.some(let received)):
                flowing.store(true, ordering: .relaxed)
                return received
            case .some(.none): poppedUnusable = true // an expired or malformed body: try again
            case .none: poppedUnusable = false // the slice passed with nothing
            }
        }
    }

    /// Like `receive`, but takes up to `max` messages in one round trip when they are waiting:
    /// while messages flow, one pipelined script pops a batch; an idle reader waits in BLPOP and
    /// the script that takes the popped body also takes what queued behind it.
    public func receiveBatch(channels: [String], max: Int, timeout: Duration) async throws -> [ReceivedMessage] {
        for channel in channels { try ChannelNames.validateChannel(channel, for: .receive) }
        let waiting = fromBacklog(channels, max: max)
        if !waiting.isEmpty { return waiting }
        let plan = receivePlan(channels)
        guard max > 1, plan.count == 1 else {
            guard let one = try await receive(channels: channels, timeout: timeout) else { return [] }
            return [one]
        }
        let (shard, lists) = plan[0]
        let limit = Array(String(max).utf8)
        if timeout <= .zero || flowing.load(ordering: .relaxed) {
            let reply = try await pipelined(shard, Scripts.receiveMany, keys: lists, args: [limit])
            if case .error = reply { throw unexpected(reply, doing: "receive") }
            let batch = handOut(decodePairs(reply.array ?? [], from: 0), max: max)
            if !batch.isEmpty {
                flowing.store(true, ordering: .relaxed)
                return batch
            }
            flowing.store(false, ordering: .relaxed)
            if timeout <= .zero { return [] }
        }
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        while true {
            let remaining = deadline - clock.now
            if remaining <= .milliseconds(1) || Task.isCancelled { return [] }
            let slice = min(remaining, configuration.blockingSlice)
            let timeoutArg = Array(String(format3(slice.seconds)).utf8)
            let more = Array(String(max - 1).utf8)
            let result: ([UInt8], RedisReply)? = try await onDedicated(shard) { connection -> ([UInt8], RedisReply)? in
                let reply = try await connection.command([Array("BLPOP".utf8)] + lists.shuffled() + [timeoutArg], wait: slice)
                switch reply {
                case .array(let pair) where pair.count == 2:
                    guard let list = pair[0].bytes, let bodyKey = pair[1].bytes else { return nil }
                    return (list, try await take(Scripts.takeBodyAndMore, on: connection, shard: shard, keys: [bodyKey, list], args: [more]))
                case .error(let e):
                    throw ChannelLayerError(.backendError, "Redis refused BLPOP: \(e)")
                default:
                    return nil
                }
            }
            guard let (list, reply) = result, let items = reply.array, !items.isEmpty else { continue }
            var popped: [ReceivedMessage] = []
            if let body = items[0].bytes { popped = decodeReceived(list: list, body: body) }
            popped += decodePairs(items, from: 1)
            let batch = handOut(popped, max: max)
            if !batch.isEmpty {
                flowing.store(true, ordering: .relaxed)
                return batch
            }
        }
    }

    /// Decodes `{list, body, list, body, ...}` from `start`, dropping (and counting) bad bodies.
    private func decodePairs(_ items: [RedisReply], from start: Int) -> [ReceivedMessage] {
        var out: [ReceivedMessage] = []
        var index = start
        while index + 1 < items.count {
            if let list = items[index].bytes, let body = items[index + 1].bytes {
                out += decodeReceived(list: list, body: body)
            }
            index += 2
        }
        return out
    }

    /// Returns the first `max` of `popped` and keeps the rest (members of a bundle) for the
    /// next receives of their channel.
    private func handOut(_ popped: [ReceivedMessage], max: Int) -> [ReceivedMessage] {
        guard popped.count > max else { return popped }
        backlog.withLock { backlog in
            for received in popped[max...] {
                backlog[ChannelNames.nonLocalName(received.channel), default: []].append(received)
            }
        }
        return Array(popped[..<max])
    }

    /// Up to `max` messages kept from earlier bundles for any of `channels`.
    private func fromBacklog(_ channels: [String], max: Int) -> [ReceivedMessage] {
        backlog.withLock { backlog -> [ReceivedMessage] in
            guard !backlog.isEmpty else { return [] }
            var out: [ReceivedMessage] = []
            for channel in channels where out.count < max {
                guard var queue = backlog[channel] else { continue }
                while out.count < max, let next = queue.popFirst() { out.append(next) }
                backlog[channel] = queue.isEmpty ? nil : queue
            }
            return out
        }
    }

    /// Lists to read per shard: `!`/`?` channels on their shard, plain ones on the next
    /// shard in rotation (they are sent round-robin, so any shard may hold them).
    private func receivePlan(_ channels: [String]) -> [(shard: Int, lists: [[UInt8]])] {
        if shards.count == 1 { return [(0, channels.map(key))] }
        var byShard: [Int: [[UInt8]]] = [:]
        let rotating = receiveCursor.wrappingAdd(1, ordering: .relaxed).oldValue % shards.count
        for channel in channels {
            let index = ChannelNames.isProcessSpecific(channel) || ChannelNames.isSingleReader(channel)
                ? shardIndex(for: channel) : rotating
            byShard[index, default: []].append(key(channel))
        }
        return byShard.map { ($0.key, $0.value) }
    }

    /// nil: nothing arrived in `wait`. .some(nil): something was popped but unusable.
    private func blockingPop(shard: Int, lists: [[UInt8]], wait: Duration) async throws -> ReceivedMessage?? {
        let timeoutArg = Array(String(format3(wait.seconds)).utf8)
        let result: ([UInt8], [UInt8]?)? = try await onDedicated(shard) { connection -> ([UInt8], [UInt8]?)? in
            let reply = try await connection.command([Array("BLPOP".utf8)] + lists.shuffled() + [timeoutArg], wait: wait)
            switch reply {
            case .null: return nil
            case .array(let pair) where pair.count == 2:
                guard let list = pair[0].bytes, let bodyKey = pair[1].bytes else { return nil }
                let body = try await take(Scripts.takeBody, on: connection, shard: shard, keys: [bodyKey], args: [])
                return (list, body.bytes)
            case .error(let e):
                throw ChannelLayerError(.backendError, "Redis refused BLPOP: \(e)")
            default:
                return nil
            }
        }
        guard let (list, body) = result else { return nil }
        guard let body else { return .some(nil) }
        return .some(handOut(decodeReceived(list: list, body: body), max: 1).first)
    }

    /// Takes the body a `BLPOP` popped. The key is already off its list, so if the connection
    /// dies now (a Redis restart), the body is still in Redis under its key: it is taken
    /// through a fresh connection, for a while, instead of being left to expire unseen.
    private func take(_ script: LuaScript, on connection: RedisConnection, shard: Int,
                      keys: [[UInt8]], args: [[UInt8]]) async throws -> RedisReply {
        let first: Result<RedisReply, ChannelLayerError>
        do {
            first = .success(try await script.run(on: connection, keys: keys, args: args))
        } catch {
            first = .failure(error)
        }
        switch first {
        case .success(let reply):
            return reply
        case .failure(let error) where error.code != .connectionLost:
            throw error
        case .failure(let error):
            logger.warning("the connection died after a pop; taking the message through a new one", metadata: ["error": "\(error)"])
            return try await retrying(for: configuration.commandTimeout * 2, when: { $0.code == .connectionLost }) {
                try await pipelined(shard, script, keys: keys, args: args)
            }
        }
    }

    /// Several shards: wait on all at once; a message won by more than one is put back.
    private func blockingPopMany(plan: [(shard: Int, lists: [[UInt8]])], wait: Duration) async throws -> ReceivedMessage?? {
        try await withThrowingTaskGroup(of: ReceivedMessage??.self) { group in
            for entry in plan {
                group.addTask { try await self.blockingPop(shard: entry.shard, lists: entry.lists, wait: wait) }
            }
            var winner: ReceivedMessage?? = nil
            for try await outcome in group {
                guard case .some(.some(let received)) = outcome else {
                    if winner == nil, case .some(.none) = outcome { winner = .some(nil) }
                    continue
                }
                if case .some(.some) = winner {
                    // Rare: two shards delivered in the same slice. Keep the message by
                    // sending it again; it goes to the back of its channel.
                    try? await send(received.message, to: received.channel)
                } else {
                    winner = .some(received)
                }
            }
            return winner
        }
    }

    private func format3(_ seconds: Double) -> String {
        let millis = max(1, Int((seconds * 1000).rounded()))
        let whole = millis / 1000, frac = millis % 1000
        return "\(whole)." + (frac < 10 ? "00" : frac < 100 ? "0" : "") + "\(frac)"
    }

    /// Decodes a popped body: one message, or one per member for a bundled group message
    /// (`__asgi_channel__` holding a list of names). A body that is not a valid message is
    /// logged, counted and dropped.
    private func decodeReceived(list: [UInt8], body: [UInt8]) -> [ReceivedMessage] {
        let listName = String(decoding: list.dropFirst(configuration.prefix.utf8.count), as: UTF8.self)
        do {
            var message = try decoder.decodeMessage(body)
            switch message.removeValue(forKey: asgiChannelKey) {
            case nil:
                return [ReceivedMessage(channel: listName, message: message)]
            case .string(let name)?:
                return [ReceivedMessage(channel: name, message: message)]
            case .array(let names)?:
                var out: [ReceivedMessage] = []
                out.reserveCapacity(names.count)
                for name in names {
                    guard case .string(let member) = name, member.hasPrefix(listName) else {
                        throw MsgPackError(.notAMap, offset: 0, detail: "a bundle names '\(name)', not a channel of '\(listName)'")
                    }
                    out.append(ReceivedMessage(channel: member, message: message))
                }
                return out
            case let other?:
                throw MsgPackError(.notAMap, offset: 0, detail: "'\(asgiChannelKey)' is \(other.typeName), not a string")
            }
        } catch {
            malformedDropped.add(1, ordering: .relaxed)
            logger.warning("dropped a message that is not valid msgpack", metadata: [
                "channel": "\(listName)", "bytes": "\(body.count)", "error": "\(error)",
            ])
            return []
        }
    }

    // MARK: Channels and groups

    public func newChannel(_ pattern: String) async throws -> String {
        try ChannelNames.validatePattern(pattern)
        while true {
            let name = pattern + ChannelNames.randomLetters(12)
            let reply = try await shared(shardIndex(for: name)).command([Array("EXISTS".utf8), key(name)])
            if reply.integer == 0 { return name }
            if case .error = reply { throw unexpected(reply, doing: "EXISTS") }
        }
    }

    public func groupAdd(_ group: String, channel: String) async throws {
        try ChannelNames.validateGroup(group)
        try ChannelNames.validateChannel(channel)
        let gkey = groupKey(group)
        let now = Array(String(Self.unixTime()).utf8)
        let expiry = Array(String(configuration.groupExpiry).utf8)
        let replies = try await shared(shardIndex(for: group)).pipeline([
            [Array("ZADD".utf8), gkey, now, Array(channel.utf8)],
            [Array("EXPIRE".utf8), gkey, expiry],
        ])
        if let bad = replies.first(where: { $0.errorMessage != nil }) { throw unexpected(bad, doing: "group add") }
    }

    public func groupDiscard(_ group: String, channel: String) async throws {
        try ChannelNames.validateGroup(group)
        try ChannelNames.validateChannel(channel)
        let reply = try await shared(shardIndex(for: group)).command([Array("ZREM".utf8), groupKey(group), Array(channel.utf8)])
        if reply.errorMessage != nil { throw unexpected(reply, doing: "group discard") }
    }

    public func groupChannels(_ group: String) async throws -> [String] {
        try ChannelNames.validateGroup(group)
        let cutoff = Array(String(Self.unixTime() - Double(configuration.groupExpiry)).utf8)
        let reply = try await pipelined(shardIndex(for: group), Scripts.groupMembers, keys: [groupKey(group)], args: [cutoff])
        guard case .array(let members) = reply else { throw unexpected(reply, doing: "group members") }
        return members.compactMap(\.text)
    }

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

        let cutoff = Array(String(Self.unixTime() - Double(configuration.groupExpiry)).utf8)
        func args(mode: String, members: [String]) -> [[UInt8]] {
            var keyBase = newBodyKey()
            keyBase.removeFirst(configuration.prefix.utf8.count)
            keyBase.removeLast(8)
            return [
                Array(mode.utf8), cutoff, Array(configuration.prefix.utf8), Array(configuration.statsPrefix.utf8),
                Array(String(configuration.expiry).utf8),
                Array(String(RedisChannelLayerConfiguration.channelStatisticsExpiry).utf8),
                Array(String(RedisChannelLayerConfiguration.globalStatisticsExpiry).utf8),
                plainBody, localHead, keyBase, Array(String(configuration.capacity).utf8),
            ] + luaCapacityArgs + members.map { Array($0.utf8) }
        }
        let globalKeys = [statKey("#global#", "messages_count"), statKey("#global#", "channel_full_count")]

        if shards.count == 1 {
            let scriptArgs = args(mode: "group", members: [])
            let reply = try await pipelined(0, Scripts.sendMany, keys: [groupKey(group)] + globalKeys, args: scriptArgs)
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
                    let reply = try await self.pipelined(index, Scripts.sendMany, keys: [[]] + globalKeys, args: scriptArgs)
                    try self.countGroupSend(reply, group: group)
                }
            }
            try await tasks.waitForAll()
        }
    }

    /// Counts what a group-send script reports: members reached, and members missed because
    /// their channel was full (logged: capacity is a promise the user can reason about).
    private func countGroupSend(_ reply: RedisReply, group: String) throws(ChannelLayerError) {
        guard case .array(let counts) = reply, counts.count == 4 else { throw unexpected(reply, doing: "group send") }
        membersReached.add(counts[2].countValue, ordering: .relaxed)
        let missed = counts[3].countValue
        if missed > 0 {
            membersMissed.add(missed, ordering: .relaxed)
            logger.warning("group send skipped members whose channel is full", metadata: [
                "group": "\(group)", "missed": "\(missed)", "reached": "\(counts[2].countValue)",
            ])
        }
    }

    /// Group members this process's group sends have reached, and missed (channel full).
    public var groupMembersReached: Int { membersReached.load(ordering: .relaxed) }
    public var groupMembersMissed: Int { membersMissed.load(ordering: .relaxed) }

    /// The registration is a key that lives as long as a group member does (`group_expiry`),
    /// so one that is gone while its reader keeps renewing it means Redis lost its data.
    public func registerBundleReader(_ processChannel: String) async throws -> Bool {
        try ChannelNames.validateChannel(processChannel, for: .receive)
        guard ChannelNames.isProcessSpecific(processChannel) else {
            throw ChannelLayerError(.invalidName, "'\(processChannel)' is not a process channel (it must end in '!')")
        }
        let reply = try await pipelined(shardIndex(for: processChannel), Scripts.registerReader,
                                        keys: [statKey(processChannel, "reader")],
                                        args: [Array("bundles".utf8), Array(String(configuration.groupExpiry).utf8)])
        guard let existed = reply.integer else { throw unexpected(reply, doing: "register a reader") }
        let first = registeredReaders.withLock { $0.insert(processChannel).inserted }
        return first || existed == 1
    }

    public var maxMessageSize: Int { configuration.maxMessageSize }

    static func unixTime() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    // MARK: Flush and statistics

    public func flush() async throws {
        let patterns = [Self.globEscape(configuration.prefix) + "*", Self.globEscape(configuration.statsPrefix) + "*"]
        for index in shards.indices {
            let connection = try await shared(index)
            for pattern in patterns {
                var cursor = "0"
                repeat {
                    let reply = try await connection.command(["SCAN", cursor, "MATCH", pattern, "COUNT", "1000"])
                    guard case .array(let parts) = reply, parts.count == 2,
                          let next = parts[0].text, case .array(let found) = parts[1] else {
                        throw ChannelLayerError(.backendError, "unexpected SCAN reply: \(reply)")
                    }
                    let keys = found.compactMap(\.bytes)
                    if !keys.isEmpty { _ = try await connection.command([Array("UNLINK".utf8)] + keys) }
                    cursor = next
                } while cursor != "0"
            }
        }
    }

    static func globEscape(_ text: String) -> String {
        var out = ""
        for c in text {
            if "*?[]\\".contains(c) { out.append("\\") }
            out.append(c)
        }
        return out
    }

    public func globalStatistics() async throws -> GlobalStatistics {
        var total = GlobalStatistics(malformedMessagesDropped: malformedDropped.load(ordering: .relaxed))
        let keys = [statKey("#global#", "messages_count"), statKey("#global#", "channel_full_count")]
        for index in shards.indices {
            let reply = try await shared(index).command([Array("MGET".utf8)] + keys)
            guard case .array(let values) = reply, values.count == 2 else { throw unexpected(reply, doing: "MGET") }
            total.messagesCount += values[0].countValue
            total.channelFullCount += values[1].countValue
        }
        return total
    }

    public func channelStatistics(_ channel: String) async throws -> ChannelStatistics {
        try ChannelNames.validateChannel(channel, for: .receive)
        let name = ChannelNames.nonLocalName(channel)
        let indices = ChannelNames.isProcessSpecific(channel) || ChannelNames.isSingleReader(channel)
            ? [shardIndex(for: name)] : Array(shards.indices)
        let listKey = key(name)
        let counterKeys = [statKey(name, "messages_count"), statKey(name, "channel_full_count")]
        let expiry = configuration.expiry
        var stats = ChannelStatistics()
        for index in indices {
            let connection = try await shared(index)
            var replies = try await connection.pipeline([
                [Array("MGET".utf8)] + counterKeys,
                [Array("LLEN".utf8), listKey],
                [Array("LINDEX".utf8), listKey, Array("0".utf8)],
            ])
            if let oldest = replies[2].bytes {
                replies.append(try await connection.command([Array("PTTL".utf8), oldest]))
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

    /// The servers of the ring, without credentials.
    public var location: String { configuration.hosts.map(\.description).joined(separator: ",") }

    /// Channels (list names) with waiting messages, found with SCAN, for operators.
    public func pendingChannels() async throws -> [String] {
        try await scanNames(under: configuration.prefix, type: "list").filter { !$0.hasPrefix(":group:") }
    }

    /// Groups that have members, found with SCAN, for operators.
    public func groups() async throws -> [String] {
        try await scanNames(under: configuration.prefix + ":group:", type: "zset")
    }

    /// Names of keys of one Redis type under a prefix, on every shard, prefix removed.
    private func scanNames(under prefix: String, type: String) async throws -> [String] {
        let pattern = Self.globEscape(prefix) + "*"
        let prefixCount = prefix.utf8.count
        var names = Set<String>()
        for index in shards.indices {
            let connection = try await shared(index)
            var cursor = "0"
            repeat {
                let reply = try await connection.command(["SCAN", cursor, "MATCH", pattern, "COUNT", "1000", "TYPE", type])
                guard case .array(let parts) = reply, parts.count == 2,
                      let next = parts[0].text, case .array(let batch) = parts[1] else { break }
                names.formUnion(batch.compactMap { $0.bytes.map { String(decoding: $0.dropFirst(prefixCount), as: UTF8.self) } })
                cursor = next
            } while cursor != "0"
        }
        return names.sorted()
    }

    /// Connections opened so far across shards (tests use it to check nothing leaks).
    public var connectionsOpened: Int { shards.reduce(0) { $0 + $1.connectionsOpened } }

    public func close() async {
        guard !isClosed.exchange(true, ordering: .relaxed) else { return }
        for shard in shards { shard.close() }
    }
}
