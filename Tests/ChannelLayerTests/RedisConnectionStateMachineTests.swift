import ASGI
import NIOCore
import NIOEmbedded
import Testing

@testable import RedisChannelLayer

/// The Redis connection's bookkeeping with no I/O at all, then the protocol handler on NIO's
/// `EmbeddedChannel` with a virtual clock: RESP out, replies in, in order, and every way a
/// connection fails.
@Suite("Redis connection state machine", .timeLimit(.minutes(2)))
struct RedisConnectionStateMachineTests {
    typealias Machine = RedisConnectionStateMachine<String>
    let endpoint = RedisEndpoint(host: "redis.test", port: 6390)
    let start = NIODeadline.uptimeNanoseconds(1_000_000_000)

    @Test("pipelined requests complete in write order, each with exactly its own replies")
    func pipelinedRequestsCompleteInOrder() {
        var machine = Machine(endpoint: endpoint, now: start)
        guard case .write(let armed) = machine.write(commands: 2, waiter: "a", timeout: .seconds(5), now: start) else {
            Issue.record("the first write was refused")
            return
        }
        #expect(armed == start + .seconds(5))
        // A second request while the timer runs: written, no second timer.
        guard case .write(nil) = machine.write(commands: 1, waiter: "b", timeout: .seconds(5), now: start) else {
            Issue.record("the second write armed another timer or was refused")
            return
        }
        #expect(machine.waiting == 2)
        guard case .none = machine.replyReceived(.integer(1)) else {
            Issue.record("a's first reply completed it")
            return
        }
        guard case .succeed("a", let replies) = machine.replyReceived(.status("OK")) else {
            Issue.record("a did not complete with its second reply")
            return
        }
        #expect(replies == [.integer(1), .status("OK")])
        guard case .succeed("b", let replies) = machine.replyReceived(.null) else {
            Issue.record("b did not complete")
            return
        }
        #expect(replies == [.null] && machine.waiting == 0 && machine.failure == nil)
    }

    @Test("a reply nobody asked for fails the connection, and every later write fails with that error")
    func unsolicitedReplyFailsConnection() {
        var machine = Machine(endpoint: endpoint, now: start)
        guard case .failConnection(let error, let waiters) = machine.replyReceived(.integer(7)) else {
            Issue.record("an unsolicited reply was accepted")
            return
        }
        #expect(waiters.isEmpty && error.code == .connectionLost)
        #expect(error.message.contains("redis.test:6390") && error.message.contains("nobody asked for"))
        guard case .fail(let later) = machine.write(commands: 1, waiter: "late", timeout: .seconds(1), now: start) else {
            Issue.record("a write after the failure was accepted")
            return
        }
        #expect(later.message == error.message)
    }

    @Test("the timer moves on to the next request when the oldest was answered, and fails a stalled connection")
    func timerFollowsOldestAndFailsStall() {
        var machine = Machine(endpoint: endpoint, now: start)
        _ = machine.write(commands: 1, waiter: "a", timeout: .seconds(1), now: start)
        _ = machine.write(commands: 1, waiter: "b", timeout: .seconds(3), now: start + .milliseconds(500))
        _ = machine.replyReceived(.integer(1))  // a answered
        machine.bytesRead(now: start + .milliseconds(600))
        // The timer armed for a fires; b is not due yet: rearm at b's deadline.
        guard case .rearm(let next) = machine.timerFired(now: start + .seconds(1)) else {
            Issue.record("the timer did not move on to b")
            return
        }
        #expect(next == start + .milliseconds(3_500) && machine.timerArmed)
        // At b's deadline, the last bytes (a's reply, at 0.6 s) are not yet b's timeout old:
        // the stall is counted from them.
        guard case .rearm(let stall) = machine.timerFired(now: next) else {
            Issue.record("the timer did not wait out the silence")
            return
        }
        #expect(stall == start + .milliseconds(3_600))
        // Nothing more arrives: the socket is set to probe its peer; one that cannot be (not
        // TCP) fails the connection, and b with it.
        guard case .probePeer = machine.timerFired(now: stall) else {
            Issue.record("a stalled connection's peer was not probed")
            return
        }
        guard case .failConnection(let error, let waiters) = machine.peerProbeSet(false, now: stall) else {
            Issue.record("a stalled connection that cannot probe was not failed")
            return
        }
        #expect(waiters == ["b"] && error.message.contains("no reply in time") && !machine.timerArmed)
        #expect(machine.failure != nil)
    }

