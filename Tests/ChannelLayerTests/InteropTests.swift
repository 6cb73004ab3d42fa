import ASGI
import Foundation
import OrderedCollections
import TestSupport
import Testing

@testable import RedisChannelLayer

/// The real asgi_redis 1.4.3 from PyPI (run by `Tests/interop/asgi_redis_peer.py` in the venv
/// that scripts/test.sh builds) and our layer on one Redis.
struct PythonPeer {
    let hosts: [String]
    let prefix: String
    var capacity = 100

    static func python() throws -> String {
        try TestRedis.requirePython()
    }

    static let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("interop/asgi_redis_peer.py").path

    /// Runs one peer command and returns its JSON output.
    func run(_ command: String, _ args: String...) async throws -> Any {
        let arguments =
            [
                try Self.python(), Self.script, "--hosts", hosts.joined(separator: ","), "--prefix", prefix,
                "--capacity", String(capacity), command,
            ] + args
        let (status, output) = try await runProgram(arguments)
        try #require(status == 0, "peer \(command) failed with \(status): \(output)")
        return try JSONSerialization.jsonObject(with: Data(output.utf8), options: [.fragmentsAllowed])
    }

    func layer() throws -> RedisChannelLayer {
        var configuration = try RedisChannelLayerConfiguration(urls: hosts)
        configuration.prefix = prefix
        configuration.statsPrefix = String(prefix.dropLast()) + "-meta:"
        configuration.capacity = capacity
        return try RedisChannelLayer(configuration: configuration)
    }
}

