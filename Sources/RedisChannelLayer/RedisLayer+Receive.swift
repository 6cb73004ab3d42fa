import ASGI
import CoreMetrics
import DequeModule
import Logging
import NIOCore
import NIOPosix
import OrderedCollections
import Synchronization

/// Receiving: a non-blocking take first, then `BLPOP` on a dedicated connection; bundled
/// group messages are expanded into a local backlog handed out before anything popped later.
extension RedisChannelLayer {
    /// The oldest message on any of `channels` (shuffled between them), waiting up to `timeout` with `BLPOP`.
    public func receive(channels: [String], timeout: Duration) async throws(ChannelLayerError) -> ReceivedMessage? {
        return try await withLayerErrors {
            for channel in channels { try ChannelNames.validateChannel(channel, for: .receive) }
            guard !channels.isEmpty else { return nil }
            if let waiting = fromBacklog(channels, max: 1).first { return waiting }
            // A look without waiting sees every shard a plain channel may be on: there is no
            // later slice in which the rotation would reach the others.
            let plan = receivePlan(channels, everyShard: timeout <= .zero)
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
                        if lists.count == 1 {
                            let (taken, popped) = try await takeWithoutWaiting(shard: shard, list: lists[0], max: 1)
                            if let received = handOut(taken, max: 1).first {
                                flowing.store(true, ordering: .relaxed)
                                return received
                            }
                            if popped { sawMalformed = true }
                            continue
                        }
                        let reply = try await pipelined(shard, Scripts.receive, keys: lists.shuffled(), args: [])
                        guard case .array(let pair) = reply, pair.count == 2,
                            let list = pair[0].bytes, let body = pair[1].bytes
                        else {
                            if case .error = reply { throw unexpected(reply, doing: "receive") }
                            continue
                        }
                        if let received = handOut(decodeReceived(list: list, body: body).map { [$0] } ?? [], max: 1).first {
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
                let waitPlan = blockingPlan(channels)
                let outcome: ReceivedMessage?? =
                    if waitPlan.count == 1 {
                        try await blockingTake(shard: waitPlan[0].shard, lists: waitPlan[0].lists, wait: slice, max: 1)
                            .map { handOut($0, max: 1).first }
                    } else {
                        try await blockingPopRace(plan: waitPlan, wait: slice, max: 1).map { $0.first }
                    }
                switch outcome {
                case .some(.some(let received)):
                    flowing.store(true, ordering: .relaxed)
                    return received
                case .some(.none): poppedUnusable = true  // an expired or malformed body: try again
                case .none: poppedUnusable = false  // the slice passed with nothing
                }
            }
        }
    }