    /// The process was stopped (SIGSTOP) past the deadline: its loop runs the timer before it
    /// reads the replies that came meanwhile. Failing then would fail commands Redis ran.
    @Test("a timer that runs long after its deadline (this process stalled) gives a fresh window, not a failure")
    func aStalledProcessIsNotAStalledRedis() {
        var machine = Machine(endpoint: endpoint, now: start)
        _ = machine.write(commands: 1, waiter: "send", timeout: .seconds(5), now: start)
        let deadline = start + .seconds(5)
        // Frozen for 7 s from 1 s: the timer runs at 8 s, 3 s late, before any read.
        guard case .rearm(let next) = machine.timerFired(now: start + .seconds(8), armedFor: deadline) else {
            Issue.record("a late timer failed the connection")
            return
        }
        #expect(next == start + .seconds(13))
        guard case .succeed("send", _) = machine.replyReceived(.integer(1)) else {
            Issue.record("the reply that was waiting did not complete the send")
            return
        }
        // On time, with nothing read: a silent Redis still fails the connection.
        _ = machine.write(commands: 1, waiter: "next", timeout: .seconds(5), now: start + .seconds(9))
        guard case .probePeer = machine.timerFired(now: start + .seconds(14), armedFor: start + .seconds(14)),
            case .failConnection(_, let waiters) = machine.peerProbeSet(false, now: start + .seconds(14))
        else {
            Issue.record("a silent Redis was not found out")
            return
        }
        #expect(waiters == ["next"])
    }

    /// A loop that runs every timer late (overloaded, or paused again and again) gets one
    /// fresh window per request, not one per late timer: a Redis that stopped answering is
    /// still found out.
    @Test("a timer late every time forgives a request once, then a silent Redis fails the connection")
    func aLoopAlwaysLateStillFindsADeadRedis() {
        var machine = Machine(endpoint: endpoint, now: start)
        _ = machine.write(commands: 1, waiter: "stuck", timeout: .seconds(5), now: start)
        guard case .rearm(let next) = machine.timerFired(now: start + .milliseconds(5_600), armedFor: start + .seconds(5)) else {
            Issue.record("the first late timer did not forgive the stall")
            return
        }
        guard case .failConnection(_, let waiters) = machine.timerFired(now: next + .milliseconds(600), armedFor: next) else {
            Issue.record("a Redis silent through a second late timer was not found out")
            return
        }
        #expect(waiters == ["stuck"])
    }

