import ASGI
import OrderedCollections
import Testing

@Suite("typed ASGI messages and codecs", .timeLimit(.minutes(2)))
struct ASGIMessageTests {
    @Test("each typed message survives message -> struct -> message unchanged")
    func roundTrips() throws {
        let request = HTTPRequestMessage(
            replyChannel: "s.r!a", method: "GET", path: "/a b/", queryString: Array("q=%C3%A9".utf8),
            headers: [("Host", "x")], client: ASGIAddress(host: "1.2.3.4", port: 5))
        #expect(try HTTPRequestMessage(request.message) == request)
        let connect = WebSocketConnectMessage(replyChannel: "s.r!b", path: "/ws/", headers: [("cookie", "a=1")])
        #expect(try WebSocketConnectMessage(connect.message) == connect)
        let disconnect = WebSocketDisconnectMessage(replyChannel: "s.r!b", code: 1006, path: "/ws/", order: 9)
        #expect(try WebSocketDisconnectMessage(disconnect.message) == disconnect)
        let start = HTTPResponseStart(status: 201, headers: [("x-a", "1"), ("x-a", "2")], content: [1], moreContent: true)
        #expect(try HTTPResponseMessage(start.message) == .start(start))
        let chunk = HTTPResponseChunk(content: [2], moreContent: false)
        #expect(try HTTPResponseMessage(chunk.message) == .chunk(chunk))
        let send = WebSocketSendMessage(accept: true, data: .bytes([9]), close: 4001)
        #expect(try WebSocketSendMessage(send.message) == send)
    }

    @Test("what other producers may write is read too: string query strings, close: true, no optional keys")
    func lenientWhereTheSpecAllows() throws {
        let request = try HTTPRequestMessage([
            "reply_channel": "a.b!c", "method": "post", "path": "/", "query_string": "x=1",
            "headers": [["host", .utf8Bytes("h")]],
        ])
        #expect(request.method == "POST" && request.queryString == Array("x=1".utf8) && request.headers.first("HOST") == "h")
        #expect(request.httpVersion == "1.1" && request.scheme == "http" && request.body.isEmpty && request.client == nil)
        #expect(try WebSocketSendMessage(["close": true]).close == 1000)
        #expect(try WebSocketSendMessage(["close": false]).close == nil)
    }