    /// Like `receive`, but takes up to `max` messages in one round trip when they are waiting:
    /// while messages flow, one pipelined script pops a batch; an idle reader waits in BLPOP and
    /// the script that takes the popped body also takes what queued behind it.
    public func receiveBatch(channels: [String], max: Int, timeout: Duration) async throws(ChannelLayerError) -> [ReceivedMessage] {
        return try await withLayerErrors {
            for channel in channels { try ChannelNames.validateChannel(channel, for: .receive) }
            // A registered bundle reader gets each bundle whole, not `max` members at a time
            // (the rest kept for its next receives): `max` counts bodies for it.
            let whole = readsWholeBundles(channels)
            func handOut(_ popped: [ReceivedBundle], max: Int) -> [ReceivedMessage] {
                self.handOut(popped, max: whole ? .max : max)
            }
            let waiting = fromBacklog(channels, max: whole ? .max : max)
            if !waiting.isEmpty { return waiting }
            if timeout <= .zero, shards.count > 1, max > 1 {
                // Without waiting: everything waiting on every shard a channel may be on (the
                // ordering gate drains its wait channel this way and must see all of it).
                var batch: [ReceivedMessage] = []
                for (shard, lists) in receivePlan(channels, everyShard: true) where batch.count < max {
                    if lists.count == 1 {
                        batch += handOut(
                            try await takeWithoutWaiting(shard: shard, list: lists[0], max: max - batch.count).0, max: max - batch.count)
                        continue
                    }
                    let (keys, deferred) = Self.deferredLast(lists)
                    let reply = try await pipelined(
                        shard, Scripts.receiveMany, keys: keys,
                        args: [.integer(max - batch.count), .integer(nextFirstList()), .integer(deferred)])
                    if case .error = reply { throw unexpected(reply, doing: "receive") }
                    batch += handOut(try decodeInHand(reply), max: max - batch.count)
                }
                return batch
            }
            let plan = receivePlan(channels)
            guard max > 1, plan.count == 1 else {
                guard let one = try await receive(channels: channels, timeout: timeout) else { return [] }
                return [one]
            }
            let (shard, lists) = plan[0]
            if timeout <= .zero || flowing.load(ordering: .relaxed) {
                let batch: [ReceivedMessage]
                if lists.count == 1 {
                    batch = handOut(try await takeWithoutWaiting(shard: shard, list: lists[0], max: max).0, max: max)
                } else {
                    let (keys, deferred) = Self.deferredLast(lists)
                    let reply = try await pipelined(
                        shard, Scripts.receiveMany, keys: keys, args: [.integer(max), .integer(nextFirstList()), .integer(deferred)])
                    if case .error = reply { throw unexpected(reply, doing: "receive") }
                    batch = handOut(try decodeInHand(reply), max: max)
                }
                if !batch.isEmpty {
                    flowing.store(true, ordering: .relaxed)
                    return batch
                }
                flowing.store(false, ordering: .relaxed)
                if timeout <= .zero { return [] }
            }
            return try await inSlices(of: timeout) { slice in
                let waitPlan = blockingPlan(channels)
                if waitPlan.count > 1 {
                    guard let batch = try await blockingPopRace(plan: waitPlan, wait: slice, max: max), !batch.isEmpty else { return nil }
                    flowing.store(true, ordering: .relaxed)
                    return batch
                }
                guard let popped = try await blockingTake(shard: waitPlan[0].shard, lists: waitPlan[0].lists, wait: slice, max: max)
                else { return nil }
                let batch = handOut(popped, max: max)
                // A take that did not fill the batch left its lists empty (after a wait on
                // several, the take looked at all of them, fairly, disconnects last): the next
                // receive waits in BLMOVE or BLPOP (which answer at once if anything came
                // meanwhile) instead of a look that would find nothing, a script Redis would run
                // ahead of the reader's next command.
                if !batch.isEmpty { flowing.store(batch.count >= max, ordering: .relaxed) }
                return batch
            }
        }
    }

    /// Calls `take` with slices of `timeout` (each at most the blocking slice) until it takes
    /// something; empty once the time is up or the task is cancelled. `take` answers nil or
    /// empty for a slice that passed with nothing usable.
    func inSlices<Entry>(of timeout: Duration, _ take: (Duration) async throws -> [Entry]?) async throws -> [Entry] {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        while true {
            let remaining = deadline - clock.now
            if remaining <= .milliseconds(1) || Task.isCancelled { return [] }
            if let taken = try await take(min(remaining, configuration.blockingSlice)), !taken.isEmpty { return taken }
        }
    }

    /// One entry per body taken: a bundle with its member list (the same instance for a list
    /// decoded before), for the registered reader of `processChannel`; anything else (a process
    /// channel not registered here) gets ``receiveBatch(channels:max:timeout:)``, one message
    /// per entry. Waits like it: a look without waiting while messages flow, then `BLMOVE`.
    public func receiveBundles(from processChannel: String, max: Int, timeout: Duration) async throws(ChannelLayerError)
        -> [ReceivedBundle]
    {
        guard max > 1, readsWholeBundles([processChannel]) else {
            return try await receiveBatch(channels: [processChannel], max: max, timeout: timeout).map {
                ReceivedBundle(channel: $0.channel, message: $0.message)
            }
        }
        return try await withLayerErrors {
            try ChannelNames.validateChannel(processChannel, for: .receive)
            let waiting = fromBacklog([processChannel], max: .max)
            if !waiting.isEmpty { return waiting.map { ReceivedBundle(channel: $0.channel, message: $0.message) } }
            let (shard, lists) = receivePlan([processChannel])[0]
            if timeout <= .zero || flowing.load(ordering: .relaxed) {
                let batch = try await takeWithoutWaiting(shard: shard, list: lists[0], max: max).0
                if !batch.isEmpty {
                    flowing.store(true, ordering: .relaxed)
                    return batch
                }
                flowing.store(false, ordering: .relaxed)
                if timeout <= .zero { return [] }
            }
            return try await inSlices(of: timeout) { slice in
                let batch = try await blockingTake(shard: shard, lists: lists, wait: slice, max: max)
                if let batch, !batch.isEmpty { flowing.store(batch.count >= max, ordering: .relaxed) }
                return batch
            }
        }
    }

