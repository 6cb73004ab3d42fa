import ASGI
import Foundation
import Testing

/// The asgiref 1.1 conformance cases (SPEC.md §4), run against both layers.
@Suite("conformance", .timeLimit(.minutes(2)))
struct ConformanceTests {
    @Test("1. sends come back in order; a receive over two channels finds the one with a message", arguments: LayerKind.allCases)
    func sendReceive(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            for i in 1...3 { try await layer.send(["value": .int(Int64(i))], to: "sr_test") }
            for i in 1...3 {
                let got = try #require(try await layer.receive(channels: ["sr_test"]))
                #expect(got.channel == "sr_test")
                #expect(got.message["value"] == .int(Int64(i)))
            }
            #expect(try await layer.receive(channels: ["sr_test"]) == nil)
            try await layer.send(["value": "blue"], to: "sr_test2")
            let got = try #require(try await layer.receive(channels: ["sr_test", "sr_test2"]))
            #expect(got.channel == "sr_test2")
            #expect(got.message["value"] == "blue")
        }
    }

    @Test("2. x!a and x!b come back under their full names from x!", arguments: LayerKind.allCases)
    func processLocal(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            try await layer.send(["value": "a"], to: "x!a")
            try await layer.send(["value": "b"], to: "x!b")
            let first = try #require(try await layer.receive(channels: ["x!"]))
            let second = try #require(try await layer.receive(channels: ["x!"]))
            #expect(first.channel == "x!a" && first.message == ["value": "a"])
            #expect(second.channel == "x!b" && second.message == ["value": "b"])
        }
    }

    @Test("3. receiving x!c is an error", arguments: LayerKind.allCases)
    func processLocalReceiveMustEndAtBang(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            await #expect(throws: ChannelLayerError.self) { try await layer.receive(channels: ["x!c"]) }
        }
    }

    @Test("4. a message is gone after its expiry", arguments: LayerKind.allCases)
    func messageExpiry(kind: LayerKind) async throws {
        try await withLayer(kind, expiry: 1) { layer in
            try await layer.send(["value": "blue"], to: "me_test")
            // It was there: the layer counts it as pending before the expiry.
            #expect(try await layer.channelStatistics("me_test").messagesPending == 1)
            try await Task.sleep(for: .milliseconds(2100))
            #expect(try await layer.receive(channels: ["me_test"]) == nil)
        }
    }

    @Test("5. newChannel gives fresh ? names that work", arguments: LayerKind.allCases)
    func newChannel(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            let a = try await layer.newChannel("test.foo?")
            let b = try await layer.newChannel("test.foo?")
            #expect(a.hasPrefix("test.foo?") && a.count > "test.foo?".count)
            #expect(a != b)
            try ChannelNames.validateChannel(a)
            try await layer.send(["value": "blue"], to: a)
            let got = try #require(try await layer.receive(channels: [a]))
            #expect(got.channel == a && got.message["value"] == "blue")
        }
    }

    @Test("6. newChannel of test! and test.foo are errors", arguments: LayerKind.allCases)
    func newChannelBadPatterns(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            for pattern in ["test!", "test.foo"] {
                await #expect(throws: ChannelLayerError.self) { try await layer.newChannel(pattern) }
            }
        }
    }

    @Test("7. str and bytes keep their types, nested too", arguments: LayerKind.allCases)
    func strictTypes(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            let message: Message = [
                "bytes": .bytes([0xc2, 0xa3]), "binary": .bytes([0x01, 0x00, 0x03, 0x21]),
                "text": "\u{a3}", "nested": ["b": .bytes([0xc2, 0xa3]), "s": "\u{a3}", "list": [.bytes([0]), "x"]],
            ]
            try await layer.send(message, to: "type_test")
            let got = try #require(try await layer.receive(channels: ["type_test"]))
            #expect(got.message == message)
            #expect(got.message["text"] == .string("\u{a3}"))
            #expect(got.message["bytes"] == .bytes([0xc2, 0xa3]))
        }
    }

    @Test("8. group send reaches members, not discarded ones", arguments: LayerKind.allCases)
    func groups(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            try await layer.groupAdd("tgroup", channel: "tg_test")
            try await layer.groupAdd("tgroup", channel: "tg_test2")
            try await layer.groupAdd("tgroup", channel: "tg_test3")
            try await layer.groupDiscard("tgroup", channel: "tg_test")
            try await layer.sendGroup("tgroup", message: ["value": "orange"])
            #expect(try await layer.receive(channels: ["tg_test"]) == nil)
            #expect(try await layer.receive(channels: ["tg_test2"])?.message["value"] == "orange")
            #expect(try await layer.receive(channels: ["tg_test3"])?.message["value"] == "orange")
        }
    }

    @Test("9. group send to x!1 and x!2 arrives on x!", arguments: LayerKind.allCases)
    func groupsProcessLocal(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            try await layer.groupAdd("tgroup", channel: "x!1")
            try await layer.groupAdd("tgroup", channel: "x!2")
            try await layer.sendGroup("tgroup", message: ["value": "orange"])
            var names: Set<String> = []
            for _ in 0..<2 {
                let got = try #require(try await layer.receive(channels: ["x!"]))
                #expect(got.message == ["value": "orange"])
                names.insert(got.channel)
            }
            #expect(names == ["x!1", "x!2"])
            #expect(try await layer.receive(channels: ["x!"]) == nil)
        }
    }

    @Test("10. membership lists are exact", arguments: LayerKind.allCases)
    func groupChannels(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            try await layer.groupAdd("tgroup", channel: "tg_test")
            try await layer.groupAdd("tgroup", channel: "tg_test2")
            try await layer.groupAdd("tgroup", channel: "tg_test3")
            #expect(Set(try await layer.groupChannels("tgroup")) == ["tg_test", "tg_test2", "tg_test3"])
            try await layer.groupDiscard("tgroup", channel: "tg_test")
            #expect(Set(try await layer.groupChannels("tgroup")) == ["tg_test2", "tg_test3"])
        }
    }

    @Test("11. flush removes pending messages", arguments: LayerKind.allCases)
    func flush(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            try await layer.send(["value": "blue"], to: "fl_test")
            try await layer.flush()
            #expect(try await layer.receive(channels: ["fl_test"]) == nil)
        }
    }

    @Test("12. flush removes group-sent messages", arguments: LayerKind.allCases)
    func flushGroups(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            try await layer.groupAdd("fl_group", channel: "fl_test")
            try await layer.sendGroup("fl_group", message: ["value": "blue"])
            try await layer.flush()
            #expect(try await layer.receive(channels: ["fl_test"]) == nil)
            #expect(try await layer.groupChannels("fl_group").isEmpty)
        }
    }

    @Test("13. a member is gone after group_expiry", arguments: LayerKind.allCases)
    func groupExpiry(kind: LayerKind) async throws {
        try await withLayer(kind, groupExpiry: 2) { layer in
            // A member is there while it is fresh. A look that a loaded machine delayed past the
            // expiry proves nothing either way, so only a look made within it counts (and the
            // add is made again for another look, a few times at most).
            var lookedWhileFresh = false
            for _ in 0..<5 where !lookedWhileFresh {
                let added = ContinuousClock.now
                try await layer.groupAdd("gr_group", channel: "gr_test")
                let members = try await layer.groupChannels("gr_group")
                guard ContinuousClock.now - added < .seconds(2) else { continue }
                #expect(members == ["gr_test"], "a member before the expiry")
                lookedWhileFresh = true
            }
            #expect(lookedWhileFresh, "five adds each took longer than the group expiry to look at")
            try await Task.sleep(for: .milliseconds(2200))
            #expect(try await layer.groupChannels("gr_group").isEmpty)
            try await layer.sendGroup("gr_group", message: ["value": "blue"])
            #expect(try await layer.receive(channels: ["gr_test"]) == nil)
        }
    }

    @Test("14. capacity sends succeed, the next is ChannelFull", arguments: LayerKind.allCases)
    func capacity(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            for _ in 0..<5 { try await layer.send(["hey": "there"], to: "cap_test") }
            await #expect { try await layer.send(["hey": "there"], to: "cap_test") } throws: { isChannelFull($0) }
            for _ in 0..<5 { _ = try #require(try await layer.receive(channels: ["cap_test"])) }
            try await layer.send(["hey": "there"], to: "cap_test")
        }
    }

    @Test("15. capacity is shared by all x!* names", arguments: LayerKind.allCases)
    func capacityProcessLocal(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            for i in 0..<5 { try await layer.send(["hey": "there"], to: "cap_test!\(i)") }
            await #expect { try await layer.send(["hey": "there"], to: "cap_test!other") } throws: { isChannelFull($0) }
        }
    }

    @Test("16. group sends past capacity never throw", arguments: LayerKind.allCases)
    func groupCapacity(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            try await layer.groupAdd("tgroup", channel: "tg_test")
            try await layer.groupAdd("tgroup", channel: "x!1")
            for _ in 0..<8 { try await layer.sendGroup("tgroup", message: ["value": "orange"]) }
            var count = 0
            while try await layer.receive(channels: ["tg_test"]) != nil { count += 1 }
            #expect(count == 5)
        }
    }

    @Test("17. ChannelFull and MessageTooLarge are exposed", arguments: LayerKind.allCases)
    func exceptions(kind: LayerKind) async throws {
        try await withLayer(kind, maxMessageSize: 1024 * 1024 + 1024) { layer in
            // At least 1 MiB must fit.
            try await layer.send(["body": .bytes(Array(repeating: 7, count: 1024 * 1024))], to: "big")
            let got = try #require(try await layer.receive(channels: ["big"]))
            #expect(got.message["body"]?.bytesValue?.count == 1024 * 1024)
            await #expect {
                try await layer.send(["body": .bytes(Array(repeating: 7, count: 2 * 1024 * 1024))], to: "big")
            } throws: { ($0 as? ChannelLayerError)?.code == .messageTooLarge }
            // ChannelFull is a typed error with its own code, distinct from the size error.
            for _ in 0..<5 { try await layer.send(["n": 1], to: "full17") }
            await #expect {
                try await layer.send(["n": 1], to: "full17")
            } throws: { ($0 as? ChannelLayerError)?.code == .channelFull }
        }
    }

    @Test("inspection: pending channels and groups are listed, and drop out once empty", arguments: LayerKind.allCases)
    func inspection(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            let inspection = try #require(layer as? any ChannelLayerInspection, "both layers answer operators' tools")
            #expect(try await inspection.pendingChannels().isEmpty)
            #expect(try await inspection.groups().isEmpty)
            try await layer.send(["n": 1], to: "insp_a")
            try await layer.send(["n": 2], to: "insp_b!x")
            try await layer.groupAdd("insp_group", channel: "insp_a")
            #expect(Set(try await inspection.pendingChannels()) == ["insp_a", "insp_b!"])
            #expect(try await inspection.groups() == ["insp_group"])
            _ = try await layer.receive(channels: ["insp_a"])
            try await layer.groupDiscard("insp_group", channel: "insp_a")
            #expect(try await inspection.pendingChannels() == ["insp_b!"])
            #expect(try await inspection.groups().isEmpty)
            #expect(!inspection.location.isEmpty)
        }
    }

    @Test("18. changing a message after send does not change what is received", arguments: LayerKind.allCases)
    func messageIsCopied(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            var message: Message = ["value": ["yes": true]]
            try await layer.send(message, to: "mutation")
            message["value"] = ["yes": false]
            let got = try #require(try await layer.receive(channels: ["mutation"]))
            #expect(got.message == ["value": ["yes": true]])
        }
    }

    @Test("invalid names are rejected by every operation", arguments: LayerKind.allCases)
    func invalidNames(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            for name in ["http.request\u{a3}", String(repeating: "a", count: 110), "one?two?three", "four!five!six", "some+other!thing"] {
                await #expect(throws: ChannelLayerError.self) { try await layer.send(["a": 1], to: name) }
                await #expect(throws: ChannelLayerError.self) { try await layer.receive(channels: [name]) }
                await #expect(throws: ChannelLayerError.self) { try await layer.groupAdd("g", channel: name) }
            }
            await #expect(throws: ChannelLayerError.self) { try await layer.groupAdd("bad!group", channel: "ok") }
            await #expect(throws: ChannelLayerError.self) { try await layer.sendGroup("bad group", message: [:]) }
            await #expect(throws: ChannelLayerError.self) { try await layer.send([asgiChannelKey: "x"], to: "ok") }
        }
    }

    @Test("statistics move with sends and ChannelFull", arguments: LayerKind.allCases)
    func statistics(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            for _ in 0..<5 { try await layer.send(["a": 1], to: "stats_test") }
            await #expect { try await layer.send(["a": 1], to: "stats_test") } throws: { isChannelFull($0) }
            try await layer.send(["a": 1], to: "stats!one")
            let channel = try await layer.channelStatistics("stats_test")
            #expect(channel.messagesCount == 5)
            #expect(channel.channelFullCount == 1)
            #expect(channel.messagesPending == 5)
            #expect(channel.messagesMaxAge >= 0 && channel.messagesMaxAge < 30)
            let global = try await layer.globalStatistics()
            #expect(global.messagesCount == 6)
            #expect(global.channelFullCount == 1)
            #expect(try await layer.channelStatistics("stats!").messagesCount == 1)
            _ = try await layer.receive(channels: ["stats_test"])
            #expect(try await layer.channelStatistics("stats_test").messagesPending == 4)
        }
    }

    @Test("per-channel capacities by glob pattern", arguments: LayerKind.allCases)
    func channelCapacities(kind: LayerKind) async throws {
        try await withLayer(kind, capacity: 5, channelCapacities: [("small.*", 2), ("reply!", 3)]) { layer in
            try await layer.send(["a": 1], to: "small.one")
            try await layer.send(["a": 1], to: "small.one")
            await #expect { try await layer.send(["a": 1], to: "small.one") } throws: { isChannelFull($0) }
            for _ in 0..<5 { try await layer.send(["a": 1], to: "large.one") }
            // Group sends apply the same table.
            try await layer.groupAdd("caps", channel: "reply!a")
            for _ in 0..<6 { try await layer.sendGroup("caps", message: ["a": 1]) }
            var count = 0
            while try await layer.receive(channels: ["reply!"]) != nil { count += 1 }
            #expect(count == 3)
        }
    }

    @Test("a blocking receive waits for a send and wakes at once", arguments: LayerKind.allCases)
    func blockingReceive(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            // A wait that nobody wakes ends in nil at its timeout; a message proves the wake-up.
            async let waiting = layer.receive(channels: ["block_test", "other!"], timeout: .seconds(30))
            try await Task.sleep(for: .milliseconds(200))
            try await layer.send(["value": "late"], to: "other!xyz")
            let got = try #require(try await waiting)
            #expect(got.channel == "other!xyz")
        }
    }

    @Test("a blocking receive returns nil when the timeout passes", arguments: LayerKind.allCases)
    func blockingTimeout(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            let start = ContinuousClock.now
            let got = try await layer.receive(channels: ["nothing"], timeout: .milliseconds(300))
            #expect(got == nil)
            let waited = ContinuousClock.now - start
            #expect(waited >= .milliseconds(250))
        }
    }

    @Test("a cancelled blocking receive returns promptly", arguments: LayerKind.allCases)
    func cancelledReceive(kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            // Not a speed check: a cancellation that is ignored holds the receive for its
            // whole 60 s, far past this bound.
            let task = Task { try await layer.receive(channels: ["nothing"], timeout: .seconds(60)) }
            try await Task.sleep(for: .milliseconds(100))
            let start = ContinuousClock.now
            task.cancel()
            _ = try? await task.value
            #expect(ContinuousClock.now - start < .seconds(20))
        }
    }

    @Test("many concurrent senders and receivers lose nothing and duplicate nothing", arguments: LayerKind.allCases)
    func concurrency(kind: LayerKind) async throws {
        try await withLayer(kind, capacity: 10_000) { layer in
            let senders = 8, perSender = 100
            let received = try await withThrowingTaskGroup(of: [Int64].self) { group in
                for r in 0..<6 {
                    group.addTask {
                        var got: [Int64] = []
                        while let message = try await layer.receive(channels: ["conc"], timeout: .milliseconds(1500)) {
                            got.append(try message.message.int("n"))
                        }
                        _ = r
                        return got
                    }
                }
                for s in 0..<senders {
                    group.addTask {
                        for i in 0..<perSender { try await layer.send(["n": .int(Int64(s * perSender + i))], to: "conc") }
                        return []
                    }
                }
                var all: [Int64] = []
                for try await part in group { all += part }
                return all
            }
            #expect(received.count == senders * perSender)
            #expect(Set(received).count == senders * perSender)
        }
    }
}