    /// Redis stopped (SIGSTOP, a long command) while its host's kernel still acknowledges: the
    /// commands it holds run when it comes back. Failing the connection at the timeout would
    /// lose what a take took (its reply thrown away) and repeat a send retried elsewhere, as
    /// a Redis frozen 7 s did (4 echoes repeated, 2 lost). The socket probes its peer instead:
    /// the kernel closes it when the host stops answering (that is the partition case), and
    /// while it stays up the reply is waited for, up to `longestWaitOnLiveHost`.
    @Test("an overdue reply on a connection whose peer still acknowledges is waited for, up to a bound")
    func aStoppedRedisIsWaitedForWhileItsHostAnswers() {
        var machine = Machine(endpoint: endpoint, now: start)
        answerOnce(&machine)
        _ = machine.write(commands: 1, waiter: "take", timeout: .seconds(5), now: start)
        let due = start + .seconds(5)
        guard case .probePeer = machine.timerFired(now: due, armedFor: due) else {
            Issue.record("the peer was not probed")
            return
        }
        guard case .rearm(let look) = machine.peerProbeSet(true, now: due), look == due + .seconds(3) else {
            Issue.record("a probed peer was not given a probe window")
            return
        }
        #expect(machine.peerProbed && machine.timerArmed)
        // Still up a window later (the host answered the probes): keep waiting.
        guard case .rearm(let again) = machine.timerFired(now: look, armedFor: look), again == look + .seconds(3) else {
            Issue.record("a connection whose host answers was given up on")
            return
        }
        #expect(machine.failure == nil)
        // Redis comes back: the reply completes the take; nothing was failed.
        machine.bytesRead(now: start + .seconds(7))
        guard case .succeed("take", _) = machine.replyReceived(.array([])) else {
            Issue.record("the reply that came late did not complete the take")
            return
        }
        // A second stall on the same connection: already probing, so no second probe.
        _ = machine.write(commands: 1, waiter: "send", timeout: .seconds(5), now: start + .seconds(10))
        let due2 = start + .seconds(15)
        guard case .rearm(var next) = machine.timerFired(now: due2, armedFor: due2) else {
            Issue.record("a second stall was not waited on")
            return
        }
        // Past the bound it fails, though the host still answers.
        while next - due2 < RedisConnectionStateMachine<String>.longestWaitOnLiveHost {
            guard case .rearm(let later) = machine.timerFired(now: next, armedFor: next) else {
                Issue.record("gave up before the bound")
                return
            }
            next = later
        }
        guard case .failConnection(let error, let waiters) = machine.timerFired(now: next, armedFor: next) else {
            Issue.record("a Redis that never answers was waited for past the bound")
            return
        }
        #expect(waiters == ["send"] && error.message.contains("still acknowledges"))
    }

    /// A first command answered: the peer is a Redis.
    func answerOnce(_ machine: inout Machine) {
        _ = machine.write(commands: 1, waiter: "hello", timeout: .seconds(5), now: start)
        _ = machine.replyReceived(.status("OK"))
    }

    /// A Redis that answered once, then `waiter`'s request overdue and its socket set probing:
    /// when the timer looks next (nil if the machine did not get there).
    func probedWhileOverdue(_ machine: inout Machine, waiter: String) -> NIODeadline? {
        answerOnce(&machine)
        _ = machine.write(commands: 1, waiter: waiter, timeout: .seconds(5), now: start)
        let due = start + .seconds(5)
        guard case .probePeer = machine.timerFired(now: due, armedFor: due),
            case .rearm(let look) = machine.peerProbeSet(true, now: due)
        else { return nil }
        return look
    }

    @Test("a peer that never answered (a port that accepts and says nothing) is not waited for past the timeout")
    func aPeerThatNeverAnsweredIsNotWaitedFor() {
        var machine = Machine(endpoint: endpoint, now: start)
        _ = machine.write(commands: 1, waiter: "first", timeout: .seconds(5), now: start)
        guard case .failConnection(_, let waiters) = machine.timerFired(now: start + .seconds(5), armedFor: start + .seconds(5)) else {
            Issue.record("a peer that never answered was waited for")
            return
        }
        #expect(waiters == ["first"])
    }

    @Test("a probed connection whose sent data stays unacknowledged (the host is cut off) fails at the next look")
    func aProbedPeerThatStopsAcknowledgingFails() {
        var machine = Machine(endpoint: endpoint, now: start)
        guard let look = probedWhileOverdue(&machine, waiter: "send") else {
            Issue.record("no probe window")
            return
        }
        // A full receive window at a stopped Redis: everything sent acknowledged, wait on.
        guard case .rearm(let next) = machine.timerFired(now: look, armedFor: look, peer: .acknowledging) else {
            Issue.record("a host that acknowledges was given up on")
            return
        }
        guard case .failConnection(let error, let waiters) = machine.timerFired(now: next, armedFor: next, peer: .notAcknowledging)
        else {
            Issue.record("a host that stopped acknowledging was waited for")
            return
        }
        #expect(waiters == ["send"] && error.message.contains("no longer acknowledges"))
    }

