import ASGI
import Logging
import NIOCore
import NIOEmbedded
import NIOHTTP1
import Synchronization
import Testing

@testable import InterfaceServer

/// The HTTP handler on a testing channel: requests go in as NIO request parts, the ASGI
/// messages come out on an in-memory layer, replies are handed to the router, and the response
/// parts are read back. No sockets, so protocol edge cases are fast to check.
@Suite("HTTP handler on a testing channel", .timeLimit(.minutes(2)))
struct HTTPHandlerTests {
    struct Fixture {
        let layer = InMemoryChannelLayer()
        let server: ServerContext
        let channel: NIOAsyncTestingChannel

        init(logger: Logger = Logger(label: "test"), _ configure: (inout ServerConfiguration) -> Void = { _ in }) async throws {
            var configuration = ServerConfiguration(host: "127.0.0.1", port: 0)
            configure(&configuration)
            server = ServerContext(
                layer: layer, router: ReplyRouter(layer: layer, prefix: "test", logger: logger),
                configuration: configuration, logger: logger, accessLog: nil)
            channel = NIOAsyncTestingChannel()
            let upgrade = UpgradeState()
            try await channel.pipeline.addHandler(
                HTTPHandler(server: server, upgrade: upgrade, activity: ConnectionActivity(upgrade: upgrade)))
        }

        func request(_ method: HTTPMethod = .GET, _ uri: String, headers: [(String, String)] = [], body: String? = nil) async throws {
            var head = HTTPRequestHead(version: .http1_1, method: method, uri: uri)
            if !headers.contains(where: { $0.0.lowercased() == "host" }) { head.headers.add(name: "Host", value: "localhost") }
            for (name, value) in headers { head.headers.add(name: name, value: value) }
            try await channel.writeInbound(HTTPServerRequestPart.head(head))
            if let body { try await channel.writeInbound(HTTPServerRequestPart.body(ByteBuffer(string: body))) }
            try await channel.writeInbound(HTTPServerRequestPart.end(nil))
        }

        /// The next `http.request` the handler sent, typed.
        func sentRequest() async throws -> HTTPRequestMessage {
            let received = try #require(try await layer.receive(channels: [ASGIChannel.httpRequest], timeout: .seconds(10)))
            return try HTTPRequestMessage(received.message)
        }

        /// The response parts written so far, up to and including `.end`.
        func response() async throws -> (head: HTTPResponseHead, body: String) {
            guard case .head(let head) = try await channel.waitForOutboundWrite(as: HTTPServerResponsePart.self) else {
                Issue.record("the first part was not a head")
                throw ChannelLayerError(.invalidMessage, "no head")
            }
            var body = ""
            while true {
                switch try await channel.waitForOutboundWrite(as: HTTPServerResponsePart.self) {
                case .body(.byteBuffer(let buffer)): body += String(buffer: buffer)
                case .body: Issue.record("unexpected file region")
                case .end: return (head, body)
                case .head: Issue.record("a second head")
                }
            }
        }
    }

    @Test("a request becomes a typed http.request: path decoded, raw query, headers lower-cased, '_' names dropped")
    func requestTranslation() async throws {
        let fixture = try await Fixture { $0.rootPath = "/app" }
        try await fixture.request(.POST, "/caf%C3%A9/?q=a%20b", headers: [("X-Thing", "1"), ("X_Forwarded_For", "evil")], body: "hi")
        let request = try await fixture.sentRequest()
        #expect(request.method == "POST" && request.path == "/café/" && request.queryString == Array("q=a%20b".utf8))
        #expect(request.headers.first("x-thing") == "1" && !request.headers.contains("x_forwarded_for"))
        #expect(request.body == Array("hi".utf8) && request.rootPath == "/app" && request.bodyChannel == nil)
        #expect(request.replyChannel.rawValue.hasPrefix(fixture.server.router.processChannel))
        // The reply goes back through the router as the response.
        fixture.server.router.deliver(
            HTTPResponseStart(status: 201, headers: [("x-answer", "42")], content: Array("made".utf8)).message,
            to: request.replyChannel.rawValue)
        let (head, body) = try await fixture.response()
        #expect(head.status.code == 201 && head.headers.first(name: "x-answer") == "42" && body == "made")
        #expect(head.headers.first(name: "content-length") == "4")
    }

