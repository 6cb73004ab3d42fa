import ASGI
import Foundation
import OrderedCollections
import Synchronization
import TestSupport
import Testing

@testable import RedisChannelLayer

/// Group sends to the members of a process channel whose reader registered for bundles: one
/// stored message per process channel, fanned out on receive; capacity counts the bundle once.
@Suite("bundled group sends", .timeLimit(.minutes(2)))
struct BundledGroupTests {
    /// Two fresh process channels registered as reading bundles (two servers).
    func twoBundleReaders(_ layer: any ChannelLayer) async throws -> (String, String) {
        let a = "bundle.a\(ChannelNames.randomLetters(6))!", b = "bundle.b\(ChannelNames.randomLetters(6))!"
        #expect(try await layer.registeredAsBundleReader(a))
        #expect(try await layer.registeredAsBundleReader(b))
        return (a, b)
    }

    @Test(
        "1,000 members on one registered process channel, capacity 5: every member gets every message, in order",
        arguments: LayerKind.allCases)
    func thousandMembersThroughCapacityFive(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            let process = "bundle.reader\(ChannelNames.randomLetters(6))!"
            #expect(try await layer.registeredAsBundleReader(process))
            let members = (0..<1000).map { process + "m\($0)" }
            for member in members { try await layer.groupAdd("big", channel: member) }
            // Also a member on another process channel that never registered (a Daphne 1.4).
            try await layer.groupAdd("big", channel: "daphne.response.Other!x")
            for i in 0..<3 { try await layer.sendGroup("big", message: ["n": .int(Int64(i))]) }
            #expect(try await layer.channelStatistics(process).messagesPending == 3, "one stored message per group send")
            var got: [String: [Int64]] = [:]
            while true {
                let batch = try await layer.receiveBatch(channels: [process], max: 64, timeout: .zero)
                if batch.isEmpty { break }
                for received in batch { got[received.channel, default: []].append(received.message["n"]?.intValue ?? -1) }
            }
            #expect(got.count == 1000 && got.values.allSatisfy { $0 == [0, 1, 2] })
            #expect(Set(got.keys) == Set(members))
            var other: [Int64] = []
            while let one = try await layer.receive(channels: ["daphne.response.Other!"]) {
                #expect(one.channel == "daphne.response.Other!x")
                other.append(one.message["n"]?.intValue ?? -1)
            }
            #expect(other == [0, 1, 2])
        }
    }

    /// A registered reader's batch receive gets each bundle whole (the server hands a group
    /// message to all its members at once, not 64 at a time through the layer's backlog); a
    /// bundle is never cut, and what was sent after it comes after it.
    /// (Redis only: the in-memory layer stores a group message per member, so it has no bundle
    /// to keep whole.)
    @Test("a registered reader's batch receive gets each bundle whole, in order")
    func aRegisteredReaderGetsWholeBundles() async throws {
        try await withLayer(.redis) { layer in
            let process = "bundle.whole\(ChannelNames.randomLetters(6))!"
            #expect(try await layer.registeredAsBundleReader(process))
            let members = (0..<500).map { process + "w\($0)" }
            for member in members { try await layer.groupAdd("whole", channel: member) }
            for i in 0..<2 { try await layer.sendGroup("whole", message: ["n": .int(Int64(i))]) }
            try await layer.send(["n": 9], to: members[0])
            let first = try await layer.receiveBatch(channels: [process], max: 2, timeout: .seconds(2))
            var all = first
            while true {
                let more = try await layer.receiveBatch(channels: [process], max: 2, timeout: .zero)
                if more.isEmpty { break }
                all += more
            }
            #expect(first.count >= 500 && first.count % 500 == 0, "a bundle was cut: \(first.count) in the first batch")
            #expect(all.map { $0.message["n"]?.intValue ?? -1 } == Array(repeating: 0, count: 500) + Array(repeating: 1, count: 500) + [9])
            #expect(Set(all.prefix(500).map(\.channel)) == Set(members))
        }
    }

    /// A server's reader takes bodies, not members: a bundle is one entry with its member list,
    /// the same instance for the group's next message to the same members (a server keeps what
    /// a list resolved to by its identity), a new one once the group changed. A process channel
    /// not registered here gets one message per entry; so does the in-memory layer.
    @Test("bundles are taken one entry per body, with one list instance per member list", arguments: LayerKind.allCases)
    func bundlesComeWithTheirMemberList(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            let bundling = try #require(MeteredChannelLayer(layer) as (any ChannelLayerBundling))
            let process = "bundle.lists\(ChannelNames.randomLetters(6))!"
            #expect(try await layer.registeredAsBundleReader(process))
            let members = (0..<300).map { process + "l\($0)" }
            for member in members { try await layer.groupAdd("lists", channel: member) }
            for i in 0..<3 { try await layer.sendGroup("lists", message: ["n": .int(Int64(i))]) }
            try await layer.groupAdd("lists", channel: process + "late")
            try await layer.sendGroup("lists", message: ["n": 3])
            try await layer.send(["n": 9], to: members[0])
            var taken: [ReceivedBundle] = []
            while taken.count < (kind == .redis ? 5 : 1_205) {
                let more = try await bundling.receiveBundles(from: process, max: 64, timeout: .seconds(2))
                if more.isEmpty { break }
                taken += more
            }
            let flat = taken.flatMap(\.messages)
            var expected: [Int64] = []
            for i in 0..<3 { expected += Array(repeating: Int64(i), count: 300) }
            expected += Array(repeating: 3, count: 301) + [9]
            let got: [Int64] = flat.map { $0.message["n"]?.intValue ?? -1 }
            #expect(got == expected)
            #expect(Set(flat.prefix(300).map(\.channel)) == Set(members))
            guard kind == .redis else {
                #expect(taken.allSatisfy { $0.count == 1 })
                return
            }
            let lists = taken.prefix(4).compactMap { bundle -> BundleMemberList? in
                if case .members(let list) = bundle.channels { list } else { nil }
            }
            #expect(lists.count == 4 && taken[4].count == 1, "\(taken.map(\.count))")
            #expect(lists[0] === lists[1] && lists[1] === lists[2], "the same member list decoded into new instances")
            #expect(lists[3] !== lists[0] && lists[3].names.count == 301)

            // Not registered here: one message per entry, members still all there.
            let other = "bundle.unreg\(ChannelNames.randomLetters(6))!"
            for i in 0..<3 { try await layer.groupAdd("unreg", channel: other + "u\(i)") }
            try await layer.sendGroup("unreg", message: ["n": 1])
            var singles: [ReceivedBundle] = []
            while singles.count < 3 {
                let more = try await bundling.receiveBundles(from: other, max: 64, timeout: .seconds(2))
                if more.isEmpty { break }
                singles += more
            }
            #expect(singles.count == 3 && singles.allSatisfy { $0.count == 1 })
        }
    }

    @Test(
        "single receives hand out a bundle's members one at a time, before anything sent later",
        arguments: LayerKind.allCases)
    func singleReceivesKeepOrder(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            let process = "bundle.single\(ChannelNames.randomLetters(6))!"
            _ = try await layer.registeredAsBundleReader(process)
            for i in 0..<3 { try await layer.groupAdd("trio", channel: process + "s\(i)") }
            try await layer.sendGroup("trio", message: ["text": "group"])
            try await layer.send(["text": "direct"], to: process + "s0")
            var seen: [String] = []
            while let one = try await layer.receive(channels: [process], timeout: .zero) {
                seen.append((one.message["text"]?.stringValue ?? "") + "@" + one.channel.dropFirst(process.count))
            }
            #expect(seen.count == 4 && seen.last == "direct@s0", "\(seen)")
            #expect(Set(seen.prefix(3)) == ["group@s0", "group@s1", "group@s2"])
        }
    }

    /// A bundle must never deliver to another process's sockets: one stored on this process's
    /// channel that names a channel of another process (written by hand, as a hostile or broken
    /// writer on the same Redis could) is dropped whole and counted; the next message arrives.
    @Test("a bundle naming another process's channel is dropped and counted, not delivered")
    func aBundleNamingAForeignChannelIsDropped() async throws {
        try await withLayer(.redis) { layer in
            let redis = try #require(layer as? RedisChannelLayer)
            let process = "bundle.own\(ChannelNames.randomLetters(6))!"
            let connection = try await redis.shared(redis.shardIndex(for: process))
            let body = MsgPackEncoder.encode(
                .map(["__asgi_channel__": .array([.string(process + "mine"), .string("bundle.other!theirs")]), "text": "hi"]))
            let bodyKey = redis.key("handmade" + ChannelNames.randomLetters(8))
            _ = try await connection.command(["SET", .bytes(bodyKey), .bytes(body), "EX", 60])
            _ = try await connection.command(["RPUSH", .bytes(redis.key(process)), .bytes(bodyKey)])
            try await layer.send(["text": "after"], to: process + "mine")
            let before = try await layer.globalStatistics().malformedMessagesDropped
            let got = try await layer.receiveBatch(channels: [process], max: 10, timeout: .seconds(2))
            #expect(got.map(\.channel) == [process + "mine"] && got.first?.message["text"]?.stringValue == "after")
            #expect(try await layer.globalStatistics().malformedMessagesDropped == before + 1)
        }
    }

    /// A bundle's member list is decoded once: the next bundle with the same list bytes on the
    /// same process channel takes the names decoded then (and its own message); the same bytes
    /// on another process channel are not its members, and the bundle is dropped as before.
    @Test("a member list seen before is matched by its bytes, and only on its own process channel")
    func aMemberListSeenBeforeIsMatchedOnlyOnItsOwnChannel() async throws {
        try await withLayer(.redis) { layer in
            let redis = try #require(layer as? RedisChannelLayer)
            let own = "bundle.mem\(ChannelNames.randomLetters(6))!", other = "bundle.oth\(ChannelNames.randomLetters(6))!"
            let members: ASGIValue = .array([.string(own + "m1"), .string(own + "m2"), .string(own + "m3")])
            func store(_ text: String, on process: String) async throws {
                let connection = try await redis.shared(redis.shardIndex(for: process))
                let body = MsgPackEncoder.encode(.map(["__asgi_channel__": members, "text": .string(text), "n": 7]))
                let bodyKey = redis.key("handmade" + ChannelNames.randomLetters(8))
                _ = try await connection.command(["SET", .bytes(bodyKey), .bytes(body), "EX", 60])
                _ = try await connection.command(["RPUSH", .bytes(redis.key(process)), .bytes(bodyKey)])
            }
            let hits = redis.bundleMembers.hits.load(ordering: .relaxed)
            for text in ["one", "two", "three"] {
                try await store(text, on: own)
                let got = try await layer.receiveBatch(channels: [own], max: 10, timeout: .seconds(2))
                #expect(got.map(\.channel) == [own + "m1", own + "m2", own + "m3"])
                #expect(got.allSatisfy { $0.message == ["text": .string(text), "n": 7] }, "\(got)")
            }
            #expect(redis.bundleMembers.hits.load(ordering: .relaxed) == hits + 2, "the list was decoded again")
            let before = try await layer.globalStatistics().malformedMessagesDropped
            try await store("stolen", on: other)
            try await layer.send(["text": "after"], to: other + "x")
            let got = try await layer.receiveBatch(channels: [other], max: 10, timeout: .seconds(2))
            #expect(got.map(\.channel) == [other + "x"], "another process's members were delivered: \(got)")
            #expect(try await layer.globalStatistics().malformedMessagesDropped == before + 1)
        }
    }

    /// A group send reads the group's cached split of its members while the group is
    /// unchanged; every change, by this layer or by another process writing the sorted set as
    /// asgi_redis does, reaches the next send.
    @Test("the cached split of a group follows every change: ours, asgi_redis-style writes, expiry, a reader that stopped bundling")
    func theGroupCacheFollowsEveryChange() async throws {
        try await withLayer(.redis, capacity: 100) { layer in
            let redis = try #require(layer as? RedisChannelLayer)
            let group = "cached" + ChannelNames.randomLetters(6)
            let (a, b) = try await twoBundleReaders(layer)
            let connection = try await redis.shared(redis.shardIndex(for: group))
            let gkey = RedisArgument.bytes(redis.groupKey(group))
            let cacheKey = RedisArgument.bytes(redis.groupCacheKey(group))
            var expected: Set<String> = []
            for i in 0..<50 {
                let member = (i % 2 == 0 ? a : b) + "m\(i)"
                try await layer.groupAdd(group, channel: member)
                expected.insert(member)
            }
            try await layer.groupAdd(group, channel: "plain" + ChannelNames.randomLetters(6))
            let plain = try await layer.groupChannels(group).first { !$0.contains("!") }!
            expected.insert(plain)
            var round = 0
            /// One send; every member of `expected` (and nobody else) gets it, once.
            func sendAndCheck(_ what: Comment) async throws {
                round += 1
                try await layer.sendGroup(group, message: ["n": .int(Int64(round))])
                var got: [String] = []
                for list in [a, b, plain] {
                    while true {
                        let batch = try await layer.receiveBatch(channels: [list], max: 64, timeout: .zero)
                        if batch.isEmpty { break }
                        for received in batch where received.message["n"]?.intValue == Int64(round) { got.append(received.channel) }
                    }
                }
                #expect(got.count == Set(got).count && Set(got) == expected, what)
            }
            // A small group is read whole: no cache.
            let small = "small" + ChannelNames.randomLetters(6)
            for i in 0..<3 { try await layer.groupAdd(small, channel: a + "small\(i)") }
            try await layer.sendGroup(small, message: ["small": true])
            #expect(try await connection.command(["EXISTS", .bytes(redis.groupCacheKey(small))]).integer == 0)
            while try await !layer.receiveBatch(channels: [a], max: 64, timeout: .zero).isEmpty {}
            try await sendAndCheck("the first send builds the cache")
            #expect(try await connection.command(["HGET", cacheKey, "n"]).text == "2", "one cached bundle per process channel")
            try await sendAndCheck("the second send reads it")
            // asgi_redis's group_add: a ZADD scored with its own clock, not through this layer.
            let joined = a + "python"
            _ = try await connection.command(["ZADD", gkey, .text(String(Date().timeIntervalSince1970)), .text(joined)])
            expected.insert(joined)
            try await sendAndCheck("a member added by another process")
            // asgi_redis's group_discard: a ZREM.
            let left = b + "m1"
            _ = try await connection.command(["ZREM", gkey, .text(left)])
            expected.remove(left)
            try await sendAndCheck("a member removed by another process")
            // This layer's own add and discard.
            try await layer.groupAdd(group, channel: b + "late")
            expected.insert(b + "late")
            try await sendAndCheck("a member added here")
            try await layer.groupDiscard(group, channel: a + "m0")
            expected.remove(a + "m0")
            try await sendAndCheck("a member discarded here")
            // A member past the group expiry (scored a day and more ago) is dropped by the send.
            _ = try await connection.command(["ZADD", gkey, "1000", .text(a + "m2")])
            expected.remove(a + "m2")
            try await sendAndCheck("a member expired")
            // One member swapped for another scored in the middle (an asgi_redis host whose clock
            // is behind): same size, newest and oldest; asgi_redis sets the set's expiry with
            // the add, and that is seen.
            let scores = try await connection.command(["ZRANGE", gkey, "0", "-1", "WITHSCORES"]).array ?? []
            let middle = Double(scores[scores.count / 2 + 1].text ?? "") ?? 0
            _ = try await connection.command(["ZREM", gkey, .text(b + "m5")])
            _ = try await connection.command(["ZADD", gkey, .text(String(middle)), .text(b + "skewed")])
            _ = try await connection.command(["EXPIRE", gkey, "86400"])
            expected.remove(b + "m5")
            expected.insert(b + "skewed")
            try await sendAndCheck("a member swapped by asgi_redis with a clock behind")
            // Shrunk to exactly 32 (a cache built at that size), then to 31 (read whole), then back
            // to 32 with a member scored in the middle and no new expiry (size, newest, oldest
            // and expiry as when the cache was built): the cache of 32 must not match again.
            var current = try await layer.groupChannels(group)
            while current.count > 32 {
                let gone = current.remove(at: 1)
                _ = try await connection.command(["ZREM", gkey, .text(gone)])
                expected.remove(gone)
            }
            try await sendAndCheck("the group at 32")
            let dropped = current.remove(at: 1)
            _ = try await connection.command(["ZREM", gkey, .text(dropped)])
            expected.remove(dropped)
            try await sendAndCheck("the group at 31, read whole")
            let middleScore = try await connection.command(["ZSCORE", gkey, .text(current[current.count / 2])]).text ?? "0"
            _ = try await connection.command(["ZADD", gkey, .text(middleScore), .text(a + "regrown")])
            expected.insert(a + "regrown")
            try await sendAndCheck("the group back at 32")
            // The same swap without the expiry (no writer we know of does this) is seen once the
            // cache is older than its bound.
            _ = try await connection.command(["ZREM", gkey, .text(b + "m3")])
            _ = try await connection.command(["ZADD", gkey, .text(String(middle)), .text(b + "swapped")])
            expected.remove(b + "m3")
            expected.insert(b + "swapped")
            try await Task.sleep(for: .seconds(RedisChannelLayer.groupCacheLongestLife + 1))
            try await sendAndCheck("a change the fingerprint missed, after the cache's longest life")
            // A reader that no longer reads bundles gets one message per member.
            _ = try await connection.command(["DEL", .bytes(Array((redis.configuration.statsPrefix + b + ":reader").utf8))])
            try await sendAndCheck("a process channel whose reader stopped bundling")
        }
    }

    /// A cached bundle is made inside Redis: the member list copied from the cache (`COPY`),
    /// the message's header written over its start and its fields after it. Whatever the
    /// message (a map of 16 or more fields has a longer header; a large field), the bytes a
    /// member gets must be the message sent, by every path: the send that builds the cache,
    /// the sends that copy it, a cache whose member list was evicted, a Redis that refuses
    /// `COPY` (an ACL here; a Redis older than 6.2 the same way), a bundle refused by a full
    /// process channel and handed back whole to be offered again.
    @Test("a cached bundle is the message sent, by every path (large, many fields, part evicted, COPY refused, full)")
    func cachedBundlesCarryTheMessage() async throws {
        try await withLayer(.redis, capacity: 10) { layer in
            let redis = try #require(layer as? RedisChannelLayer)
            let group = "copied" + ChannelNames.randomLetters(6)
            let (a, b) = try await twoBundleReaders(layer)
            let c = "bundle.c\(ChannelNames.randomLetters(6))!"
            #expect(try await layer.registeredAsBundleReader(c))
            var members: Set<String> = []
            for i in 0..<40 {
                let member = (i % 2 == 0 ? a : b) + "m\(i)"
                try await layer.groupAdd(group, channel: member)
                members.insert(member)
                if i < 3 {
                    try await layer.groupAdd(group, channel: c + "m\(i)")
                    members.insert(c + "m\(i)")
                }
            }
            let connection = try await redis.shared(redis.shardIndex(for: group))
            let cacheKey = redis.groupCacheKey(group)
            var round: Int64 = 0
            func message(fields: Int, large: Bool = false) -> Message {
                round += 1
                var out: Message = ["round": .int(round)]
                for i in 1..<fields { out["f\(i)"] = .string("v\(i)") }
                if large { out["big"] = .string(String(repeating: "x", count: 100_000)) }
                return out
            }
            func received(on lists: [String]) async throws -> [ReceivedMessage] {
                var out: [ReceivedMessage] = []
                for list in lists {
                    while true {
                        let batch = try await layer.receiveBatch(channels: [list], max: 64, timeout: .zero)
                        if batch.isEmpty { break }
                        out += batch
                    }
                }
                return out
            }
            func sendAndCheck(_ sent: Message, through sender: any ChannelLayer, _ what: Comment) async throws {
                try await sender.sendGroup(group, message: sent)
                let got = try await received(on: [a, b, c])
                #expect(Set(got.map(\.channel)) == members && got.count == members.count, what)
                #expect(got.allSatisfy { $0.message == sent }, what)
            }
            func partExists(_ i: Int) async throws -> Bool {
                try await connection.command(["EXISTS", .bytes(cacheKey + Array(":\(i)".utf8))]).integer == 1
            }
            try await sendAndCheck(message(fields: 1), through: layer, "the send that builds the cache")
            let kept = try await (partExists(1), partExists(3))
            #expect(kept.0 && kept.1, "a member list kept per server")
            // The third server's sockets all leave (this layer's discards delete only the hash):
            // the rebuild leaves no member list of it behind.
            for i in 0..<3 {
                try await layer.groupDiscard(group, channel: c + "m\(i)")
                members.remove(c + "m\(i)")
            }
            try await sendAndCheck(message(fields: 1), through: layer, "rebuilt for two servers")
            let after = try await (partExists(2), partExists(3))
            #expect(after.0 && !after.1, "the third server's member list went with its members")
            try await sendAndCheck(message(fields: 1), through: layer, "a copied bundle, one field")
            try await sendAndCheck(message(fields: 20), through: layer, "a copied bundle, 20 fields (a 3-byte map header)")
            try await sendAndCheck(message(fields: 3, large: true), through: layer, "a copied bundle, a 100 KB field")
            try await sendAndCheck(message(fields: 65_535), through: layer, "65,535 fields: no room in a map16 header for one more")
            try await sendAndCheck(message(fields: 65_535), through: layer, "65,535 fields again, the cache in place")
            _ = try await connection.command(["DEL", .bytes(cacheKey + Array(":2".utf8))])
            try await sendAndCheck(message(fields: 2), through: layer, "a member list evicted: the set is read again")
            try await sendAndCheck(message(fields: 2), through: layer, "and cached again")

            // The same cache, through a client Redis refuses COPY to.
            let url = try TestRedis.requireURL()
            let user = "nocopy" + ChannelNames.randomLetters(8)
            let password = ChannelNames.randomLetters(16)
            let created = try await connection.command([
                "ACL", "SETUSER", .text(user), "on", .text(">" + password), "~*", "&*", "+@all", "-copy",
            ])
            guard case .status = created else {
                Issue.record("this Redis has no ACL (older than 6): a refused COPY is not tested")
                return
            }
            var parts = try #require(URLComponents(string: url))
            parts.user = user
            parts.password = password
            var configuration = try RedisChannelLayerConfiguration(urls: [try #require(parts.string)])
            configuration.prefix = redis.configuration.prefix
            configuration.statsPrefix = redis.configuration.statsPrefix
            configuration.capacity = 10
            let refusing = try RedisChannelLayer(configuration: configuration)
            do {
                try await sendAndCheck(message(fields: 20), through: refusing, "COPY refused: the body is made in Lua")
                try await sendAndCheck(message(fields: 1, large: true), through: refusing, "COPY refused, a 100 KB field")
            } catch {
                Issue.record("sends through a client without COPY failed: \(error)")
            }
            await refusing.close()
            _ = try await connection.command(["ACL", "DELUSER", .text(user)])

            // A full process channel refuses its bundle, which comes back whole and is offered
            // again once there is room.
            try await sendAndCheck(message(fields: 1), through: layer, "cached again before the full channel")
            for i in 0..<10 { try await layer.send(["filler": .int(Int64(i))], to: b + "filler") }
            let sent = message(fields: 20)
            let sending = Task { try await layer.sendGroup(group, message: sent) }
            try await Task.sleep(for: .milliseconds(50))
            var fillers = 0
            var early: [ReceivedMessage] = []
            while fillers < 10 {
                let batch = try await layer.receiveBatch(channels: [b], max: 10, timeout: .seconds(1))
                if batch.isEmpty { break }
                fillers += batch.filter { $0.message["filler"] != nil }.count
                early += batch.filter { $0.message["filler"] == nil }
            }
            #expect(fillers == 10)
            try await sending.value
            let got = try await early + received(on: [a, b])
            #expect(redis.groupSendsHeldBack > 0, "the bundle was refused and offered again")
            #expect(Set(got.map(\.channel)) == members && got.count == members.count, "every member, after the wait for room")
            #expect(got.allSatisfy { $0.message == sent }, "the bundle handed back is the message")
        }
    }

    @Test("a registration that disappears (Redis lost its data) is reported; the first one is not")
    func registrationLoss() async throws {
        try await withLayer(.redis) { layer in
            let process = "bundle.loss\(ChannelNames.randomLetters(6))!"
            #expect(try await layer.registeredAsBundleReader(process), "a first registration is not a loss")
            #expect(try await layer.registeredAsBundleReader(process), "a renewal of a present registration")
            try await layer.flush()
            #expect(try await layer.registeredAsBundleReader(process) == false, "the key was gone: data lost")
            #expect(try await layer.registeredAsBundleReader(process), "registered again")
        }
    }

    @Test("a registration evicted alone (the Redis kept its data) is registered again, not a loss")
    func registrationEvicted() async throws {
        try await withLayer(.redis) { layer in
            let redis = try #require(layer as? RedisChannelLayer)
            let process = "bundle.evict\(ChannelNames.randomLetters(6))!"
            #expect(try await layer.registeredAsBundleReader(process))
            // Only this server's key goes (maxmemory with allkeys-lru would do this).
            let connection = try await redis.shared(redis.shardIndex(for: process))
            _ = try await connection.command(["DEL", .bytes(redis.statKey(process, "reader"))])
            #expect(try await layer.registeredAsBundleReader(process), "one key evicted is not the data lost")
            // The data lost and the birth mark made again by another server: a loss.
            _ = try await connection.command(["DEL", .bytes(redis.statKey(process, "reader"))])
            _ = try await connection.command(["SET", .bytes(redis.key("born")), "another"])
            #expect(try await layer.registeredAsBundleReader(process) == false, "a new birth mark: the Redis lost its data")
        }
    }

    @Test("the birth mark evicted too, by a Redis that evicted keys and did not restart: registered again, not a loss")
    func birthMarkEvicted() async throws {
        try await withLayer(.redis) { layer in
            let redis = try #require(layer as? RedisChannelLayer)
            let process = "bundle.born\(ChannelNames.randomLetters(6))!"
            let shard = redis.shardIndex(for: process)
            #expect(try await layer.registeredAsBundleReader(process))
            #expect(redis.redisLives.withLock { $0[shard] } != nil, "INFO gave a run id, an evicted-key count and flushes")
            let connection = try await redis.shared(shard)
            func evictBoth() async throws {
                _ = try await connection.command(["DEL", .bytes(redis.statKey(process, "reader")), .bytes(redis.key("born"))])
            }
            // The last registration's view, made up from what Redis says now (the test's Redis
            // evicts nothing; read just before, so another suite's FLUSHDB does not slip in).
            func lastSeen(runID: String? = nil, evictedLess: Int64, flushesLess: Int64) async throws {
                let now = try #require(await redis.redisLife(shard))
                redis.redisLives.withLock {
                    $0[shard] = .init(
                        runID: runID ?? now.runID, evictedKeys: now.evictedKeys - evictedLess, flushes: now.flushes - flushesLess)
                }
            }
            // The same run id and a higher count now: keys evicted, not the data lost.
            try await lastSeen(evictedLess: 1, flushesLess: 0)
            try await evictBoth()
            #expect(try await layer.registeredAsBundleReader(process), "keys evicted by the same Redis: not the data lost")
            // A flush meanwhile (FLUSHALL on a Redis that also evicts) is a loss whatever was evicted.
            try await lastSeen(evictedLess: 1, flushesLess: 1)
            try await evictBoth()
            #expect(try await layer.registeredAsBundleReader(process) == false, "a flush while evicting: the data lost")
            // No eviction since: both keys gone means deleted or flushed, a loss.
            try await lastSeen(evictedLess: 0, flushesLess: 0)
            try await evictBoth()
            #expect(try await layer.registeredAsBundleReader(process) == false, "nothing evicted since: the data lost")
            // Another run id (a restart) is a loss whatever the count says.
            try await lastSeen(runID: "another run", evictedLess: 1, flushesLess: 0)
            try await evictBoth()
            #expect(try await layer.registeredAsBundleReader(process) == false, "a restarted Redis: the data lost")
        }
    }

    @Test(
        "a full process channel holds a group send back until its reader catches up: nothing is dropped",
        arguments: LayerKind.allCases)
    func fullProcessChannelHoldsTheSendBack(kind: LayerKind) async throws {
        let layer = try makeLayer(kind, capacity: 2)
        defer {
            Task {
                try? await layer.flush()
                await layer.close()
            }
        }
        func held() -> Int {
            (layer as? RedisChannelLayer)?.groupSendsHeldBack ?? (layer as? InMemoryChannelLayer)?.groupSendsHeldBack ?? 0
        }
        func missed() -> Int {
            (layer as? RedisChannelLayer)?.groupMembersMissed ?? (layer as? InMemoryChannelLayer)?.groupMembersMissed ?? -1
        }
        let process = "held.reader\(ChannelNames.randomLetters(6))!"
        _ = try await layer.registeredAsBundleReader(process)
        let members = (0..<3).map { process + "m\($0)" }
        for member in members { try await layer.groupAdd("held", channel: member) }
        // Two bundles fill the process channel (capacity 2); the third send waits for room.
        for n in 0..<2 { try await layer.sendGroup("held", message: ["n": .int(Int64(n))]) }
        let third = Task { try await layer.sendGroup("held", message: ["n": 2]) }
        for _ in 0..<500 where held() == 0 { try await Task.sleep(for: .milliseconds(10)) }
        #expect(held() > 0, "the third send was refused and is being offered again")
        // The reader catches up: the held send gets in, and every member gets 0, 1, 2 in order.
        var got: [String: [Int64]] = [:]
        for _ in 0..<200 where got.values.reduce(0, { $0 + $1.count }) < 9 {
            for received in try await layer.receiveBatch(channels: [process], max: 64, timeout: .milliseconds(50)) {
                got[received.channel, default: []].append(received.message["n"]?.intValue ?? -1)
            }
        }
        try await third.value
        #expect(Set(got.keys) == Set(members) && got.values.allSatisfy { $0 == [0, 1, 2] }, "\(got)")
        #expect(missed() == 0)
    }

    @Test("a process channel that stays full is dropped after the wait (counted), then skipped without waiting")
    func processChannelThatStaysFullIsDroppedThenSkipped() async throws {
        var configuration = try RedisChannelLayerConfiguration(urls: [try TestRedis.requireURL()])
        configuration.prefix = TestRedis.uniquePrefix()
        configuration.capacity = 1
        configuration.groupFullWait = .milliseconds(200)
        let layer = try RedisChannelLayer(configuration: configuration)
        defer {
            Task {
                try? await layer.flush()
                await layer.close()
            }
        }
        let process = "stuck.reader\(ChannelNames.randomLetters(6))!"
        _ = try await layer.registeredAsBundleReader(process)
        for i in 0..<3 { try await layer.groupAdd("stuck", channel: process + "m\(i)") }
        try await layer.groupAdd("stuck", channel: "plain.member")
        try await layer.sendGroup("stuck", message: ["n": 0])
        // Nobody reads: the second send waits out its 200 ms, then drops the server's share.
        try await layer.sendGroup("stuck", message: ["n": 1])
        let held = layer.groupSendsHeldBack
        #expect(held > 0 && layer.groupMembersMissed == 3 + 1, "3 bundled members, and the full plain member at once")
        // Within the next 10 s the stuck channel is skipped at once: no new offers.
        try await layer.sendGroup("stuck", message: ["n": 2])
        #expect(layer.groupSendsHeldBack == held && layer.groupMembersMissed == 8)
        // What got in is intact: the first bundle, to all three members.
        let first = try await layer.receiveBatch(channels: [process], max: 64, timeout: .zero)
        #expect(first.count == 3 && first.allSatisfy { $0.message["n"]?.intValue == 0 })
    }
}