    @Test("a connection closed under the probe (the host stopped answering) fails its callers at once")
    func aProbedPeerThatVanishesFails() {
        var machine = Machine(endpoint: endpoint, now: start)
        guard let look = probedWhileOverdue(&machine, waiter: "take") else {
            Issue.record("no probe window")
            return
        }
        // The kernel closes the socket (ETIMEDOUT): the handler reports the error.
        guard case .failConnection(_, let waiters) = machine.fail("Connection timed out") else {
            Issue.record("a closed probed connection did not fail its waiters")
            return
        }
        #expect(waiters == ["take"])
        guard case .none = machine.timerFired(now: look, armedFor: look) else {
            Issue.record("a failed connection's timer did something")
            return
        }
    }

    @Test("a late reply whose bytes are still arriving gets more time")
    func slowLargeReplyIsProgress() {
        var machine = Machine(endpoint: endpoint, now: start)
        _ = machine.write(commands: 1, waiter: "big", timeout: .seconds(2), now: start)
        machine.bytesRead(now: start + .milliseconds(1_900))  // part of a large reply
        guard case .rearm(let next) = machine.timerFired(now: start + .seconds(2)) else {
            Issue.record("a reply in progress was failed")
            return
        }
        #expect(next == start + .milliseconds(3_900))
        guard case .succeed("big", _) = machine.replyReceived(.string(Array(repeating: 1, count: 10))) else {
            Issue.record("the reply did not complete")
            return
        }
        guard case .none = machine.timerFired(now: next) else {
            Issue.record("an idle connection's timer did something")
            return
        }
        #expect(!machine.timerArmed)
    }

    @Test("a closed connection fails every waiter once, and keeps its first error")
    func closeFailsWaiters() {
        var machine = Machine(endpoint: endpoint, now: start)
        _ = machine.write(commands: 3, waiter: "a", timeout: .seconds(5), now: start)
        _ = machine.write(commands: 1, waiter: "b", timeout: .seconds(5), now: start)
        _ = machine.replyReceived(.integer(1))
        guard case .failConnection(let error, let waiters) = machine.closed() else {
            Issue.record("close did not fail the waiters")
            return
        }
        #expect(waiters == ["a", "b"] && error.message.contains("closed"))
        guard case .failConnection(let again, let none) = machine.fail("protocol error") else {
            Issue.record("a second failure was not reported")
            return
        }
        #expect(none.isEmpty && again.message == error.message)
    }

    // MARK: the handler on an embedded channel

    private let handler = RedisProtocolHandler(endpoint: RedisEndpoint(host: "redis.test", port: 6390))