    @Test("a Host that is not an allowed host is 400 and counted; nothing reaches the layer; a subdomain pattern allows its names")
    func hostsAreChecked() async throws {
        for host in ["evil.example", "localhost.evil.example", "127.0.0.1.nip.io", "bad host", ""] {
            let fixture = try await Fixture()
            try await fixture.request(.GET, "/hello/", headers: [("Host", host)])
            let (head, _) = try await fixture.response()
            #expect(head.status == .badRequest, "Host '\(host)'")
            #expect(fixture.server.counters[.refusedHost] == 1)
            #expect(try await fixture.layer.receive(channels: [ASGIChannel.httpRequest], timeout: .zero) == nil)
        }
        // Two Host headers (a proxy and we might each believe another): 400.
        let twice = try await Fixture()
        try await twice.request(.GET, "/hello/", headers: [("Host", "localhost"), ("Host", "evil.example")])
        #expect(try await twice.response().head.status == .badRequest)
        for host in ["localhost", "LOCALHOST:8000", "127.0.0.1:80", "[::1]:8000"] {
            let fixture = try await Fixture()
            try await fixture.request(.GET, "/hello/", headers: [("Host", host)])
            #expect(try await fixture.sentRequest().path == "/hello/", "Host '\(host)'")
        }
        for (host, allowed) in [
            ("chat.example.com", true), ("example.com", true), ("a.b.example.com:443", true), ("example.com.evil.org", false),
        ] {
            let fixture = try await Fixture { $0.allowedHosts = [".example.com"] }
            try await fixture.request(.GET, "/hello/", headers: [("Host", host)])
            if allowed {
                #expect(try await fixture.sentRequest().path == "/hello/", "Host '\(host)'")
            } else {
                #expect(try await fixture.response().head.status == .badRequest, "Host '\(host)'")
            }
        }
    }

