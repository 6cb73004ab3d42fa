import ASGI
import Testing

@testable import InterfaceServer

/// Every transition of a WebSocket's life, without a socket or a clock.
@Suite("WebSocket connection state machine")
struct WebSocketConnectionStateMachineTests {
    typealias Machine = WebSocketConnectionStateMachine

    func send(_ fields: Message) throws -> WebSocketSendMessage { try WebSocketSendMessage(fields) }

    /// Accepted and attached, as after a completed upgrade.
    func open() throws -> Machine {
        var machine = Machine()
        #expect(machine.reply(try send(["accept": true])) == .accept)
        machine.attached()
        #expect(machine.state == .open(attached: true))
        return machine
    }

    @Test func anAcceptOpensAndDataBeforeTheAttachIsHeldThenDelivered() throws {
        var machine = Machine()
        #expect(machine.state == .connecting)
        #expect(machine.reply(try send(["accept": true])) == .accept)
        #expect(machine.state == .open(attached: false))
        #expect(machine.reply(try send(["text": "early"])) == .hold)
        machine.attached()
        #expect(machine.reply(try send(["text": "early"])) == .deliver(close: nil))
        #expect(machine.reply(try send(["text": "bye", "close": 4000])) == .deliver(close: 4000))
    }

    @Test func dataAsTheFirstReplyAcceptsAsInChannels() throws {
        var machine = Machine()
        #expect(machine.reply(try send(["text": "hello"])) == .accept)
        #expect(machine.state == .open(attached: false))
    }

    @Test func anApplicationRefusalTellsTheApplicationNothing() throws {
        var denied = Machine()
        #expect(denied.reply(try send(["accept": false])) == .refuse(.denied, disconnectOrder: nil))
        #expect(denied.state == .closed && !denied.disconnectSent)
        var closed = Machine()
        #expect(closed.reply(try send(["close": true])) == .refuse(.closed, disconnectOrder: nil))
        // Nothing after a refusal: no frames, no second refusal, no disconnect.
        #expect(closed.reply(try send(["text": "late"])) == .none)
        #expect(closed.frameReceived() == nil)
        #expect(closed.clientClosed() == nil)
        #expect(closed.refuseHandshake(.timeout) == .none)
    }

    @Test func aReplyThatNeitherAcceptsNorRefusesIsIgnored() throws {
        var machine = Machine()
        #expect(machine.reply(try send([:])) == .ignoredBeforeAccept)
        #expect(machine.state == .connecting)
    }

    @Test(arguments: [Machine.Refusal.timeout, .clientGone, .shutdown])
    func aRefusalAfterTheConnectWasSentTellsTheApplicationOnce(_ why: Machine.Refusal) throws {
        var machine = Machine()
        #expect(machine.refuseHandshake(why) == .refuse(why, disconnectOrder: 1))
        #expect(machine.disconnectSent)
        // The late answer, the client's close and a second refusal change nothing.
        #expect(machine.reply(try send(["accept": true])) == .none)
        #expect(machine.clientClosed() == nil)
        #expect(machine.refuseHandshake(.clientGone) == .none)
        #expect(machine.close(code: 1001) == .none)
    }

    @Test(arguments: [Machine.Refusal.host, .origin, .unavailable])
    func aRefusalBeforeTheConnectTellsTheApplicationNothing(_ why: Machine.Refusal) {
        var machine = Machine()
        #expect(machine.refuseHandshake(why) == .refuse(why, disconnectOrder: nil))
        #expect(why.status == (why == .host ? 400 : why == .unavailable ? 503 : 403))
    }

    @Test func aServerCloseWhileConnectingRefusesAndTellsTheApplication() {
        var machine = Machine()
        #expect(machine.close(code: 1001) == .refuse(.shutdown, disconnectOrder: 1))
    }

    @Test func framesAreNumberedFromTheConnectAndTheDisconnectComesLast() throws {
        var machine = try open()
        #expect(machine.frameReceived() == 1)
        #expect(machine.frameReceived() == 2)
        #expect(machine.clientClosed() == 3)
        #expect(machine.state == .closed)
        #expect(machine.frameReceived() == nil)
        #expect(machine.clientClosed() == nil)
    }

    @Test func framesBeforeTheAttachAreNumberedToo() throws {
        var machine = Machine()
        _ = machine.reply(try send(["accept": true]))
        #expect(machine.frameReceived() == 1)
    }

    @Test func ourCloseSendsOneCloseFrameAndOneDisconnect() throws {
        var machine = try open()
        _ = machine.frameReceived()
        #expect(machine.close(code: 1000) == .sendCloseFrame(code: 1000, disconnectOrder: 2))
        #expect(machine.state == .closing && machine.closeFrameSent)
        // Frames after our close frame are dropped; a second close does nothing; the client's
        // answering close frame ends it without another disconnect.
        #expect(machine.frameReceived() == nil)
        #expect(machine.close(code: 1011) == .none)
        #expect(machine.reply(try send(["text": "late"])) == .none)
        #expect(machine.clientClosed() == nil)
        #expect(machine.state == .closed)
    }

    @Test func pingsWaitForPongsAndAnUnansweredPingCloses() throws {
        var machine = try open()
        let timeout = Duration.seconds(10)
        #expect(machine.pingDue(now: .seconds(20), timeout: timeout) == .sendPing)
        machine.pongReceived(now: .seconds(21))
        #expect(machine.pingDue(now: .seconds(40), timeout: timeout) == .sendPing)
        // The ping of 40 s is not answered: at the next tick the last pong is 39 s old.
        #expect(machine.pingDue(now: .seconds(60), timeout: timeout) == .closeUnresponsive)
    }

    @Test func noPingsBeforeTheAttachOrAfterTheClose() throws {
        var connecting = Machine()
        #expect(connecting.pingDue(now: .seconds(100), timeout: .seconds(1)) == .none)
        var closed = try open()
        _ = closed.close(code: 1000)
        #expect(closed.pingDue(now: .seconds(100), timeout: .seconds(1)) == .none)
    }
}