/// Reads the peer's tagged JSON back into a value.
func untag(_ json: Any) throws -> ASGIValue {
    let object = try #require(json as? [String: Any])
    let (tag, payload) = try #require(object.first)
    switch tag {
    case "n": return .null
    case "t": return .bool(try #require(payload as? NSNumber).boolValue)
    case "i": return .int(try #require(payload as? NSNumber).int64Value)
    case "d": return .double(try #require(payload as? NSNumber).doubleValue)
    case "s": return .string(try #require(payload as? String))
    case "b": return .bytes(unhex(try #require(payload as? String)))
    case "a": return .array(try #require(payload as? [Any]).map(untag))
    case "m":
        var map = Message()
        for (key, value) in try #require(payload as? [String: Any]).sorted(by: { $0.key < $1.key }) {
            map[key] = try untag(value)
        }
        return .map(map.fields)
    default: throw ChannelLayerError(.invalidMessage, "unknown tag \(tag)")
    }
}

/// The same value with every map's keys sorted, so maps compare regardless of order.
func normalized(_ value: ASGIValue) -> ASGIValue {
    switch value {
    case .array(let a): return .array(a.map(normalized))
    case .map(let m):
        var sorted = Message()
        for key in m.keys.sorted() { sorted[key] = normalized(m[key]!) }
        return .map(sorted.fields)
    default: return value
    }
}

func normalized(_ message: Message) -> ASGIValue { normalized(.map(message.fields)) }

@Suite("interop with Python asgi_redis 1.4.3", .timeLimit(.minutes(2)))
struct InteropTests {
    func peer(capacity: Int = 100) throws -> PythonPeer {
        PythonPeer(hosts: [try TestRedis.requireURL()], prefix: TestRedis.uniquePrefix(), capacity: capacity)
    }

    /// Receives on the Python side and returns (channel, message).
    func pythonReceive(_ peer: PythonPeer, _ channels: String) async throws -> (String, ASGIValue) {
        let result = try #require(try await peer.run("receive", channels) as? [String: Any])
        return (try #require(result["channel"] as? String), try untag(try #require(result["message"])))
    }

    @Test("msgpack bytes equal Python's for the shared cases")
    func bytesEqual() async throws {
        let peer = try peer()
        for (name, message) in [("nested", Cases.nested), ("small", Cases.small), ("response", Cases.response)] {
            let python = try await runProgram([try PythonPeer.python(), PythonPeer.script, "--hosts", peer.hosts[0], "pack", name]).output
            #expect(python.trimmingCharacters(in: .whitespacesAndNewlines) == hex(MsgPackEncoder.encode(message)), "\(name)")
        }
    }

    /// The typed ASGI messages encode to the very bytes Python's msgpack makes of the same dicts
    /// (the shapes the interface server and the consumer helpers have always sent), and read back equal.
    @Test("typed ASGI messages: the same bytes as Python's msgpack of the same dicts")
    func typedMessagesBytes() async throws {
        let packed = try #require(try await peer().run("pack_all") as? [String: String])
        let ws: ReplyChannelName = "daphne.response.abc!ws"
        let cases: [(String, any ASGIMessage)] = [
            (
                "http_request",
                HTTPRequestMessage(
                    replyChannel: "daphne.response.abc!def", method: "POST", path: "/café/", queryString: Array("a=1&b=%20".utf8),
                    headers: [("host", "example.com"), ("cookie", "sessionid=xyz")], body: Array("x=1".utf8),
                    bodyChannel: "http.request.body?abcdefghijkl", client: ASGIAddress(host: "127.0.0.1", port: 50000),
                    server: ASGIAddress(host: "127.0.0.1", port: 8000))
            ),
            ("http_body_chunk", HTTPBodyChunk(content: Array("more".utf8), moreContent: true)),
            (
                "http_response_start",
                HTTPResponseStart(
                    status: 404, headers: [("Content-Type", "text/plain"), ("set-cookie", "a=b")],
                    content: Array("Not found".utf8), moreContent: true)
            ),
            ("http_response_chunk", HTTPResponseChunk(content: Array("tail".utf8), moreContent: false)),
            ("http_disconnect", HTTPDisconnectMessage(replyChannel: "daphne.response.abc!def", path: "/x/")),
            (
                "websocket_connect",
                WebSocketConnectMessage(
                    replyChannel: ws, path: "/chat/lobby/", headers: [("origin", "http://example.com")],
                    client: ASGIAddress(host: "::1", port: 1234))
            ),
            ("websocket_receive_text", WebSocketReceiveMessage(replyChannel: ws, path: "/chat/lobby/", order: 1, data: .text("hi £"))),
            (
                "websocket_receive_bytes",
                WebSocketReceiveMessage(replyChannel: ws, path: "/chat/lobby/", order: 2, data: .bytes([0, 0xff]))
            ),
            ("websocket_disconnect", WebSocketDisconnectMessage(replyChannel: ws, code: 1001, path: "/chat/lobby/", order: 3)),
            ("websocket_send_accept", WebSocketSendMessage.accept),
            ("websocket_send_text", WebSocketSendMessage.text("hello")),
            ("websocket_send_close", WebSocketSendMessage.close(code: 4000)),
        ]
        for (name, typed) in cases {
            let python = try #require(packed[name], "the peer has no case \(name)")
            let bytes = MsgPackEncoder.encode(typed.message)
            #expect(hex(bytes) == python, "\(name)")
            // And Python's bytes read back as the same typed value.
            let decoded = try MsgPackDecoder().decodeMessage(unhex(python))
            #expect(try type(of: typed).init(decoded).message == typed.message, "\(name) read back")
        }
    }

    @Test("Python sends, Swift receives; Swift sends, Python receives (plain channel, nested str/bytes)")
    func plainChannels() async throws {
        let peer = try peer()
        let layer = try peer.layer()
        #expect(try await peer.run("send", "nested", "interop.plain") as? String == "ok")
        let got = try #require(try await layer.receive(channels: ["interop.plain"], timeout: .seconds(2)))
        #expect(got.channel == "interop.plain")
        #expect(got.message == Cases.nested, "same keys, same order, same types")

        try await layer.send(Cases.nested, to: "interop.back")
        let (channel, message) = try await pythonReceive(peer, "interop.back")
        #expect(channel == "interop.back")
        #expect(message == normalized(Cases.nested))
        try await layer.flush()
        await layer.close()
    }

    @Test("! channels: full names both ways")
    func processChannels() async throws {
        let peer = try peer()
        let layer = try peer.layer()
        #expect(try await peer.run("send", "response", "interop.reply!abc") as? String == "ok")
        let got = try #require(try await layer.receive(channels: ["interop.reply!"], timeout: .seconds(2)))
        #expect(got.channel == "interop.reply!abc")
        #expect(got.message == Cases.response)
        #expect(got.message[asgiChannelKey] == nil)

        try await layer.send(Cases.small, to: "interop.daphne!XyZ")
        let (channel, message) = try await pythonReceive(peer, "interop.daphne!")
        #expect(channel == "interop.daphne!XyZ")
        #expect(message == normalized(Cases.small))
        try await layer.flush()
        await layer.close()
    }

    @Test("! channels share one capacity across both implementations; ChannelFull on both sides")
    func sharedCapacity() async throws {
        let peer = try peer(capacity: 3)
        let layer = try peer.layer()
        try await layer.send(Cases.small, to: "interop.cap!a")
        try await layer.send(Cases.small, to: "interop.cap!b")
        #expect(try await peer.run("send", "small", "interop.cap!c") as? String == "ok")
        #expect(try await peer.run("send", "small", "interop.cap!d") as? String == "full")
        await #expect { try await layer.send(Cases.small, to: "interop.cap!e") } throws: { isChannelFull($0) }

        // A plain channel filled by Python is full for Swift, and the reverse.
        let filled = try #require(try await peer.run("fill", "interop.full", "10") as? [String: Any])
        #expect(filled["sent"] as? Int == 3 && filled["full"] as? Bool == true)
        await #expect { try await layer.send(Cases.small, to: "interop.full") } throws: { isChannelFull($0) }
        for _ in 0..<3 { try await layer.send(Cases.small, to: "interop.full2") }
        #expect(try await peer.run("send", "small", "interop.full2") as? String == "full")

        // Both sides count into the same statistics keys.
        let stats = try #require(try await peer.run("stats", "interop.full") as? [String: Any])
        let channel = try #require(stats["channel"] as? [String: Any])
        #expect(channel["messages_count"] as? Int == 3)
        #expect(channel["channel_full_count"] as? Int == 2)
        #expect(channel["messages_pending"] as? Int == 3)
        let ours = try await layer.channelStatistics("interop.full")
        #expect(ours.messagesCount == 3 && ours.channelFullCount == 2 && ours.messagesPending == 3)
        try await layer.flush()
        await layer.close()
    }

    /// A run sent in one script (a socket's burst, `sendMany`) is stored as that many sends:
    /// the Python reader takes them one by one, in order, under their full names on a `!`
    /// channel; the channel's capacity (shared with Python) cuts the run where it filled, and
    /// the counters both sides read say what single sends would have said.
    @Test("a run sent in one step: a Python reader gets it in order; capacity cuts it; the same counters")
    func runsSentInOneStep() async throws {
        let peer = try peer(capacity: 4)
        let layer = try peer.layer()
        let run: [Message] = (0..<3).map { ["n": .int(Int64($0)), "text": .string("frame \($0)")] }
        #expect(try await layer.send(run, to: "interop.run") == 3)
        for expected in run {
            let (channel, message) = try await pythonReceive(peer, "interop.run")
            #expect(channel == "interop.run")
            #expect(message == normalized(expected))
        }
        #expect(try await layer.send(run, to: "interop.runs!abc") == 3)
        for expected in run {
            let (channel, message) = try await pythonReceive(peer, "interop.runs!")
            #expect(channel == "interop.runs!abc" && message == normalized(expected))
        }

        // One waiting (sent by Python), room for 3 more of a run of 5.
        #expect(try await peer.run("send", "small", "interop.runfull") as? String == "ok")
        let five: [Message] = (0..<5).map { ["n": .int(Int64($0))] }
        #expect(try await layer.send(five, to: "interop.runfull") == 3, "the first three, where the channel filled")
        await #expect { _ = try await layer.send(five, to: "interop.runfull") } throws: { isChannelFull($0) }
        #expect(try await peer.run("send", "small", "interop.runfull") as? String == "full", "full for Python too")
        let stats = try #require(try await peer.run("stats", "interop.runfull") as? [String: Any])
        let channel = try #require(stats["channel"] as? [String: Any])
        #expect(channel["messages_count"] as? Int == 4, "1 + 3 stored")
        #expect(channel["channel_full_count"] as? Int == 3, "the cut run once, the refused one, Python's")
        #expect(channel["messages_pending"] as? Int == 4)
        let (_, first) = try await pythonReceive(peer, "interop.runfull")
        #expect(first == normalized(Cases.small), "Python's own first")
        for n in 0..<3 {
            let (_, message) = try await pythonReceive(peer, "interop.runfull")
            #expect(message == normalized(five[n]))
        }
        try await layer.flush()
        await layer.close()
    }

    @Test("? channels made on one side work from the other")
    func singleReaderChannels() async throws {
        let peer = try peer()
        let layer = try peer.layer()
        let ours = try await layer.newChannel("interop.q?")
        #expect(try await peer.run("send", "small", ours) as? String == "ok")
        let got = try #require(try await layer.receive(channels: [ours], timeout: .seconds(2)))
        #expect(got.channel == ours && got.message == Cases.small)

        let theirs = try #require(try await peer.run("new_channel", "interop.p?") as? String)
        #expect(theirs.hasPrefix("interop.p?") && theirs.count == "interop.p?".count + 12)
        try await layer.send(Cases.response, to: theirs)
        let (channel, message) = try await pythonReceive(peer, theirs)
        #expect(channel == theirs && message == normalized(Cases.response))
        try await layer.flush()
        await layer.close()
    }

    @Test("groups: added on one side, sent from the other")
    func groups() async throws {
        let peer = try peer()
        let layer = try peer.layer()
        #expect(try await peer.run("group_add", "interop-room", "interop.m1") as? String == "ok")
        try await layer.groupAdd("interop-room", channel: "interop.m2!x")
        #expect(Set(try await layer.groupChannels("interop-room")) == ["interop.m1", "interop.m2!x"])
        #expect(try await peer.run("group_channels", "interop-room") as? [String] == ["interop.m1", "interop.m2!x"])

        try await layer.sendGroup("interop-room", message: Cases.nested)
        let (c1, m1) = try await pythonReceive(peer, "interop.m1")
        let (c2, m2) = try await pythonReceive(peer, "interop.m2!")
        #expect(c1 == "interop.m1" && m1 == normalized(Cases.nested))
        #expect(c2 == "interop.m2!x" && m2 == normalized(Cases.nested))

        #expect(try await peer.run("send_group", "interop-room", "small") as? String == "ok")
        let g1 = try #require(try await layer.receive(channels: ["interop.m1"], timeout: .seconds(2)))
        let g2 = try #require(try await layer.receive(channels: ["interop.m2!"], timeout: .seconds(2)))
        #expect(g1.message == Cases.small && g2.channel == "interop.m2!x" && g2.message == Cases.small)
        try await layer.flush()
        await layer.close()
    }

    @Test("150 members: an asgi_redis reader (Daphne 1.4) gets one message per member, ours one bundle; both directions")
    func largeGroupsBothForms() async throws {
        let peer = try peer(capacity: 1000)
        let layer = try peer.layer()
        let daphne = "daphne.response.PyReader!", ours = "swift.response.SwReader!"
        #expect(try await peer.run("group_add_many", "big-room", daphne, "150") as? String == "ok")
        #expect(try await layer.registeredAsBundleReader(ours))
        for i in 0..<150 { try await layer.groupAdd("big-room", channel: ours + "m\(i)") }

        // Our worker sends.
        try await layer.sendGroup("big-room", message: Cases.nested)
        #expect(try await layer.channelStatistics(ours).messagesPending == 1, "one bundle for all 150 of ours")
        #expect(try await layer.channelStatistics(daphne).messagesPending == 150, "one message per member for Daphne")
        let py = try #require(try await peer.run("receive_all", daphne, "150", "nested") as? [String: Any])
        #expect(Set(try #require(py["channels"] as? [String])) == Set((0..<150).map { daphne + "m\($0)" }))
        #expect(py["same"] as? Bool == true)
        var mine: [ReceivedMessage] = []
        while mine.count < 150 {
            let batch = try await layer.receiveBatch(channels: [ours], max: 64, timeout: .seconds(2))
            if batch.isEmpty { break }
            mine += batch
        }
        #expect(Set(mine.map(\.channel)) == Set((0..<150).map { ours + "m\($0)" }) && mine.count == 150)
        #expect(mine.allSatisfy { $0.message == Cases.nested })

        // A Python worker sends (asgi_redis knows no bundles): one message per member on both.
        #expect(try await peer.run("send_group", "big-room", "small") as? String == "ok")
        let py2 = try #require(try await peer.run("receive_all", daphne, "150", "small") as? [String: Any])
        #expect((py2["channels"] as? [String])?.count == 150 && py2["same"] as? Bool == true)
        var mine2: [ReceivedMessage] = []
        while mine2.count < 150 {
            guard let one = try await layer.receive(channels: [ours], timeout: .seconds(2)) else { break }
            mine2.append(one)
        }
        #expect(Set(mine2.map(\.channel)).count == 150 && mine2.allSatisfy { $0.message == Cases.small })
        try await layer.flush()
        await layer.close()
    }

    @Test("two Redis servers: both sides put channels and groups on the same shard")
    func sharding() async throws {
        let a = try await RedisServer.launch(), b = try await RedisServer.launch()
        let peer = PythonPeer(hosts: [a.url, b.url], prefix: "asgi:")
        let names = ["http.request", "tgroup", "daphne.response.AbCdEfGhIj!", "interop.s!", "chat-lobby", "x", "interop.q?abc"]
        var pythonShards: [Int] = []
        for name in names { pythonShards += try #require(try await peer.run("shard", name) as? [Int]) }
        #expect(pythonShards == names.map { Sharding.shard($0, hostCount: 2) })

        let layer = try peer.layer()
        #expect(try await peer.run("send", "small", "interop.s!abc") as? String == "ok")
        let got = try #require(try await layer.receive(channels: ["interop.s!"], timeout: .seconds(2)))
        #expect(got.channel == "interop.s!abc")
        #expect(try await peer.run("group_add", "tgroup", "interop.s!member") as? String == "ok")
        #expect(try await layer.groupChannels("tgroup") == ["interop.s!member"])
        try await layer.sendGroup("tgroup", message: Cases.small)
        let (channel, _) = try await pythonReceive(peer, "interop.s!")
        #expect(channel == "interop.s!member")
        await layer.close()
        await a.shutdown()
        await b.shutdown()
    }
}