    @Test("a body over the chunk size rides on a body channel, in order")
    func largeBodyIsChunked() async throws {
        let fixture = try await Fixture { $0.bodyChunkSize = 4 }
        try await fixture.request(.POST, "/up/", body: "abcdefghij")
        let request = try await fixture.sentRequest()
        #expect(request.body == Array("abcd".utf8))
        let bodyChannel = try #require(request.bodyChannel)
        var rest: [UInt8] = []
        var more = true
        while more {
            let chunk = try HTTPBodyChunk(
                try #require(try await fixture.layer.receive(channels: [bodyChannel], timeout: .seconds(5))).message)
            rest += chunk.content
            more = chunk.moreContent
        }
        #expect(rest == Array("efghij".utf8))
    }

    @Test("limits: a body over --max-body-size is 413, a head over --max-header-size is 431; nothing reaches the layer")
    func limits() async throws {
        let fixture = try await Fixture {
            $0.maxBodySize = 5; $0.maxHeaderSize = 200
        }
        try await fixture.request(.POST, "/big/", body: "123456")
        let (tooLarge, _) = try await fixture.response()
        #expect(tooLarge.status == .payloadTooLarge)
        let second = try await Fixture { $0.maxHeaderSize = 200 }
        try await second.request(.GET, "/", headers: [("x-long", String(repeating: "a", count: 300))])
        let (headTooLarge, _) = try await second.response()
        #expect(headTooLarge.status == .requestHeaderFieldsTooLarge)
        #expect(try await fixture.layer.receive(channels: [ASGIChannel.httpRequest]) == nil)
        #expect(try await second.layer.receive(channels: [ASGIChannel.httpRequest]) == nil)
    }

    @Test("a malformed reply is a 500, logged and counted; a streamed reply is written as it comes")
    func malformedAndStreamedReplies() async throws {
        let lines = CapturedLog()
        let fixture = try await Fixture(logger: Logger(label: "test") { _ in lines })
        try await fixture.request(.GET, "/bad/")
        let bad = try await fixture.sentRequest()
        // A malformed reply whose values are secrets: the log names its keys, never its values.
        fixture.server.router.deliver(
            ["status": "two hundred", "headers": [["set-cookie", "sessionid=SECRETSESSION"]], "content": "TOPSECRETBODY"],
            to: bad.replyChannel.rawValue)
        let (head, _) = try await fixture.response()
        #expect(head.status == .internalServerError)
        #expect(fixture.server.counters[.malformedReplies] == 1)
        let logged = lines.text
        #expect(logged.contains("malformed HTTP reply") && logged.contains("headers"), "\(logged)")
        #expect(!logged.contains("SECRETSESSION") && !logged.contains("TOPSECRETBODY"), "\(logged)")

        let streamed = try await Fixture()
        try await streamed.request(.GET, "/stream/")
        let request = try await streamed.sentRequest()
        streamed.server.router.deliver(
            HTTPResponseStart(status: 200, content: Array("a".utf8), moreContent: true).message, to: request.replyChannel.rawValue)
        streamed.server.router.deliver(
            HTTPResponseChunk(content: Array("b".utf8), moreContent: true).message, to: request.replyChannel.rawValue)
        streamed.server.router.deliver(
            HTTPResponseChunk(content: Array("c".utf8), moreContent: false).message, to: request.replyChannel.rawValue)
        let (streamHead, body) = try await streamed.response()
        #expect(streamHead.status == .ok && body == "abc" && streamHead.headers.first(name: "content-length") == nil)
    }

    @Test("a client that leaves before its response sends http.disconnect")
    func disconnect() async throws {
        let fixture = try await Fixture()
        try await fixture.request(.GET, "/slow/%7E/")
        let request = try await fixture.sentRequest()
        try await fixture.channel.close()
        let received = try #require(try await fixture.layer.receive(channels: [ASGIChannel.httpDisconnect], timeout: .seconds(5)))
        let disconnect = try HTTPDisconnectMessage(received.message)
        #expect(disconnect.replyChannel == request.replyChannel && disconnect.path == "/slow/~/")
    }

    @Test("a response started while the server shuts down closes its keep-alive connection; one before does not")
    func responsesDuringShutdownCloseTheirConnection() async throws {
        let fixture = try await Fixture()
        try await fixture.channel.connect(to: try SocketAddress(ipAddress: "127.0.0.1", port: 9)).get()
        try await fixture.request(.GET, "/before/")
        let before = try await fixture.sentRequest()
        fixture.server.router.deliver(HTTPResponseStart(status: 200, content: Array("a".utf8)).message, to: before.replyChannel.rawValue)
        let (beforeHead, _) = try await fixture.response()
        #expect(beforeHead.headers.first(name: "connection") == nil, "HTTP/1.1 keep-alive by default")
        #expect(fixture.channel.isActive, "and the connection stays open")

        try await fixture.request(.GET, "/during/")
        let during = try await fixture.sentRequest()
        fixture.server.shuttingDown.store(true, ordering: .relaxed)
        fixture.server.router.deliver(HTTPResponseStart(status: 200, content: Array("b".utf8)).message, to: during.replyChannel.rawValue)
        let (duringHead, body) = try await fixture.response()
        #expect(duringHead.status == .ok && body == "b", "the response in hand is still given whole")
        #expect(duringHead.headers.first(name: "connection") == "close")
        try await fixture.channel.closeFuture.get()
    }
}

/// The connection's deadlines and streamed bodies, on the testing loop's clock.
@Suite("HTTP handler deadlines and streams on a testing channel", .timeLimit(.minutes(2)))
struct HTTPHandlerDeadlineTests {
    typealias Fixture = HTTPHandlerTests.Fixture

    static func connected(_ configure: (inout ServerConfiguration) -> Void = { _ in }) async throws -> Fixture {
        let fixture = try await Fixture(configure)
        try await fixture.channel.connect(to: try SocketAddress(ipAddress: "127.0.0.1", port: 9)).get()
        return fixture
    }