    /// Whether `channels` is one process channel this layer registered a bundle reader for
    /// (see ``receiveBatch(channels:max:timeout:)``).
    func readsWholeBundles(_ channels: [String]) -> Bool {
        channels.count == 1 && registeredReaders.withLock { $0.contains(channels[0]) }
    }

    /// `lists` with those of a connection's last message (`*.disconnect`) moved to the end, and
    /// how many they are: a fair batch receive takes them only into the room the others leave
    /// (wherever they were: a worker lists its wake channel after them).
    static func deferredLast(_ lists: [RedisArgument]) -> (lists: [RedisArgument], deferred: Int) {
        func isDeferred(_ list: RedisArgument) -> Bool {
            if case .key(_, let name, _) = list { return ChannelNames.isDeferredInBatches(name) }
            return false
        }
        let deferred = lists.filter(isDeferred)
        guard !deferred.isEmpty else { return (lists, 0) }
        return (lists.filter { !isDeferred($0) } + deferred, deferred.count)
    }

    /// The list a fair batch receive starts its shares from (see `Scripts.receiveMany`).
    func nextFirstList() -> Int { fairCursor.wrappingAdd(1, ordering: .relaxed).oldValue & 0xFFFF }

    /// Lists to read per shard: `!`/`?` channels on their shard, plain ones on the next
    /// shard in rotation (they are sent round-robin, so any shard may hold them).
    /// Which lists to look at on which shard: `!` and `?` channels on their ring shard; plain
    /// ones (which senders spread round-robin) on one shard in rotation, as asgi_redis does, or
    /// on every shard when `everyShard`.
    func receivePlan(_ channels: [String], everyShard: Bool = false) -> [(shard: Int, lists: [RedisArgument])] {
        let prefix = configuration.prefix
        func key(_ name: String) -> RedisArgument { .key(prefix, name) }
        if shards.count == 1 { return [(0, channels.map(key))] }
        var byShard: [Int: [RedisArgument]] = [:]
        let rotating = receiveCursor.wrappingAdd(1, ordering: .relaxed).oldValue % shards.count
        for channel in channels {
            if ChannelNames.isProcessSpecific(channel) || ChannelNames.isSingleReader(channel) {
                byShard[shardIndex(for: channel), default: []].append(key(channel))
            } else if everyShard {
                for index in shards.indices { byShard[index, default: []].append(key(channel)) }
            } else {
                byShard[rotating, default: []].append(key(channel))
            }
        }
        return byShard.map { ($0.key, $0.value) }
    }