    private func connected() throws -> EmbeddedChannel {
        let channel = EmbeddedChannel(handler: handler)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 6390)).wait()
        return channel
    }

    /// A request as `RedisConnection` makes it: handed to the handler on its loop
    /// (`enqueue`); `throughPipeline` writes it down the channel pipeline instead.
    private func request(
        _ channel: EmbeddedChannel, _ commands: [[String]], timeout: Duration = .seconds(5), throughPipeline: Bool = false
    ) throws -> EventLoopFuture<[RedisReply]> {
        let promise = channel.eventLoop.makePromise(of: [RedisReply].self)
        let arguments = commands.map { $0.map(RedisArgument.text) }
        let request = RedisRequest(
            bytes: RedisCommandEncoding.encode(arguments), commands: arguments.count, waiter: .promise(promise), timeout: timeout)
        if throughPipeline {
            let written = channel.eventLoop.makePromise(of: Void.self)
            written.futureResult.whenFailure { promise.fail($0) }
            channel.writeAndFlush(request, promise: written)
        } else {
            handler.enqueue(request)
        }
        return promise.futureResult
    }

    private func written(_ channel: EmbeddedChannel) throws -> String {
        var text = ""
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) { text += String(buffer: buffer) }
        return text
    }

    private func result(_ future: EventLoopFuture<[RedisReply]>) -> Result<[RedisReply], any Error>? {
        var outcome: Result<[RedisReply], any Error>?
        future.whenComplete { outcome = $0 }
        return outcome
    }

    @Test("the handler writes RESP once per tick and completes callers from replies split across reads")
    func handlerPipelinesOverEmbeddedChannel() throws {
        let channel = try connected()
        let first = try request(channel, [["SET", "k", "v"], ["GET", "k"]])
        let second = try request(channel, [["LLEN", "list"]])
        channel.embeddedEventLoop.run()
        let resp = "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n" + "*2\r\n$3\r\nGET\r\n$1\r\nk\r\n" + "*2\r\n$4\r\nLLEN\r\n$4\r\nlist\r\n"
        #expect(try written(channel) == resp)
        // Replies arrive cut at awkward places.
        try channel.writeInbound(ByteBuffer(string: "+OK\r\n$1\r"))
        #expect(result(first) == nil)
        try channel.writeInbound(ByteBuffer(string: "\nv\r\n:4"))
        #expect(try result(first)?.get() == [.status("OK"), .string(Array("v".utf8))])
        #expect(result(second) == nil)
        try channel.writeInbound(ByteBuffer(string: "2\r\n"))
        #expect(try result(second)?.get() == [.integer(42)])
        #expect(channel.isActive)
        // The pipeline path (a write down the channel) goes the same way.
        let third = try request(channel, [["PING"]], throughPipeline: true)
        channel.embeddedEventLoop.run()
        #expect(try written(channel) == "*1\r\n$4\r\nPING\r\n")
        try channel.writeInbound(ByteBuffer(string: "+PONG\r\n"))
        #expect(try result(third)?.get() == [.status("PONG")])
        _ = try channel.finish()
        // Once the handler has left the pipeline, a request fails at once instead of waiting.
        let late = try request(channel, [["PING"]])
        #expect(throws: ChannelLayerError.self) { try #require(result(late)).get() }
    }

    @Test("on the virtual clock: a peer that never answered fails the callers at the timeout and closes; a write after that fails at once")
    func handlerTimesOutOnVirtualClock() throws {
        let channel = try connected()
        let call = try request(channel, [["PING"]], timeout: .seconds(2))
        channel.embeddedEventLoop.advanceTime(by: .milliseconds(1_999))
        #expect(result(call) == nil && channel.isActive)
        channel.embeddedEventLoop.advanceTime(by: .milliseconds(1))
        #expect(throws: ChannelLayerError.self) { try #require(result(call)).get() }
        #expect(!channel.isActive)
        let late = try request(channel, [["PING"]])
        #expect(throws: (any Error).self) { try #require(result(late)).get() }
    }

    @Test(
        "on the virtual clock: a Redis that answered before and goes silent gets its socket probing, is waited for while it stays up, then fails the callers"
    )
    func handlerWaitsForAStoppedRedis() throws {
        let channel = try connected()
        let hello = try request(channel, [["PING"]], timeout: .seconds(2))
        try channel.writeInbound(ByteBuffer(string: "+PONG\r\n"))
        #expect(try result(hello)?.get() == [.status("PONG")])
        let call = try request(channel, [["PING"]], timeout: .seconds(2))
        channel.embeddedEventLoop.advanceTime(by: .seconds(2))
        // Due: the socket is set to probe its peer, and the call still waits.
        #expect(result(call) == nil && channel.isActive)
        // (EmbeddedChannel keeps one socket option, the last set: TCP_KEEPCNT, set last.)
        let probes = ChannelOptions.Types.SocketOption(level: .tcp, name: NIOBSDSocket.Option(rawValue: 6))
        #expect(try channel.syncOptions?.getOption(probes) == 2, "two unanswered keepalive probes close it")
        // The socket stays up (its host answers): waited for up to the bound past the timeout.
        channel.embeddedEventLoop.advanceTime(by: .seconds(57))
        #expect(result(call) == nil && channel.isActive)
        channel.embeddedEventLoop.advanceTime(by: .seconds(6))
        #expect(throws: ChannelLayerError.self) { try #require(result(call)).get() }
        #expect(!channel.isActive)
        let late = try request(channel, [["PING"]])
        #expect(throws: (any Error).self) { try #require(result(late)).get() }
    }

    @Test("garbage from Redis fails the waiting caller with a protocol error and closes the connection")
    func handlerFailsOnProtocolError() throws {
        let channel = try connected()
        let call = try request(channel, [["PING"]])
        channel.embeddedEventLoop.run()
        _ = try written(channel)
        try? channel.writeInbound(ByteBuffer(string: "?what\r\n"))
        do {
            _ = try #require(result(call)).get()
            Issue.record("a garbage reply completed the call")
        } catch let error as ChannelLayerError {
            #expect(error.code == .connectionLost && error.message.contains("protocol error"))
        }
        #expect(!channel.isActive)
    }

    @Test("a -READONLY reply (the server is a replica now) completes its caller, fails the ones behind it and closes")
    func readOnlyReplyRetiresTheConnection() throws {
        var machine = Machine(endpoint: endpoint, now: start)
        _ = machine.write(commands: 1, waiter: "a", timeout: .seconds(5), now: start)
        _ = machine.write(commands: 1, waiter: "b", timeout: .seconds(5), now: start)
        guard
            case .succeedThenRetire("a", let replies, let error, let behind) = machine.replyReceived(
                .error("READONLY You can't write against a read only replica."))
        else {
            Issue.record("a READONLY reply left the connection in use")
            return
        }
        #expect(replies.first?.errorMessage?.hasPrefix("READONLY") == true)
        #expect(behind == ["b"] && error.code == .connectionLost && error.message.contains("read-only replica"))
        guard case .fail = machine.write(commands: 1, waiter: "c", timeout: .seconds(1), now: start) else {
            Issue.record("a write after the retirement was accepted")
            return
        }
        // Any other error reply is the caller's business: the connection stays.
        var other = Machine(endpoint: endpoint, now: start)
        _ = other.write(commands: 1, waiter: "x", timeout: .seconds(5), now: start)
        guard case .succeed("x", _) = other.replyReceived(.error("WRONGTYPE Operation against a key holding the wrong kind of value"))
        else {
            Issue.record("an ordinary error reply closed the connection")
            return
        }

        // On the handler: the caller gets the READONLY reply, the next caller a connection error, and the channel closes.
        let channel = try connected()
        let first = try request(channel, [["RPUSH", "l", "x"]])
        let second = try request(channel, [["RPUSH", "l", "y"]])
        channel.embeddedEventLoop.run()
        _ = try written(channel)
        try? channel.writeInbound(ByteBuffer(string: "-READONLY You can't write against a read only replica.\r\n"))
        #expect(try result(first)?.get().first?.errorMessage?.hasPrefix("READONLY") == true)
        #expect(throws: ChannelLayerError.self) { try #require(result(second)).get() }
        #expect(!channel.isActive)
    }

    @Test("arguments are written as RESP bulk strings: numbers (negative too), joined keys, fresh UUID keys")
    func argumentsEncodeAsRESP() throws {
        let buffer = RedisCommandEncoding.encode([
            .text("SET"), .key("p:", "k"), .integer(-42), .integer(1_234_567), .integer(0), .bytes([0, 255]),
            .key("s:", "x", ":n"),
        ])
        let expected: [UInt8] =
            Array(
                "*7\r\n$3\r\nSET\r\n$3\r\np:k\r\n$3\r\n-42\r\n$7\r\n1234567\r\n$1\r\n0\r\n$2\r\n".utf8) + [0, 255]
            + Array("\r\n$5\r\ns:x:n\r\n".utf8)
        #expect(Array(buffer.readableBytesView) == expected)

        let key = RedisCommandEncoding.encode([.uuidKey(prefix: "asgi:")])
        let text = String(buffer: key)
        let value = try #require(text.split(separator: "\r\n").dropFirst(2).first)
        #expect(text.hasPrefix("*1\r\n$37\r\nasgi:") && value.count == 37)
        let hex = value.dropFirst(5)
        #expect(hex.allSatisfy { "0123456789abcdef".contains($0) })
        #expect(hex[hex.index(hex.startIndex, offsetBy: 12)] == "4", "a version-4 UUID")
        #expect(String(buffer: RedisCommandEncoding.encode([.uuidKey(prefix: "asgi:")])) != text, "fresh each time")
    }
}