    @Test("a body that stops coming is answered 408 and the connection closes; it is counted")
    func stalledBody() async throws {
        // The pause rule alone (the minimum rate, which would cut this drip at 30 s, is below).
        let fixture = try await Self.connected { $0.minBodyRate = 0 }
        try await Self.startUpload(fixture, length: 10)
        await fixture.channel.testingEventLoop.advanceTime(by: .seconds(29))
        #expect(fixture.channel.isActive, "a pause shorter than the body timeout is fine")
        try await fixture.channel.writeInbound(HTTPServerRequestPart.body(ByteBuffer(string: "d")))
        await fixture.channel.testingEventLoop.advanceTime(by: .seconds(29))
        #expect(fixture.channel.isActive, "each part starts the body deadline again")
        await fixture.channel.testingEventLoop.advanceTime(by: .seconds(2))
        try await Self.expectBodyTimedOut(fixture)
    }

    /// A POST head announcing `length` bytes, and the first three of them.
    static func startUpload(_ fixture: Fixture, length: Int) async throws {
        var head = HTTPRequestHead(version: .http1_1, method: .POST, uri: "/upload/")
        head.headers.add(name: "Host", value: "localhost")
        head.headers.add(name: "Content-Length", value: String(length))
        try await fixture.channel.writeInbound(HTTPServerRequestPart.head(head))
        try await fixture.channel.writeInbound(HTTPServerRequestPart.body(ByteBuffer(string: "abc")))
    }

    /// The request was answered 408, the connection closed and the body timeout counted.
    static func expectBodyTimedOut(_ fixture: Fixture) async throws {
        let (response, _) = try await fixture.response()
        #expect(response.status == .requestTimeout)
        try await fixture.channel.closeFuture.get()
        #expect(fixture.server.counters[.timedOutBody] == 1)
    }

    @Test("a body dripped inside every pause is answered 408 once it falls under the minimum rate")
    func drippedBody() async throws {
        let fixture = try await Self.connected { $0.minBodyRate = 240 }
        try await Self.startUpload(fixture, length: 100)
        await fixture.channel.testingEventLoop.advanceTime(by: .seconds(20))
        try await fixture.channel.writeInbound(HTTPServerRequestPart.body(ByteBuffer(string: "d")))
        await fixture.channel.testingEventLoop.advanceTime(by: .seconds(9))
        #expect(fixture.channel.isActive, "within the first body timeout only pauses count")
        // 4 bytes in 30 s is far under 240/s: the deadline is the end of the first body timeout,
        // not 30 s after the last part.
        await fixture.channel.testingEventLoop.advanceTime(by: .seconds(2))
        try await Self.expectBodyTimedOut(fixture)
    }

    @Test("no response start within --http-timeout is 503; a started stream is never cut")
    func timeToFirstByte() async throws {
        let fixture = try await Self.connected { $0.httpTimeout = .seconds(2) }
        try await fixture.request(.GET, "/slow/")
        _ = try await fixture.sentRequest()
        await fixture.channel.testingEventLoop.advanceTime(by: .seconds(3))
        let (late, _) = try await fixture.response()
        #expect(late.status == .serviceUnavailable)
        #expect(fixture.server.counters[.timedOutResponse] == 1)
        let disconnect = try #require(try await fixture.layer.receive(channels: [ASGIChannel.httpDisconnect], timeout: .seconds(5)))
        #expect(disconnect.message.replyChannel != nil, "the application is told its answer will not be delivered")

        try await fixture.request(.GET, "/events/")
        let stream = try await fixture.sentRequest()
        fixture.server.router.deliver(
            HTTPResponseStart(status: 200, content: Array("a".utf8), moreContent: true).message, to: stream.replyChannel.rawValue)
        await fixture.channel.testingEventLoop.advanceTime(by: .seconds(3600))
        fixture.server.router.deliver(
            HTTPResponseChunk(content: Array("b".utf8), moreContent: false).message, to: stream.replyChannel.rawValue)
        let (head, body) = try await fixture.response()
        #expect(head.status == .ok && body == "ab", "an hour-long stream arrives whole under a 2 s --http-timeout")
        #expect(fixture.channel.isActive)
    }