    /// Takes the body a `BLPOP` popped. The key is already off its list, so if the connection
    /// dies now (a Redis restart), the body is still in Redis under its key: it is taken
    /// through a fresh connection, for a while, instead of being left to expire unseen.
    func take(
        _ script: LuaScript, on connection: RedisConnection, shard: Int,
        keys: [RedisArgument], args: [RedisArgument]
    ) async throws -> RedisReply {
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

    /// The shards one slice of a blocking wait covers. A plain channel may be on any shard
    /// (senders spread it round-robin), so with several shards the slice races all of them at
    /// once. A server that refused `CLIENT ID` (so a racer could not be woken) gets the
    /// rotation instead: one shard per slice for plain channels, as asgi_redis looks at one
    /// per call.
    func blockingPlan(_ channels: [String]) -> [(shard: Int, lists: [RedisArgument])] {
        receivePlan(channels, everyShard: shards.count > 1 && !unblockRefused.load(ordering: .relaxed))
    }

    /// A `BLPOP` on every shard of `plan` at once, for `wait`. The first to pop (or fail) ends
    /// the race: the others are woken with `CLIENT UNBLOCK` (by the racer that popped, while it
    /// takes the body), so the caller does not wait out their slice, and whatever they popped meanwhile joins the result, past `max` in the
    /// backlog. Nothing popped is put back or lost.
    ///
    /// nil: the slice passed with nothing. Empty: what was popped was unusable (expired or
    /// malformed bodies). An error is thrown only when nothing was popped.
    func blockingPopRace(plan: [(shard: Int, lists: [RedisArgument])], wait: Duration, max: Int) async throws -> [ReceivedMessage]? {
        let race = BlockingRace()
        let outcomes = await withTaskGroup(of: Result<[ReceivedBundle]?, any Error>?.self) { group in
            for entry in plan {
                group.addTask {
                    do {
                        return .success(
                            try await self.blockingTake(shard: entry.shard, lists: entry.lists, wait: wait, max: max, race: race))
                    } catch {
                        return .failure(error)
                    }
                }
            }
            var outcomes: [Result<[ReceivedBundle]?, any Error>] = []
            var waking = false
            for await outcome in group {
                guard let outcome else { continue }  // the waker
                outcomes.append(outcome)
                if case .success(nil) = outcome { continue }  // this shard's slice passed
                if !waking {
                    waking = true
                    group.addTask {
                        await self.wakeRacers(race)
                        return nil
                    }
                }
            }
            return outcomes
        }
        var popped: [ReceivedBundle] = []
        var unusable = false
        var failure: (any Error)?
        for outcome in outcomes {
            switch outcome {
            case .success(nil): break
            case .success(let messages?):
                popped += messages
                if messages.isEmpty { unusable = true }
            case .failure(let error): failure = failure ?? error
            }
        }
        if !popped.isEmpty { return handOut(popped, max: max) }
        if let failure { throw failure }
        return unusable ? [] : nil
    }

    /// `BLPOP` on one shard for `wait`, then the body it named (and, for a batch, up to
    /// `max - 1` more queued behind it) through the same connection. In a race, the racer
    /// registers before it waits, and when it pops it wakes the others. nil: the slice passed
    /// (or the race ended before this racer began to wait); empty: what was popped was unusable.
    func blockingTake(
        shard: Int, lists: [RedisArgument], wait: Duration, max: Int, race: BlockingRace? = nil
    ) async throws -> [ReceivedBundle]? {
        // A receive on its own is a race of one: cancelling the caller's task wakes its `BLPOP`
        // with `CLIENT UNBLOCK` (the connection stays usable, and a message popped just before
        // is still taken and returned), so a stopping worker or server does not wait out the slice.
        let waking = race ?? BlockingRace()
        return try await onDedicated(shard) { connection -> [ReceivedBundle]? in
            let clientID = try await connection.clientID()
            if let clientID {
                guard waking.enter(shard: shard, clientID: clientID) else { return nil }
            } else if race != nil, !unblockRefused.exchange(true, ordering: .relaxed) {
                // This racer waits out its slice (nobody can wake it); later slices rotate.
                logger.warning("Redis refused CLIENT ID: blocking receives look at one shard per slice (rotating)")
            }
            if race == nil, lists.count == 1, !moveRefused.load(ordering: .relaxed) {
                let outcome = try await moveAndTake(list: lists[0], on: connection, shard: shard, wait: wait, max: max, waking: waking)
                if case .taken(let messages) = outcome { return messages }
                // Refused: the BLPOP below waits instead, and a cancellation must still wake it.
                if let clientID, !waking.enter(shard: shard, clientID: clientID) { return nil }
            }
            let reply: RedisReply
            do {
                reply = try await withTaskCancellationHandler {
                    try await connection.command(blockingPopCommand(lists, wait: wait), wait: wait)
                } onCancel: {
                    Task { await self.wakeRacers(waking) }
                }
                waking.leave(shard: shard)
            } catch {
                waking.leave(shard: shard)
                throw error
            }
            switch reply {
            case .array(let pair) where pair.count == 2:
                guard let list = pair[0].bytes, let bodyKey = pair[1].bytes else { return [] }
                // A wait on several lists takes what waits on all of them with the popped body.
                func takeThem() async throws -> [ReceivedBundle] {
                    if lists.count > 1 && max > 1 {
                        return try await takePoppedAndMany(
                            list: list, bodyKey: bodyKey, lists: lists, on: connection, shard: shard, max: max)
                    }
                    return try await takePopped(list: list, bodyKey: bodyKey, on: connection, shard: shard, max: max)
                }
                guard let race else { return try await takeThem() }
                // This racer popped: the others are woken now, while the body is taken, so
                // their replies come back in the same round trip as the body.
                async let woken: Void = wakeRacers(race)
                let popped = try await takeThem()
                await woken
                return popped
            case .error(let e):
                throw ChannelLayerError(.backendError, "Redis refused BLPOP: \(e)")
            default:
                return nil
            }
        }
    }

    enum MoveOutcome {
        /// What was taken; nil: the slice passed.
        case taken([ReceivedBundle]?)
        /// The server does not know `BLMOVE`: wait with `BLPOP` instead.
        case refused
    }

    /// A blocking take of one list in one round trip: `BLMOVE` moves the first message's key
    /// into the list's in-hand list, and the script pipelined behind it (Redis runs it as soon
    /// as the move returns) takes every body in hand and up to `max - 1` more messages. With
    /// `BLPOP`, the body costs a second round trip after the pop; a server's replies and group
    /// messages wait for it. A key left in hand (the connection died between the two, or the
    /// script failed) is taken first by the next take of that list, with or without waiting.
    /// A move Redis refuses (out of memory: `BLMOVE` writes; an ACL without it; a Redis older
    /// than 6.2) falls back to `BLPOP` (for this slice, or for good), and whatever the script
    /// took anyway is returned, never dropped.
    func moveAndTake(
        list: RedisArgument, on connection: RedisConnection, shard: Int, wait: Duration, max: Int, waking: BlockingRace
    ) async throws -> MoveOutcome {
        let inHand = Self.inHandKey(list)
        let keys = [inHand, list]
        let expiry = RedisArgument.integer(configuration.expirySeconds + 1)
        if inHandMayHold.withLock({ $0.contains(list) }) || Scripts.takeInHand.knownSHA == nil {
            // What a failed take may have left in hand (and the script loaded), without waiting.
            let first: [ReceivedBundle]
            do {
                first = try decodeInHand(
                    await Scripts.takeInHand.run(on: connection, keys: keys, args: [.integer(max), "1", expiry]))
            } catch {
                waking.leave(shard: shard)
                throw error
            }
            _ = inHandMayHold.withLock { $0.remove(list) }
            if !first.isEmpty {
                waking.leave(shard: shard)
                return .taken(first)
            }
        }
        var request = RedisCommandEncoding.encode([
            ["BLMOVE", list, inHand, "LEFT", "RIGHT", .text(timeoutArgument(wait.seconds))],
            ["EXPIRE", inHand, expiry],
        ])
        var call = Scripts.takeInHand.encodedCall(keys: keys, args: [.integer(max), "0", expiry])
        request.writeBuffer(&call)
        let replies: [RedisReply]
        do {
            replies = try await withTaskCancellationHandler {
                try await connection.send(request, commands: 3, wait: wait)
            } onCancel: {
                Task { await self.wakeRacers(waking) }
            }
            waking.leave(shard: shard)
        } catch {
            waking.leave(shard: shard)
            // The move may have happened: the next take looks in hand first.
            _ = inHandMayHold.withLock { $0.insert(list) }
            throw error
        }
        var taken = replies[2]
        if case .error(let e) = taken, e.hasPrefix("NOSCRIPT") {
            // Until the script has run again, what was moved is in hand.
            _ = inHandMayHold.withLock { $0.insert(list) }
            taken = try await Scripts.takeInHand.run(on: connection, keys: keys, args: [.integer(max), "0", expiry])
            _ = inHandMayHold.withLock { $0.remove(list) }
        }
        let messages: [ReceivedBundle]
        do {
            messages = try decodeInHand(taken)
        } catch {
            // The script failed (BUSY, say): what was moved stays in hand for the next take.
            _ = inHandMayHold.withLock { $0.insert(list) }
            messages = []
        }
        if case .error(let e) = replies[0] {
            if e.hasPrefix("ERR unknown command") || e.hasPrefix("NOPERM") {
                if !moveRefused.exchange(true, ordering: .relaxed) {
                    logger.notice(
                        "Redis refuses BLMOVE (older than 6.2, or an ACL): a blocking take costs two round trips",
                        metadata: ["error": "\(e)"])
                }
            } else if !e.hasPrefix("OOM"), messages.isEmpty {
                throw ChannelLayerError.redisRefused(e, "BLMOVE")
            }
            return messages.isEmpty ? .refused : .taken(messages)
        }
        if case .error(let e) = taken, messages.isEmpty { throw ChannelLayerError.redisRefused(e, "take") }
        if case .null = replies[0], messages.isEmpty { return .taken(nil) }
        return .taken(messages)
    }

    /// A look without waiting at one list: what a failed blocking take left in its hand first,
    /// then the list; and whether anything was popped (bodies that turn out expired or
    /// malformed are counted and skipped).
    func takeWithoutWaiting(shard: Int, list: RedisArgument, max: Int) async throws -> ([ReceivedBundle], Bool) {
        let reply = try await pipelined(
            shard, Scripts.takeInHand, keys: [Self.inHandKey(list), list],
            args: [.integer(max), "1", .integer(configuration.expirySeconds + 1)])
        let taken = try decodeInHand(reply)
        let popped = (reply.array?.count ?? 0) > 1 || (reply.array?.first?.countValue ?? 0) > 0
        return (taken, popped)
    }

    /// `<list>:inhand`: no channel name holds a colon, so no channel's list has this name.
    static func inHandKey(_ list: RedisArgument) -> RedisArgument {
        switch list {
        case .key(let prefix, let name, let suffix): return .key(prefix, name, suffix + ":inhand")
        case .bytes(let bytes): return .bytes(bytes + Array(":inhand".utf8))
        case .text(let text): return .text(text + ":inhand")
        default: return list
        }
    }

    /// A take script's reply, {expired bodies, list, body, ...} (the in-hand take, the fair
    /// take of several lists): the expired bodies counted, the messages decoded.
    private func decodeInHand(_ reply: RedisReply) throws(ChannelLayerError) -> [ReceivedBundle] {
        guard case .array(let items) = reply, let expired = items.first else { throw unexpected(reply, doing: "receive") }
        if expired.countValue > 0 { LayerMetrics.expired.increment(by: expired.countValue) }
        return decodePairs(items, from: 1)
    }

    /// The body a `BLPOP` named (and, for a batch, up to `max - 1` more queued behind
    /// it), taken through the same connection; an expired body is counted and skipped.
    private func takePopped(
        list: [UInt8], bodyKey: [UInt8], on connection: RedisConnection, shard: Int, max: Int
    ) async throws -> [ReceivedBundle] {
        if max <= 1 {
            let body = try await take(Scripts.takeBody, on: connection, shard: shard, keys: [.bytes(bodyKey)], args: [])
            guard let bytes = body.bytes else {
                LayerMetrics.expired.increment()  // the list named a body that had expired
                return []
            }
            return decodeReceived(list: list, body: bytes).map { [$0] } ?? []
        }
        let taken = try await take(
            Scripts.takeBodyAndMore, on: connection, shard: shard, keys: [.bytes(bodyKey), .bytes(list)],
            args: [.integer(max - 1)])
        let items = taken.array ?? []
        var popped: [ReceivedBundle] = []
        if let body = items.first?.bytes {
            if let taken = decodeReceived(list: list, body: body) { popped = [taken] }
        } else {
            LayerMetrics.expired.increment()
        }
        return popped + decodePairs(items, from: 1)
    }

    /// After a `BLPOP` on several `lists` (no race): the popped body and up to `max - 1` more
    /// messages of every list, fairly, in the same round trip. Fewer than `max` means every list
    /// was found empty.
    private func takePoppedAndMany(
        list: [UInt8], bodyKey: [UInt8], lists: [RedisArgument], on connection: RedisConnection, shard: Int, max: Int
    ) async throws -> [ReceivedBundle] {
        let (keys, deferred) = Self.deferredLast(lists)
        let taken = try await take(
            Scripts.takeBodyAndMany, on: connection, shard: shard, keys: [.bytes(bodyKey)] + keys,
            args: [.integer(max - 1), .integer(nextFirstList()), .integer(deferred), .bytes(list)])
        return try decodeInHand(taken)
    }

    /// Ends `race` and wakes the racers still in `BLPOP`. An `UNBLOCK` can overtake the
    /// `BLPOP` it is meant for (they travel on different connections) and find nobody blocked:
    /// a racer still waiting is woken again after a short, growing pause.
    func wakeRacers(_ race: BlockingRace) async {
        var waiting = race.end()
        var backoff = Backoff(first: .milliseconds(1), cap: .milliseconds(100))
        while !waiting.isEmpty {
            for (shard, id) in waiting {
                _ = try? await shared(shard).command(["CLIENT", "UNBLOCK", .integer(id)])
            }
            do { try await Task.sleep(for: backoff.next()) } catch { return }  // cancelled: the slices end by themselves
            waiting = waiting.filter { race.isWaiting(shard: $0.shard) }
        }
    }

    /// `BLPOP` on `lists` (in random order, so no list starves the others) for `wait`.
    func blockingPopCommand(_ lists: [RedisArgument], wait: Duration) -> [RedisArgument] {
        var command: [RedisArgument] = []
        command.reserveCapacity(lists.count + 2)
        command.append(.text("BLPOP"))
        command += lists.shuffled()
        command.append(.text(timeoutArgument(wait.seconds)))
        return command
    }

    /// A blocking command's timeout argument: seconds with three decimals (Redis takes
    /// fractions since 6.0), at least a millisecond.
    func timeoutArgument(_ seconds: Double) -> String {
        let millis = max(1, Int((seconds * 1000).rounded()))
        let whole = millis / 1000, frac = millis % 1000
        return "\(whole)." + (frac < 10 ? "00" : frac < 100 ? "0" : "") + "\(frac)"
    }
}
