import ASGI
import Foundation
import OrderedCollections
import Synchronization
import TestSupport
import Testing

@testable import RedisChannelLayer

/// Group history (offsets, epochs, retention) and presence (users over connections, expiry,
/// sweep) on both layers, through their public protocols.
@Suite("history and presence on both layers", .serialized, .timeLimit(.minutes(2)))
struct HistoryPresenceTests {
    private func history(_ layer: any ChannelLayer) throws -> any ChannelLayerHistory {
        try #require(layer as? any ChannelLayerHistory)
    }

    private func presence(_ layer: any ChannelLayer) throws -> any ChannelLayerPresence {
        try #require(layer as? any ChannelLayerPresence)
    }

    @Test("offsets count from 1 in one epoch; a read after a position returns the rest in order, complete", arguments: LayerKind.allCases)
    func offsetsAndReads(_ kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            let history = try history(layer)
            let keep = HistoryRetention(size: 100, ttl: .seconds(60))
            var positions: [StreamPosition] = []
            for i in 1...10 {
                positions.append(try await history.historyAppend("room", message: ["data": .string("{\"n\":\(i)}")], retention: keep))
            }
            #expect(positions.map(\.offset) == Array(1...10))
            #expect(Set(positions.map(\.epoch)).count == 1)
            let epoch = positions[0].epoch
            let slice = try await history.historyRead("room", after: StreamPosition(offset: 4, epoch: epoch), retention: keep)
            #expect(slice.entries.map(\.offset) == Array(5...10))
            #expect(slice.entries.map { $0.message["data"]?.stringValue } == (5...10).map { "{\"n\":\($0)}" })
            #expect(slice.complete && slice.top == StreamPosition(offset: 10, epoch: epoch))
            let atTop = try await history.historyRead("room", after: slice.top, retention: keep)
            #expect(atTop.entries.isEmpty && atTop.complete)
            let topOnly = try await history.historyRead("room", after: nil, retention: keep)
            #expect(topOnly.entries.isEmpty && topOnly.top.offset == 10)
            // Another group has its own offsets.
            #expect(try await history.historyAppend("other", message: ["data": .string("{}")], retention: keep).offset == 1)
        }
    }

    @Test("a gap older than the retention, a wrong epoch, a position ahead: incomplete", arguments: LayerKind.allCases)
    func incompleteReads(_ kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            let history = try history(layer)
            let keep = HistoryRetention(size: 5, ttl: .seconds(60))
            var last = StreamPosition(offset: 0, epoch: "")
            for i in 1...300 { last = try await history.historyAppend("small", message: ["data": .string("\(i)")], retention: keep) }
            let slice = try await history.historyRead("small", after: StreamPosition(offset: 2, epoch: last.epoch), retention: keep)
            #expect(!slice.complete)
            // Redis trims approximately (MAXLEN ~): at least the last 5 are kept, in order.
            #expect(slice.entries.count >= 5 && slice.entries.last?.offset == 300)
            #expect(slice.entries.map(\.offset) == slice.entries.map(\.offset).sorted())
            #expect(slice.entries.count < 300)
            let wrongEpoch = try await history.historyRead("small", after: StreamPosition(offset: 299, epoch: "zzz"), retention: keep)
            #expect(!wrongEpoch.complete && wrongEpoch.entries.isEmpty && wrongEpoch.top == last)
            let ahead = try await history.historyRead("small", after: StreamPosition(offset: 301, epoch: last.epoch), retention: keep)
            #expect(!ahead.complete)
        }
    }

    @Test("messages past the history's ttl are gone: a read over them is incomplete", arguments: LayerKind.allCases)
    func ttl(_ kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            let history = try history(layer)
            // A ttl of 3 s: "new" is read well within it even on a loaded CI machine (with 1 s, a
            // read delayed past a second found the whole stream expired, rightly).
            let keep = HistoryRetention(size: 100, ttl: .seconds(3))
            let first = try await history.historyAppend("brief", message: ["data": .string("old")], retention: keep)
            try await Task.sleep(for: .milliseconds(3300))
            _ = try await history.historyAppend("brief", message: ["data": .string("new")], retention: keep)
            let appended = ContinuousClock.now
            let slice = try await history.historyRead("brief", after: StreamPosition(offset: 0, epoch: first.epoch), retention: keep)
            let data = slice.entries.map { $0.message["data"]?.stringValue }
            #expect(!data.contains("old"))
            if ContinuousClock.now - appended < .seconds(3) {
                #expect(data == ["new"])
            } else {
                print("ttl test: the read came \(ContinuousClock.now - appended) after the append; \"new\" may have expired too")
            }
            #expect(!slice.complete)
        }
    }

    @Test("a flushed layer starts a new epoch", arguments: LayerKind.allCases)
    func flushNewEpoch(_ kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            let history = try history(layer)
            let keep = HistoryRetention(size: 10, ttl: .seconds(60))
            let before = try await history.historyAppend("g", message: ["data": .string("{}")], retention: keep)
            try await layer.flush()
            let slice = try await history.historyRead("g", after: before, retention: keep)
            #expect(!slice.complete && slice.top.epoch != before.epoch && slice.top.offset == 0)
            #expect(try await history.historyAppend("g", message: ["data": .string("{}")], retention: keep).epoch == slice.top.epoch)
        }
    }

    @Test("encrypted history: Redis holds Fernet tokens, the read decrypts")
    func encryptedHistory() async throws {
        var configuration = try RedisChannelLayerConfiguration(urls: [try TestRedis.requireURL()])
        configuration.prefix = TestRedis.uniquePrefix()
        configuration.symmetricEncryptionKeys = ["history-key-" + ChannelNames.randomLetters(8)]
        let layer = try RedisChannelLayer(configuration: configuration)
        defer {
            Task {
                try? await layer.flush(); await layer.close()
            }
        }
        let keep = HistoryRetention(size: 10, ttl: .seconds(60))
        let secret = "{\"text\":\"the plans\"}"
        let position = try await layer.historyAppend("enc", message: ["data": .string(secret)], retention: keep)
        let raw = try HiredisConnection(
            endpoint: configuration.hosts[0], connectTimeout: .seconds(1), commandTimeout: .seconds(2))
        let stored = try raw.command(["XRANGE", configuration.prefix + "history:enc", "-", "+"])
        let fields = try #require(stored.array?.first?.array?.last?.array)
        let body = try #require(fields[1].bytes)
        #expect(body.starts(with: Array("gAAAAA".utf8)))
        #expect(!String(decoding: body, as: UTF8.self).contains("plans"))
        let slice = try await layer.historyRead("enc", after: StreamPosition(offset: 0, epoch: position.epoch), retention: keep)
        #expect(slice.entries.map { $0.message["data"]?.stringValue } == [secret] && slice.complete)
    }

    /// An append whose reply was lost (Redis restarted after running it) is tried again under
    /// the same id: the script answers the offset it took, and the history holds it once. Run
    /// here as the retry runs it, the script twice with one id.
    @Test("Redis: an append tried again under its id takes one offset; another id, or a new epoch, appends")
    func anAppendTriedAgainTakesOneOffset() async throws {
        var configuration = try RedisChannelLayerConfiguration(urls: [try TestRedis.requireURL()])
        configuration.prefix = TestRedis.uniquePrefix()
        let layer = try RedisChannelLayer(configuration: configuration)
        defer {
            Task {
                try? await layer.flush(); await layer.close()
            }
        }
        let keep = HistoryRetention(size: 10, ttl: .seconds(60))
        func append(id: String, epoch: String = "e1") async throws -> [RedisReply] {
            let reply = try await layer.pipelined(
                0, Scripts.historyAppend,
                keys: [
                    .text(configuration.prefix + "history-meta:g"), .text(configuration.prefix + "history:g"),
                    .text(configuration.prefix + "history-ids:g"),
                ],
                args: [
                    .text(epoch), .bytes(layer.seal(["data": "{}"])), .integer(10), .integer(60), .integer(86400),
                    .text(String(Int(Date().timeIntervalSince1970))), .text(id),
                ])
            return try #require(reply.array)
        }
        #expect(try await append(id: "a").first?.countValue == 1)
        #expect(try await append(id: "a").first?.countValue == 1, "the same id took a second offset")
        #expect(try await append(id: "b").first?.countValue == 2)
        let slice = try await layer.historyRead("g", after: StreamPosition(offset: 0, epoch: "e1"), retention: keep)
        #expect(slice.entries.map(\.offset) == [1, 2], "the history holds each append once")
        // The history lost (a Redis that restarted empty): the same id appends in the new epoch.
        let raw = try HiredisConnection(endpoint: configuration.hosts[0], connectTimeout: .seconds(1), commandTimeout: .seconds(2))
        _ = try raw.command(["DEL", configuration.prefix + "history-meta:g"])
        let again = try await append(id: "a", epoch: "e2")
        #expect(again.first?.countValue == 1 && again.last?.text == "e2", "\(again)")
        #expect(try await layer.historyAppend("g", message: ["data": "{}"], retention: keep).offset == 2)
    }

    /// A publication on Redis is one script (the history append and the group send): the
    /// members get exactly the message the two steps send (`PublicationText.message`), for
    /// every shape of data and every way a member is reached (its own channel, a process
    /// channel per member, a bundle of a registered reader, from the group's cache too).
    @Test("Redis: a publication in one script sends what the two steps send, and counts one round trip")
    func aPublicationInOneScript() async throws {
        try await withLayer(.redis, capacity: 100, maxMessageSize: 1 << 20) { layer in
            let redis = try #require(layer as? RedisChannelLayer)
            let keep = HistoryRetention(size: 100, ttl: .seconds(60))
            let bundled = "pub.bundle\(ChannelNames.randomLetters(6))!"
            _ = try await layer.registeredAsBundleReader(bundled)
            // 40 members: the group's split is cached after the first send and read after.
            for i in 0..<37 { try await layer.groupAdd("pubs", channel: bundled + "m\(i)") }
            for name in ["plain1", "pub.single!a", "pub.single!b"] { try await layer.groupAdd("pubs", channel: name) }
            let shapes = [
                "{\"a\":1}", "  { \"a\" : 1 }", "{}", "{ }", "\"a string\"", "[1,2]", "{\"t\":\"ünïcødé ✓ \\u0000\"}",
                "{\"pad\":\"" + String(repeating: "x", count: 300) + "\"}",
                "{\"pad\":\"" + String(repeating: "y", count: 70_000) + "\"}",
            ]
            var offsets: [UInt64] = []
            for data in shapes {
                let position = try #require(try await redis.historyPublish("pubs", data: data, retention: keep))
                offsets.append(position.offset)
                let expected = PublicationText.message(group: "pubs", data: data, position: position)
                let plain = try #require(try await layer.receive(channels: ["plain1"], timeout: .seconds(2)))
                #expect(plain.message == expected, "\(data.prefix(40))")
                var singles: [String] = []
                while let one = try await layer.receive(channels: ["pub.single!"], timeout: .zero) {
                    #expect(one.message == expected)
                    singles.append(one.channel)
                }
                #expect(singles.sorted() == ["pub.single!a", "pub.single!b"])
                var members = 0
                while let one = try await layer.receive(channels: [bundled], timeout: .zero) {
                    #expect(one.message == expected)
                    members += 1
                }
                #expect(members == 37, "\(data.prefix(40))")
            }
            #expect(offsets == Array(1...UInt64(shapes.count)))
            let slice = try await redis.historyRead("pubs", after: StreamPosition(offset: 0, epoch: "none"), retention: keep)
            let all = try await redis.historyRead("pubs", after: StreamPosition(offset: 0, epoch: slice.top.epoch), retention: keep)
            #expect(all.entries.map { $0.message } == shapes.map { ["data": .string($0)] })
            // One script a publication, where the two steps made two.
            let raw = try HiredisConnection(
                endpoint: redis.configuration.hosts[0], connectTimeout: .seconds(1), commandTimeout: .seconds(2))
            func scriptCalls() throws -> Int {
                let info = try raw.command(["INFO", "commandstats"]).text ?? ""
                return info.split(whereSeparator: \.isNewline).filter { $0.hasPrefix("cmdstat_evalsha:") || $0.hasPrefix("cmdstat_eval:") }
                    .compactMap { line in line.split(separator: "=").dropFirst().first?.split(separator: ",").first.flatMap { Int($0) } }
                    .reduce(0, +)
            }
            let before = try scriptCalls()
            _ = try #require(try await redis.historyPublish("pubs", data: "{}", retention: keep))
            #expect(try scriptCalls() - before == 1)
            _ = try #require(try await layer.receive(channels: ["plain1"], timeout: .seconds(2)))
            // Offsets of every msgpack width (one byte, 8, 16, 32 and 64 bits) in the message made by Lua.
            for next: UInt64 in [200, 300, 70_000, 5_000_000_000] {
                _ = try raw.command(["HSET", redis.configuration.prefix + "history-meta:pubs", "offset", String(next - 1)])
                let position = try #require(try await redis.historyPublish("pubs", data: "{\"w\":1}", retention: keep))
                #expect(position.offset == next)
                let plain = try #require(try await layer.receive(channels: ["plain1"], timeout: .seconds(2)))
                #expect(plain.message == PublicationText.message(group: "pubs", data: "{\"w\":1}", position: position))
            }
        }
    }

    /// A publication tried again after its reply was lost runs the script again under the same
    /// id: the history holds it once, at one offset, and the members get a second copy at that
    /// offset (which their servers drop as seen).
    @Test("Redis: a publication tried again under its id takes one offset and sends it again")
    func aPublicationTriedAgainTakesOneOffset() async throws {
        try await withLayer(.redis) { layer in
            let redis = try #require(layer as? RedisChannelLayer)
            let keep = HistoryRetention(size: 10, ttl: .seconds(60))
            try await layer.groupAdd("again", channel: "member")
            let entry = redis.seal(["data": "{\"n\":1}"])
            let tail = PublicationText.tail(data: "{\"n\":1}")
            let first = try await redis.publish("again", entry: entry, tail: tail, retention: keep, id: "same")
            let second = try await redis.publish("again", entry: entry, tail: tail, retention: keep, id: "same")
            #expect(first == second && first.offset == 1)
            let third = try await redis.publish("again", entry: entry, tail: tail, retention: keep, id: "other")
            #expect(third.offset == 2 && third.epoch == first.epoch)
            var got: [ASGIValue?] = []
            while let one = try await layer.receive(channels: ["member"], timeout: .zero) {
                got.append(one.message["publication"]?.mapValue?["offset"])
            }
            #expect(got == [.int(1), .int(1), .int(2)])
            let slice = try await redis.historyRead("again", after: StreamPosition(offset: 0, epoch: first.epoch), retention: keep)
            #expect(slice.entries.map(\.offset) == [1, 2])
        }
    }

    /// A publication too large for the layer is refused with `messageTooLarge` before anything
    /// is stored: no history entry, nothing sent, the offset not taken; the next one is 1.
    @Test("Redis: a publication past the message size limit is refused whole, and the next takes offset 1")
    func aPublicationTooLargeIsRefusedWhole() async throws {
        try await withLayer(.redis, maxMessageSize: 4096) { layer in
            let redis = try #require(layer as? RedisChannelLayer)
            let keep = HistoryRetention(size: 10, ttl: .seconds(60))
            try await layer.groupAdd("big", channel: "member")
            for size in [4_000, 5_000, 100_000] {
                await #expect {
                    _ = try await redis.historyPublish(
                        "big", data: "{\"pad\":\"" + String(repeating: "z", count: size) + "\"}", retention: keep)
                } throws: { error in
                    (error as? ChannelLayerError)?.code == .messageTooLarge
                }
            }
            #expect(try await layer.receive(channels: ["member"], timeout: .zero) == nil, "a refused publication reached a member")
            let position = try #require(try await redis.historyPublish("big", data: "{}", retention: keep))
            #expect(position.offset == 1)
            let slice = try await redis.historyRead("big", after: StreamPosition(offset: 0, epoch: position.epoch), retention: keep)
            #expect(slice.entries.map(\.offset) == [1])
        }
    }

    @Test("a layer that cannot publish in one step says so, and Group.publish appends and sends", arguments: LayerKind.allCases)
    func publishFallsBackToTwoSteps(_ kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            let history = try history(layer)
            let keep = HistoryRetention(size: 10, ttl: .seconds(60))
            let oneStep = try await history.historyPublish("fallback", data: "{}", retention: keep)
            #expect((oneStep != nil) == (kind == .redis))
            let metered = MeteredChannelLayer(layer)
            let throughMeter = try await metered.historyPublish("fallback", data: "{}", retention: keep)
            #expect((throughMeter != nil) == (kind == .redis))
        }
    }

    @Test("followers missing from a group's member set are added back, once; a removal undoes it", arguments: LayerKind.allCases)
    func groupRestore(_ kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            let history = try history(layer)
            for channel in ["ra", "rb"] { try await layer.groupAdd("kept", channel: channel) }
            // All there: nothing added. A follower that is missing is added (a socket that
            // follows a group is its member while it follows).
            #expect(try await history.groupRestore("kept", channels: ["ra", "rb"]) == [])
            #expect(try await history.groupRestore("kept", channels: ["ra", "rb", "rc"]) == ["rc"])
            #expect(try await layer.groupChannels("kept").sorted() == ["ra", "rb", "rc"])
            // The set gone (every member discarded here; an eviction in Redis): back with the followers named.
            for channel in ["ra", "rb", "rc"] { try await layer.groupDiscard("kept", channel: channel) }
            #expect(try await history.groupRestore("kept", channels: ["ra", "rb"]).sorted() == ["ra", "rb"])
            try await layer.sendGroup("kept", message: ["text": "back"])
            for channel in ["ra", "rb"] {
                #expect(try await layer.receive(channels: [channel], timeout: .seconds(1))?.message["text"]?.stringValue == "back")
            }
            try await history.groupRemove("kept", channels: ["rb"])
            #expect(try await layer.groupChannels("kept") == ["ra"])
        }
    }

    @Test("Redis: an evicted group set that a new member re-created first still gets every server's followers back")
    func groupRestoreAcrossServers() async throws {
        try await withLayer(.redis) { layer in
            let redis = try #require(layer as? RedisChannelLayer)
            for channel in ["a!1", "b!1"] { try await redis.groupAdd("evicted", channel: channel) }
            let raw = try HiredisConnection(
                endpoint: redis.configuration.hosts[0], connectTimeout: .seconds(1), commandTimeout: .seconds(2))
            #expect(try raw.command(["DEL", redis.configuration.prefix + ":group:evicted"]).integer == 1)
            // A socket joins before any server checks: the set exists again, with it alone.
            try await redis.groupAdd("evicted", channel: "c!1")
            // Server A and, any time later, server B each add their follower back.
            #expect(try await redis.groupRestore("evicted", channels: ["a!1"]) == ["a!1"])
            #expect(try await redis.groupRestore("evicted", channels: ["b!1"]) == ["b!1"])
            #expect(try await redis.groupChannels("evicted").sorted() == ["a!1", "b!1", "c!1"])
            #expect(try await redis.groupRestore("evicted", channels: ["a!1", "b!1"]) == [])
        }
    }

    @Test(
        "Redis: the group journal puts back memberships no server follows, forgets closed sockets', outlives its own eviction, never undoes a discard"
    )
    func groupJournal() async throws {
        try await withLayer(.redis) { layer in
            let redis = try #require(layer as? RedisChannelLayer)
            let server = "srv.journal!"
            let open = Mutex<Set<String>>([server + "a", server + "b", server + "c"])
            let isOpen: @Sendable (String) -> Bool = { name in open.withLock { $0.contains(name) } }
            let raw = try HiredisConnection(
                endpoint: redis.configuration.hosts[0], connectTimeout: .seconds(1), commandTimeout: .seconds(2))
            let prefix = redis.configuration.prefix
            func restored(_ check: GroupCheck) -> Set<String> { Set(check.restored.map { "\($0.group) \($0.channel)" }) }
            // A worker's consumers put the sockets in groups with plain adds: nobody follows them.
            try await redis.groupAdd("user-alice", channel: server + "a")
            try await redis.groupAdd("user-bob", channel: server + "b")
            try await redis.groupAdd("user-bob", channel: server + "c")
            try await redis.groupAdd("user-carol", channel: server + "c")
            try await redis.groupDiscard("user-carol", channel: server + "c")
            try await redis.groupAdd("plain", channel: "not-a-socket")
            // The journal expires with the adds' group_expiry; each check renews it, so it
            // outlives the group sets it can put back (they expire a day after their last add).
            _ = try raw.command(["EXPIRE", prefix + ":journal:" + server, "5"])
            var check = try await redis.groupCheck(processChannel: server, followers: [:], isOpen: isOpen)
            #expect(check.restored.isEmpty && check.failures.isEmpty && check.forgotten == 0)
            #expect(try raw.command(["TTL", prefix + ":journal:" + server]).integer ?? 0 > 5, "renewed by the check")

            // Both sets evicted, and a followed room's too: all put back; the discarded one not.
            for group in ["user-alice", "user-bob"] { _ = try raw.command(["DEL", prefix + ":group:" + group]) }
            check = try await redis.groupCheck(processChannel: server, followers: ["room": [server + "a"]], isOpen: isOpen)
            #expect(
                restored(check) == ["user-alice srv.journal!a", "user-bob srv.journal!b", "user-bob srv.journal!c", "room srv.journal!a"])
            #expect(check.restored.filter(\.followed).map(\.group) == ["room"])
            #expect(try await redis.groupChannels("user-bob").sorted() == [server + "b", server + "c"])
            #expect(try await redis.groupChannels("user-carol") == [])
            try await redis.sendGroup("user-alice", message: ["text": "back"])
            #expect(try await redis.receive(channels: [server], timeout: .seconds(1))?.message["text"]?.stringValue == "back")

            // c closes, and b is discarded from user-bob after this pass saw it; then the
            // journal itself is evicted. It is written again from the last pass's view, but only
            // with what the group sets still hold: alice's entry; b's discard is not undone.
            _ = open.withLock { $0.remove(server + "c") }
            try await redis.groupDiscard("user-bob", channel: server + "b")
            _ = try raw.command(["DEL", prefix + ":journal:" + server])
            check = try await redis.groupCheck(processChannel: server, followers: [:], isOpen: isOpen)
            #expect(check.journalRewritten == 1 && check.journalLost == 1, "\(check)")
            #expect(check.lost == [GroupMembership(group: "user-bob", channel: server + "b")], "told, not silent")
            #expect(check.restored.isEmpty)
            #expect(try await redis.groupChannels("user-bob") == [server + "c"], "b's discard stands")
            let journal = try raw.command(["HKEYS", prefix + ":journal:" + server]).array?.compactMap(\.text).sorted()
            #expect(journal == ["user-alice srv.journal!a", "~"])
            // With the journal back, an eviction of alice's set is healed again.
            _ = try raw.command(["DEL", prefix + ":group:user-alice"])
            check = try await redis.groupCheck(processChannel: server, followers: [:], isOpen: isOpen)
            #expect(restored(check) == ["user-alice srv.journal!a"])

            // A membership of a socket that is not open here is dropped from the journal, not put back.
            try await redis.groupAdd("user-dave", channel: server + "d")
            _ = try raw.command(["DEL", prefix + ":group:user-dave"])
            check = try await redis.groupCheck(processChannel: server, followers: [:], isOpen: isOpen)
            #expect(check.restored.isEmpty && check.forgotten == 1 && check.journalRewritten == 0)
            #expect(try raw.command(["HEXISTS", prefix + ":journal:" + server, "user-dave srv.journal!d"]).integer == 0)

            // Bad input in the journal (another writer's garbage, an entry no key opens): dropped
            // and counted as forgotten, the check goes on, nothing else is touched.
            _ = try raw.command(["HSET", prefix + ":journal:" + server, "no-space-here", "", "user-alice", "x"])
            check = try await redis.groupCheck(processChannel: server, followers: [:], isOpen: isOpen)
            #expect(check.forgotten == 2 && check.failures.isEmpty && check.restored.isEmpty, "\(check)")
            let left = try raw.command(["HKEYS", prefix + ":journal:" + server]).array?.compactMap(\.text).sorted()
            #expect(left == ["user-alice srv.journal!a", "~"])

            // The set and the journal both evicted between two checks: nothing can put alice
            // back, and the check names the membership so her server can tell her socket.
            for key in [":group:user-alice", ":journal:" + server] { _ = try raw.command(["DEL", prefix + key]) }
            check = try await redis.groupCheck(processChannel: server, followers: [:], isOpen: isOpen)
            #expect(check.restored.isEmpty && check.journalLost == 1 && check.journalRewritten == 0, "\(check)")
            #expect(check.lost == [GroupMembership(group: "user-alice", channel: server + "a")])
        }
    }

    /// The layer tells a bundle-reading server of every add and discard of its sockets, in
    /// the order the sets changed, so the server's own view holds a join made after its
    /// keeper's last pass: when the journal and the group's set are evicted together before
    /// the next pass, that view puts the membership back (before it, nothing could: the check
    /// only knew the journal's last view, and the socket stayed out of its group in silence).
    @Test(
        "Redis: membership notices reach the socket's server in order; with set and journal evicted, a join made after the last check is put back from the server's view"
    )
    func membershipNoticesHealWhatTheJournalLost() async throws {
        try await withLayer(.redis, capacity: 2) { layer in
            let redis = try #require(layer as? RedisChannelLayer)
            let server = "srv.notice\(ChannelNames.randomLetters(6))!"
            #expect(try await redis.registeredAsBundleReader(server))
            let raw = try HiredisConnection(
                endpoint: redis.configuration.hosts[0], connectTimeout: .seconds(1), commandTimeout: .seconds(2))
            let prefix = redis.configuration.prefix
            let open: Set<String> = [server + "a", server + "b"]
            let isOpen: @Sendable (String) -> Bool = { open.contains($0) }
            var view: [String: Set<String>] = [:]  // group → sockets, as the server's router keeps it
            /// Reads the notices waiting on the server's process channel into `view`; returns them.
            func readNotices() async throws -> [String] {
                var seen: [String] = []
                while true {
                    let batch = try await redis.receiveMembershipNotices(processChannel: server, max: 64, timeout: .zero)
                    if batch.isEmpty { return seen }
                    for notice in batch {
                        let group = notice["group"]?.stringValue ?? "?"
                        let channel = notice["channel"]?.stringValue ?? "?"
                        let joined = notice["joined"] == .bool(true)
                        seen.append("\(joined ? "+" : "-")\(group) \(channel)")
                        if joined { view[group, default: []].insert(channel) } else { view[group]?.remove(channel) }
                    }
                }
            }
            func snapshot() -> [String: [String]] { view.mapValues { $0.sorted() } }
            // Three or more notices on a layer of capacity 2: notices take no capacity check, and
            // none of the process channel's (its replies' room).
            try await redis.groupAdd("room", channel: server + "a")
            try await redis.groupAdd("room2", channel: server + "a")
            try await redis.groupDiscard("room2", channel: server + "a")
            try await redis.groupAdd("plain", channel: "not-a-socket")
            try await redis.groupAdd("room", channel: "other.proc!z")  // a server that reads no bundles
            #expect(
                try await readNotices() == ["+room \(server)a", "+room2 \(server)a", "-room2 \(server)a"],
                "one notice per change of this server's sockets, in order; none for others")
            #expect(try await redis.channelStatistics(server).messagesPending == 0, "nothing on the process channel")
            var check = try await redis.groupCheck(processChannel: server, followers: [:], memberships: snapshot(), isOpen: isOpen)
            #expect(check.restored.isEmpty && check.failures.isEmpty)

            // b joins after that pass; then b's set, a's set and the journal are all evicted.
            try await redis.groupAdd("late", channel: server + "b")
            #expect(try await readNotices() == ["+late \(server)b"])
            for key in [":group:late", ":group:room", ":journal:" + server] { _ = try raw.command(["DEL", prefix + key]) }
            // Without the server's view, b cannot be put back (the gap this closes) and a is
            // only told about; with it, both are put back.
            check = try await redis.groupCheck(processChannel: server, followers: [:], memberships: snapshot(), isOpen: isOpen)
            #expect(Set(check.restored.map { "\($0.group) \($0.channel)" }) == ["late \(server)b", "room \(server)a"], "\(check)")
            #expect(check.restored.allSatisfy(\.fromServerView) && check.lost.isEmpty, "\(check)")
            #expect(try await redis.groupChannels("late") == [server + "b"])
            #expect(try await redis.groupChannels("room").contains(server + "a"))

            // While the journal is gone, the view is what counts: a discard it was told of stands.
            try await redis.groupDiscard("late", channel: server + "b")
            #expect(try await readNotices() == ["-late \(server)b"])
            check = try await redis.groupCheck(processChannel: server, followers: [:], memberships: snapshot(), isOpen: isOpen)
            #expect(check.restored.isEmpty, "\(check)")
            #expect(try await redis.groupChannels("late") == [])
            // The next join writes the journal again, and from then on the journal counts: a
            // view that missed a discard (a notice lost) does not undo it.
            try await redis.groupAdd("other", channel: server + "a")
            #expect(try await readNotices() == ["+other \(server)a"])
            check = try await redis.groupCheck(
                processChannel: server, followers: [:], memberships: ["late": [server + "b"]], isOpen: isOpen)
            #expect(check.restored.isEmpty, "a discard is not undone from a stale view while the journal stands: \(check)")
            #expect(try await redis.groupChannels("late") == [])
        }
    }

    /// A notice goes in one script with the set change, so only where the group and the
    /// socket's process channel share a shard; across shards the journal alone keeps the
    /// membership (a notice in another round trip could reach the server in another order than
    /// the set changed, and put a socket back into a group it left).
    @Test("Redis, two shards: a notice only where the group and the socket's server share a shard")
    func noNoticeAcrossShards() async throws {
        let first = try await RedisServer.launch()
        let second = try await RedisServer.launch()
        defer {
            Task {
                await first.shutdown()
                await second.shutdown()
            }
        }
        var configuration = try RedisChannelLayerConfiguration(urls: [first.url, second.url])
        configuration.prefix = TestRedis.uniquePrefix()
        let redis = try RedisChannelLayer(configuration: configuration)
        let group = "sharded" + ChannelNames.randomLetters(6)
        var same: String?, other: String?
        while same == nil || other == nil {
            let process = "srv.shard\(ChannelNames.randomLetters(8))!"
            if redis.sendShard(for: process) == redis.shardIndex(for: group) { same = same ?? process } else { other = other ?? process }
        }
        let (near, far) = (same!, other!)
        #expect(try await redis.registeredAsBundleReader(near))
        #expect(try await redis.registeredAsBundleReader(far))
        try await redis.groupAdd(group, channel: near + "a")
        try await redis.groupAdd(group, channel: far + "b")
        try await redis.groupDiscard(group, channel: far + "b")
        let nearNotices = try await redis.receiveMembershipNotices(processChannel: near, max: 8, timeout: .zero)
        let farNotices = try await redis.receiveMembershipNotices(processChannel: far, max: 8, timeout: .zero)
        #expect(nearNotices.map { $0["channel"]?.stringValue } == [near + "a"], "\(nearNotices)")
        #expect(farNotices.isEmpty, "no notice across shards: \(farNotices)")
        #expect(try await redis.groupChannels(group) == [near + "a"], "both changes made all the same")
        await redis.close()
    }

    @Test("Redis, encrypted: the group journal stores no group or channel name in the clear, and still puts members back")
    func encryptedGroupJournal() async throws {
        var configuration = try RedisChannelLayerConfiguration(urls: [try TestRedis.requireURL()])
        configuration.prefix = TestRedis.uniquePrefix()
        configuration.symmetricEncryptionKeys = ["journal-key-" + ChannelNames.randomLetters(8)]
        let redis = try RedisChannelLayer(configuration: configuration)
        defer {
            Task {
                try? await redis.flush()
                await redis.close()
            }
        }
        let server = "srv.sealed\(ChannelNames.randomLetters(6))!"
        let raw = try HiredisConnection(endpoint: configuration.hosts[0], connectTimeout: .seconds(1), commandTimeout: .seconds(2))
        let journalKey = configuration.prefix + ":journal:" + server
        try await redis.groupAdd("secret-room", channel: server + "a")
        try await redis.groupAdd("secret-room", channel: server + "b")
        let stored = try raw.command(["HGETALL", journalKey]).array?.compactMap(\.bytes) ?? []
        #expect(stored.count == 6, "the mark and two entries")
        for bytes in stored {
            let text = String(decoding: bytes, as: UTF8.self)
            #expect(!text.contains("secret-room") && !text.contains("srv.sealed"), "in the clear: \(text)")
        }
        _ = try raw.command(["DEL", configuration.prefix + ":group:secret-room"])
        let check = try await redis.groupCheck(processChannel: server, followers: [:], isOpen: { _ in true })
        #expect(Set(check.restored.map(\.channel)) == [server + "a", server + "b"])
        // A discard finds its sealed entry again (the field is a keyed digest).
        try await redis.groupDiscard("secret-room", channel: server + "b")
        #expect(try raw.command(["HLEN", journalKey]).integer == 2)
        // A server that reads bundles is sent its membership notices sealed like any message.
        #expect(try await redis.registeredAsBundleReader(server))
        try await redis.groupAdd("secret-room", channel: server + "c")
        let list =
            try raw.command(["LRANGE", configuration.prefix + ChannelNames.membershipNoticeList(forProcess: server), "0", "-1"]).array?
            .compactMap(\.text) ?? []
        #expect(list.count == 1)
        let body = try raw.command(["GET", list.first ?? "?"]).bytes ?? []
        #expect(!String(decoding: body, as: UTF8.self).contains("secret-room") && !body.isEmpty, "a notice in the clear")
        let notices = try await redis.receiveMembershipNotices(processChannel: server, max: 8, timeout: .seconds(1))
        #expect(notices.count == 1 && notices.first?["group"]?.stringValue == "secret-room" && notices.first?["joined"] == .bool(true))
        // No send can reach that list: its name is no channel's.
        await #expect(throws: ChannelLayerError.self) {
            try await redis.send(
                ["group": "secret-room", "channel": .string(server + "x"), "joined": true],
                to: ChannelNames.membershipNoticeList(forProcess: server))
        }
    }

    @Test(
        "presence: a user with three connections is one member; joins and leaves only at the first and last", arguments: LayerKind.allCases)
    func presenceCounts(_ kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            let presence = try presence(layer)
            let ttl = Duration.seconds(30)
            #expect(try await presence.presenceJoin("room", connection: "s!a", user: "alice", meta: "{\"k\":1}", ttl: ttl).changed)
            #expect(try await !presence.presenceJoin("room", connection: "s!b", user: "alice", meta: "{}", ttl: ttl).changed)
            #expect(try await !presence.presenceJoin("room", connection: "s!c", user: "alice", meta: "{}", ttl: ttl).changed)
            #expect(try await presence.presenceJoin("room", connection: "s!d", user: "bob", meta: "{}", ttl: ttl).changed)
            // The same join again (a retry after an unknown outcome): not a second connection,
            // and it still says bob joined.
            #expect(try await presence.presenceJoin("room", connection: "s!d", user: "bob", meta: "{}", ttl: ttl).changed)
            let list = try await presence.presenceList("room")
            #expect(list.map(\.user) == ["alice", "bob"] && list.map(\.connections) == [3, 1])
            #expect(try await !presence.presenceLeave("room", connection: "s!a", user: "alice").changed)
            #expect(try await !presence.presenceLeave("room", connection: "s!b", user: "alice").changed)
            #expect(try await presence.presenceLeave("room", connection: "s!c", user: "alice").changed)
            // A retried leave says so again.
            #expect(try await presence.presenceLeave("room", connection: "s!c", user: "alice").changed)
            #expect(try await presence.presenceList("room").map(\.user) == ["bob"])
            #expect(try await presence.presenceList("elsewhere").isEmpty)
            // Each change took a version above every earlier one; the list reads the last.
            var versions: [Int64] = []
            versions.append(try await presence.presenceJoin("v", connection: "s!1", user: "vic", meta: "{}", ttl: ttl).version)
            versions.append(try await presence.presenceJoin("v", connection: "s!2", user: "vic", meta: "{}", ttl: ttl).version)
            versions.append(try await presence.presenceLeave("v", connection: "s!1", user: "vic").version)
            #expect(versions == versions.sorted() && Set(versions).count == 3, "\(versions)")
            #expect(try await presence.presenceSnapshot("v").version == versions.last)
        }
    }

    @Test("presence: a connection swept while its server stalled is tracked again by the next renewal", arguments: LayerKind.allCases)
    func refreshRestores(_ kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            let presence = try presence(layer)
            let erin = PresenceConnection(connection: "stalled!1", user: "erin", meta: "{}")
            _ = try await presence.presenceJoin("r", connection: erin.connection, user: "erin", meta: "{}", ttl: .milliseconds(300))
            try await Task.sleep(for: .milliseconds(500))
            let swept = try await presence.presenceSweep()
            #expect(
                swept.map { PresenceDiff(group: $0.group, joins: $0.joins, leaves: $0.leaves) } == [
                    PresenceDiff(group: "r", leaves: ["erin"])
                ])
            let leftAt = try #require(swept.first?.versions["erin"])
            let renewal = try await presence.presenceRefresh("r", connections: [erin], ttl: .seconds(30))
            #expect(renewal.back == [erin] && renewal.version > leftAt)
            #expect(try await presence.presenceList("r").map(\.user) == ["erin"])
            // A renewal of a connection that is there says nothing, and changes no version.
            let again = try await presence.presenceRefresh("r", connections: [erin], ttl: .seconds(30))
            #expect(again.back.isEmpty && again.version == renewal.version)
        }
    }

    @Test("encrypted presence: no user name in the clear in Redis; lists and sweeps still name them")
    func encryptedPresence() async throws {
        var configuration = try RedisChannelLayerConfiguration(urls: [try TestRedis.requireURL()])
        configuration.prefix = TestRedis.uniquePrefix()
        configuration.symmetricEncryptionKeys = ["presence-key-" + ChannelNames.randomLetters(8)]
        let layer = try RedisChannelLayer(configuration: configuration)
        defer {
            Task {
                try? await layer.flush(); await layer.close()
            }
        }
        #expect(try await layer.presenceJoin("sec", connection: "s!1", user: "zelda-secret", meta: "{\"m\":1}", ttl: .seconds(60)).changed)
        _ = try await layer.presenceJoin("sec", connection: "s!2", user: "yann-secret", meta: "{}", ttl: .milliseconds(300))
        let raw = try HiredisConnection(endpoint: configuration.hosts[0], connectTimeout: .seconds(1), commandTimeout: .seconds(2))
        for kind in ["presence:", "presence-meta:", "presence-users:"] {
            let dump = try raw.command(["HGETALL", configuration.prefix + kind + "sec"])
            let text = (dump.array ?? []).compactMap(\.bytes).map { String(decoding: $0, as: UTF8.self) }.joined(separator: " ")
            #expect(!text.isEmpty && !text.contains("zelda") && !text.contains("yann"), "\(kind): \(text)")
        }
        try await Task.sleep(for: .milliseconds(500))
        let diffs = try await layer.presenceSweep()
        let list = try await layer.presenceList("sec")
        #expect(list == [PresenceMember(user: "zelda-secret", connections: 1, meta: "{\"m\":1}")])
        #expect(
            diffs.contains { $0.group == "sec" && $0.leaves == ["yann-secret"] && $0.joins.isEmpty && $0.versions["yann-secret"] != nil })
    }

    @Test("presence: a list of 9,000 connections (past Lua's unpack limit of 8,000)", arguments: LayerKind.allCases)
    func bigPresence(_ kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            let presence = try presence(layer)
            try await withThrowingTaskGroup(of: Void.self) { group in
                for lane in 0..<4 {
                    group.addTask {
                        for i in stride(from: lane, to: 9000, by: 4) {
                            _ = try await presence.presenceJoin(
                                "big", connection: "s!\(i)", user: "u\(i % 4500)", meta: "{}", ttl: .seconds(60))
                        }
                    }
                }
                try await group.waitForAll()
            }
            let list = try await presence.presenceList("big")
            #expect(list.count == 4500 && list.allSatisfy { $0.connections == 2 })
        }
    }

    @Test("presence: connections not renewed expire, the sweep removes them once and names who left", arguments: LayerKind.allCases)
    func presenceExpiry(_ kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            let presence = try presence(layer)
            _ = try await presence.presenceSweep()
            _ = try await presence.presenceJoin("x", connection: "dead!1", user: "carol", meta: "{}", ttl: .seconds(2))
            _ = try await presence.presenceJoin("x", connection: "live!1", user: "dave", meta: "{}", ttl: .seconds(2))
            _ = try await presence.presenceJoin("y", connection: "dead!2", user: "carol", meta: "{}", ttl: .seconds(2))
            // dave is renewed 1.7 s before he would expire: a loaded CI machine has room.
            try await Task.sleep(for: .milliseconds(300))
            _ = try await presence.presenceRefresh(
                "x", connections: [PresenceConnection(connection: "live!1", user: "dave", meta: "{}")], ttl: .seconds(30))
            try await Task.sleep(for: .milliseconds(2000))
            // Expired but not swept: still listed (the list is the state at its version; the
            // sweep's leave comes with a later one).
            let before = try await presence.presenceSnapshot("x")
            #expect(before.members.map(\.user) == ["carol", "dave"])
            let diffs = try await presence.presenceSweep()
            #expect(
                diffs.map { PresenceDiff(group: $0.group, joins: $0.joins, leaves: $0.leaves) } == [
                    PresenceDiff(group: "x", leaves: ["carol"]), PresenceDiff(group: "y", leaves: ["carol"]),
                ])
            #expect(diffs.allSatisfy { $0.versions.keys.sorted() == ["carol"] })
            #expect(try #require(diffs.first { $0.group == "x" }?.versions["carol"]) > before.version)
            #expect(try await presence.presenceList("x").map(\.user) == ["dave"])
            #expect(try await presence.presenceSweep().isEmpty)
            #expect(try await presence.presenceList("y").isEmpty)
        }
    }
}