    @Test("a kept-alive connection left idle closes; a fresh one that sends nothing too")
    func idle() async throws {
        let fixture = try await Self.connected()
        try await fixture.request(.GET, "/a/")
        let request = try await fixture.sentRequest()
        fixture.server.router.deliver(HTTPResponseStart(status: 200, content: Array("x".utf8)).message, to: request.replyChannel.rawValue)
        _ = try await fixture.response()
        await fixture.channel.testingEventLoop.advanceTime(by: .seconds(19))
        #expect(fixture.channel.isActive)
        await fixture.channel.testingEventLoop.advanceTime(by: .seconds(2))
        try await fixture.channel.closeFuture.get()
        #expect(fixture.server.counters[.closedIdle] == 1)

        let fresh = try await Self.connected()
        await fresh.channel.testingEventLoop.advanceTime(by: .seconds(11))
        try await fresh.channel.closeFuture.get()
        #expect(fresh.server.counters[.closedIdle] == 1)
        #expect(try await fresh.channel.readOutbound(as: HTTPServerResponsePart.self) == nil, "closed without an answer")
    }

    @Test("a large body goes to the application as it arrives, before the request ends")
    func streamedBody() async throws {
        let fixture = try await Self.connected { $0.bodyChunkSize = 4 }
        var head = HTTPRequestHead(version: .http1_1, method: .POST, uri: "/upload/")
        head.headers.add(name: "Host", value: "localhost")
        head.headers.add(name: "Content-Length", value: "11")
        try await fixture.channel.writeInbound(HTTPServerRequestPart.head(head))
        try await fixture.channel.writeInbound(HTTPServerRequestPart.body(ByteBuffer(string: "abcdef")))
        // The request is with the application while the body is still coming.
        let request = try await fixture.sentRequest()
        #expect(request.body == Array("abcd".utf8))
        let bodyChannel = try #require(request.bodyChannel)
        try await fixture.channel.writeInbound(HTTPServerRequestPart.body(ByteBuffer(string: "ghijk")))
        try await fixture.channel.writeInbound(HTTPServerRequestPart.end(nil))
        var rest: [UInt8] = []
        var more = true
        while more {
            let received = try #require(try await fixture.layer.receive(channels: [bodyChannel], timeout: .seconds(5)))
            let chunk = try HTTPBodyChunk(received.message)
            #expect(chunk.content.count <= 4 && !chunk.closed)
            rest += chunk.content
            more = chunk.moreContent
        }
        #expect(rest == Array("efghijk".utf8))
    }

    @Test("a streamed body past --max-body-size closes the body channel and answers 413")
    func streamedBodyTooLarge() async throws {
        let fixture = try await Self.connected {
            $0.bodyChunkSize = 4
            $0.maxBodySize = 10
        }
        var head = HTTPRequestHead(version: .http1_1, method: .POST, uri: "/upload/")
        head.headers.add(name: "Host", value: "localhost")
        head.headers.add(name: "Transfer-Encoding", value: "chunked")
        try await fixture.channel.writeInbound(HTTPServerRequestPart.head(head))
        try await fixture.channel.writeInbound(HTTPServerRequestPart.body(ByteBuffer(string: "abcdef")))
        let request = try await fixture.sentRequest()
        let bodyChannel = try #require(request.bodyChannel)
        try await fixture.channel.writeInbound(HTTPServerRequestPart.body(ByteBuffer(string: "ghijkl")))
        let (response, _) = try await fixture.response()
        #expect(response.status == .payloadTooLarge)
        var closed = false
        while let received = try await fixture.layer.receive(channels: [bodyChannel], timeout: .seconds(2)) {
            if try HTTPBodyChunk(received.message).closed { closed = true }
        }
        #expect(closed, "the consumer reading the body hears that it will not end")
        try await fixture.channel.writeInbound(HTTPServerRequestPart.end(nil))
        #expect(try await fixture.channel.readOutbound(as: HTTPServerResponsePart.self) == nil, "no second answer")
    }
}

/// Log lines kept in memory (message and metadata), to check what a log says.
struct CapturedLog: LogHandler {
    final class Lines: Sendable {
        let all = Mutex<[String]>([])
    }

    let lines = Lines()
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(
        level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?, source: String, file: String,
        function: String, line: UInt
    ) {
        lines.all.withLock { $0.append("\(message) \(metadata ?? [:])") }
    }

    var text: String { lines.all.withLock { $0.joined(separator: "\n") } }
}