    @Test("bad messages throw a typed error naming the key")
    func typedErrors() throws {
        func key(_ body: () throws -> Void) -> (MessageError.Code, String)? {
            do { try body(); return nil } catch { return (error as? MessageError).map { ($0.code, $0.key) } }
        }
        #expect(key { _ = try HTTPRequestMessage(["method": "GET", "path": "/"]) }! == (.missingKey, "reply_channel"))
        #expect(key { _ = try HTTPRequestMessage(["reply_channel": "a!b", "method": 1, "path": "/"]) }! == (.wrongType, "method"))
        #expect(
            key { _ = try HTTPRequestMessage(["reply_channel": "a!b", "method": "GET", "path": "/", "headers": [["x"]]]) }!
                == (.invalidValue, "headers"))
        #expect(
            key { _ = try HTTPRequestMessage(["reply_channel": "a!b", "method": "GET", "path": "/", "client": "me"]) }!
                == (.invalidValue, "client"))
        #expect(key { _ = try HTTPResponseStart(["status": 42]) }! == (.invalidValue, "status"))
        #expect(key { _ = try HTTPResponseStart(["status": "200"]) }! == (.wrongType, "status"))
        #expect(key { _ = try WebSocketSendMessage(["close": 99]) }! == (.invalidValue, "close"))
        #expect(key { _ = try WebSocketSendMessage(["accept": "yes"]) }! == (.wrongType, "accept"))
        #expect(key { _ = try WebSocketReceiveMessage(["reply_channel": "a!b", "order": 1]) }! == (.missingKey, "text"))
        #expect(key { _ = try WebSocketReceiveMessage(["reply_channel": "a!b", "text": 5]) }! == (.wrongType, "text"))
        #expect(key { _ = try Message(["reply_channel": "plain"]).replyChannelName() }! == (.invalidValue, "reply_channel"))
        // The typed messages check their reply channel is a channel name (not that it ends in
        // `!` or `?`: Channels 1.x's test clients name theirs `<alias><letters>`).
        #expect(try HTTPRequestMessage(["reply_channel": "defaultAbCdE", "method": "GET", "path": "/"]).replyChannel == "defaultAbCdE")
        #expect(key { _ = try WebSocketReceiveMessage(["reply_channel": "bad name!x", "text": "t"]) }! == (.invalidValue, "reply_channel"))
    }

    @Test("headers: names lower-cased, order and duplicates kept, bytes on the wire, cookies parsed")
    func headers() throws {
        var headers: ASGIHeaders = [("Host", "x"), ("Set-Cookie", "a=1")]
        headers.add(name: "SET-COOKIE", value: "b=2")
        #expect(headers.values("set-cookie") == ["a=1", "b=2"])
        #expect(
            headers.asgiValue == [
                [.utf8Bytes("host"), .utf8Bytes("x")], [.utf8Bytes("set-cookie"), .utf8Bytes("a=1")],
                [.utf8Bytes("set-cookie"), .utf8Bytes("b=2")],
            ])
        let cookies = ASGIHeaders([("cookie", "sessionid=abc; theme=\"dark\""), ("cookie", "sessionid=later")]).cookies
        #expect(cookies == ["sessionid": "abc", "theme": "dark"], "the first value of a name wins, quotes dropped")
        #expect(throws: MessageError.self) { try ASGIHeaders(.string("host: x")) }
    }

    @Test("percent coding: paths, queries and forms, and encode/decode agree")
    func percentCoding() {
        let (path, query) = PercentCoding.splitTarget("/caf%C3%A9/a+b/?x=%20y&z=1+2&flag&x=2")
        #expect(path == "/café/a+b/", "a path keeps '+'")
        #expect(query == Array("x=%20y&z=1+2&flag&x=2".utf8))
        let parameters = PercentCoding.parameters(query)
        #expect(parameters.map(\.name) == ["x", "z", "flag", "x"] && parameters.map(\.value) == [" y", "1 2", "", "2"])
        #expect(PercentCoding.parameter("x", in: query) == " y", "the first of a repeated name")
        #expect(PercentCoding.decode(Array("100%".utf8)) == "100%" && PercentCoding.decode(Array("%zz%4".utf8)) == "%zz%4")
        let fields = [("name", "Zoë & co"), ("q", "a+b=c/d")]
        let encoded = PercentCoding.formEncode(fields)
        #expect(encoded == "name=Zo%C3%AB+%26+co&q=a%2Bb%3Dc%2Fd")
        #expect(PercentCoding.parameters(Array(encoded.utf8)).map { [$0.name, $0.value] } == fields.map { [$0.0, $0.1] })
    }

    @Test("hex and random tokens")
    func tokens() {
        #expect(Hex.encode([0x00, 0xab, 0xff]) == "00abff")
        #expect(Hex.value(of: UInt8(ascii: "F")) == 15 && Hex.value(of: UInt8(ascii: "g")) == nil)
        let letters = RandomToken.string(40)
        #expect(letters.count == 40 && letters.utf8.allSatisfy { RandomToken.letters.contains($0) })
        #expect(RandomToken.string(40) != letters)
        let key = RandomToken.string(32, from: RandomToken.lowercaseAlphanumerics)
        #expect(key.utf8.allSatisfy { RandomToken.lowercaseAlphanumerics.contains($0) })
        var uuid: [UInt8] = []
        RandomToken.uuid4Hex(into: &uuid)
        #expect(uuid.count == 32 && uuid[12] == UInt8(ascii: "4") && [UInt8]("89ab".utf8).contains(uuid[16]))
        #expect(RandomToken.bytes(13).count == 13)
    }

    @Test("the pooled secure generator hands out every word once, across pool refills and threads")
    func securePool() async {
        // 8 tasks x 2,000 draws: 250 refills of the 64-word pool, drawn concurrently. A word
        // handed out twice (the index not advanced, a refill that repeats the pool) or a cleared
        // word handed out (read after its clearing) shows as a duplicate or a zero.
        let draws = await withTaskGroup(of: [UInt64].self) { group in
            for _ in 0..<8 {
                group.addTask {
                    var generator = SecureRandomPool()
                    return (0..<2_000).map { _ in generator.next() }
                }
            }
            return await group.reduce(into: [UInt64]()) { $0 += $1 }
        }
        #expect(draws.count == 16_000)
        #expect(Set(draws).count == draws.count, "a 64-bit word drawn twice")
        #expect(!draws.contains(0))
        // Every bit is set in about half the draws (a stuck bit or a short read's zeros fail).
        for bit in 0..<64 {
            let ones = draws.reduce(0) { $0 + Int(($1 >> UInt64(bit)) & 1) }
            #expect((7_000...9_000).contains(ones), "bit \(bit) set in \(ones) of 16,000 draws")
        }
        var keys = Set<[UInt8]>()
        for _ in 0..<1_000 {
            var uuid: [UInt8] = []
            RandomToken.uuid4Hex(into: &uuid)
            keys.insert(uuid)
        }
        #expect(keys.count == 1_000)
    }
}
