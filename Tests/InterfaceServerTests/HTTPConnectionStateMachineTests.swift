import Testing

@testable import InterfaceServer

/// Every transition of the HTTP connection's deadlines, without sockets or clocks.
@Suite("HTTP connection state machine")
struct HTTPConnectionStateMachineTests {
    typealias Machine = HTTPConnectionStateMachine
    static let timeouts = Machine.Timeouts(header: .seconds(10), body: .seconds(30), firstByte: .seconds(60), keepAlive: .seconds(20))

    @Test func aRequestAndAKeptAliveConnection() {
        var machine = Machine(timeouts: Self.timeouts)
        #expect(machine.opened() == .arm(.header, after: .seconds(10)))
        // The first byte of a fresh connection does not restart its header deadline.
        #expect(machine.bytesArrived() == .none)
        #expect(machine.state == .readingHead)
        #expect(machine.headReceived() == .arm(.body, after: .seconds(30)))
        #expect(machine.bodyReceived() == .arm(.body, after: .seconds(30)))
        #expect(machine.requestEnded() == .arm(.firstByte, after: .seconds(60)))
        #expect(machine.state == .awaitingResponse)
        #expect(machine.responseStarted() == .disarm)
        // A started response is not cut by any deadline, however long it streams.
        #expect(machine.deadlinePassed(.firstByte) == .none)
        #expect(machine.state == .responding(requestEnded: true))
        #expect(machine.responseEnded(keepAlive: true) == .arm(.keepAlive, after: .seconds(20)))
        #expect(machine.state == .idle(fresh: false))
        // The next request's first byte starts its own header deadline.
        #expect(machine.bytesArrived() == .arm(.header, after: .seconds(10)))
        #expect(machine.headReceived() == .arm(.body, after: .seconds(30)))
    }

    @Test func slowLorisHeadIsAnswered408() {
        var machine = Machine(timeouts: Self.timeouts)
        _ = machine.opened()
        _ = machine.bytesArrived()
        #expect(machine.deadlinePassed(.header) == .answer(status: 408, close: true))
        #expect(machine.state == .closed)
        #expect(machine.deadlinePassed(.header) == .none)
        #expect(machine.headReceived() == .none)
    }

    @Test func aConnectionThatSendsNothingIsClosedWithoutAnswer() {
        var machine = Machine(timeouts: Self.timeouts)
        _ = machine.opened()
        #expect(machine.deadlinePassed(.header) == .close)
        #expect(machine.state == .closed)
    }

    @Test func aStalledBodyIsAnswered408() {
        var machine = Machine(timeouts: Self.timeouts)
        _ = machine.opened()
        _ = machine.headReceived()
        #expect(machine.deadlinePassed(.body) == .answer(status: 408, close: true))
    }

    @Test func noResponseInTimeIs503AndTheConnectionLives() {
        var machine = Machine(timeouts: Self.timeouts)
        _ = machine.opened()
        _ = machine.headReceived()
        _ = machine.requestEnded()
        #expect(machine.deadlinePassed(.firstByte) == .answer(status: 503, close: false))
        #expect(machine.state == .responding(requestEnded: true))
        #expect(machine.responseEnded(keepAlive: true) == .arm(.keepAlive, after: .seconds(20)))
    }

    @Test func idleKeepAliveIsClosed() {
        var machine = Machine(timeouts: Self.timeouts)
        _ = machine.opened()
        _ = machine.headReceived()
        _ = machine.requestEnded()
        _ = machine.responseStarted()
        _ = machine.responseEnded(keepAlive: true)
        #expect(machine.deadlinePassed(.keepAlive) == .close)
    }

    @Test func staleDeadlinesAreIgnored() {
        var machine = Machine(timeouts: Self.timeouts)
        _ = machine.opened()
        _ = machine.headReceived()
        // The header deadline raced with the head: it no longer applies.
        #expect(machine.deadlinePassed(.header) == .none)
        #expect(machine.deadlinePassed(.keepAlive) == .none)
        _ = machine.requestEnded()
        #expect(machine.deadlinePassed(.body) == .none)
        #expect(machine.state == .awaitingResponse)
    }

    @Test func closeWithoutKeepAliveAndAfterClose() {
        var machine = Machine(timeouts: Self.timeouts)
        _ = machine.opened()
        _ = machine.headReceived()
        _ = machine.requestEnded()
        _ = machine.responseStarted()
        #expect(machine.responseEnded(keepAlive: false) == .close)
        #expect(machine.closed() == .none)
        var other = Machine(timeouts: Self.timeouts)
        _ = other.opened()
        #expect(other.closed() == .disarm)
        #expect(other.bytesArrived() == .none)
        #expect(other.responseEnded(keepAlive: true) == .none)
    }

    @Test func anAnswerBeforeTheBodyEndsWaitsForTheBodyUnderItsDeadline() {
        // An application (or the server: 413, 431, 400) that answers before the body ended.
        var machine = Machine(timeouts: Self.timeouts)
        _ = machine.opened()
        _ = machine.headReceived()
        #expect(machine.responseStarted() == .disarm)
        #expect(machine.state == .responding(requestEnded: false))
        #expect(machine.deadlinePassed(.body) == .none)
        #expect(machine.bodyReceived() == .none, "no deadline while the response is written")
        // The response ends first: the rest of the body is not a new request's head.
        #expect(machine.responseEnded(keepAlive: true) == .arm(.body, after: .seconds(30)))
        #expect(machine.state == .finishingBody)
        #expect(machine.bytesArrived() == .none)
        #expect(machine.bodyReceived() == .arm(.body, after: .seconds(30)))
        #expect(machine.requestEnded() == .arm(.keepAlive, after: .seconds(20)))
        #expect(machine.state == .idle(fresh: false))
        // A body that stops coming after the answer: closed, nothing more written.
        var stalled = Machine(timeouts: Self.timeouts)
        _ = stalled.opened()
        _ = stalled.headReceived()
        _ = stalled.responseStarted()
        _ = stalled.responseEnded(keepAlive: true)
        #expect(stalled.deadlinePassed(.body) == .close)
    }

    @Test func aPipelinedRequestDeliveredDuringTheEndWriteIsTimedNormally() {
        // NIO hands the next pipelined head over while the previous response's end is being
        // written: the response must already count as ended.
        var machine = Machine(timeouts: Self.timeouts)
        _ = machine.opened()
        _ = machine.headReceived()
        _ = machine.requestEnded()
        _ = machine.responseStarted()
        _ = machine.responseEnded(keepAlive: true)
        #expect(machine.headReceived() == .arm(.body, after: .seconds(30)))
        #expect(machine.requestEnded() == .arm(.firstByte, after: .seconds(60)))
        #expect(machine.deadlinePassed(.firstByte) == .answer(status: 503, close: false))
    }

    @Test func aBodyDrippedJustInsideEveryPauseIsCutByTheMinimumRate() {
        var timeouts = Self.timeouts
        timeouts.minBodyRate = 100
        var machine = Machine(timeouts: timeouts)
        _ = machine.opened()
        #expect(machine.headReceived() == .arm(.body, after: .seconds(30)))
        // Within the first body timeout, the pause rule alone.
        #expect(machine.bodyReceived(10, elapsed: .seconds(29)) == .arm(.body, after: .seconds(1)))
        // 10 bytes by 29 s: the average falls under 100/s at 30 s at the latest.
        #expect(machine.bodyReceived(10, elapsed: .seconds(29.5)) == .arm(.body, after: .seconds(0.5)))
        // Past it: the deadline is now, and it answers 408.
        #expect(machine.bodyReceived(10, elapsed: .seconds(45)) == .arm(.body, after: .zero))
        #expect(machine.deadlinePassed(.body) == .answer(status: 408, close: true))
    }

    @Test func aBodyAtTheMinimumRateIsNeverCut() {
        var timeouts = Self.timeouts
        timeouts.minBodyRate = 100
        var machine = Machine(timeouts: timeouts)
        _ = machine.opened()
        _ = machine.headReceived()
        // 200 bytes a second for ten minutes: the next part always has at least 15 s (at 15 s the
        // first 30 s end; after that the average stays ahead of the minimum).
        for second in 1...600 {
            guard case .arm(.body, let after) = machine.bodyReceived(200, elapsed: .seconds(second)) else {
                Issue.record("no body deadline armed at \(second) s")
                return
            }
            #expect(after >= .seconds(15) && after <= .seconds(30), "at \(second) s: \(after)")
        }
        #expect(machine.bodyBytes == 120_000)
        // A new request's body is counted from zero.
        _ = machine.requestEnded()
        _ = machine.responseStarted()
        _ = machine.responseEnded(keepAlive: true)
        _ = machine.bytesArrived()
        _ = machine.headReceived()
        #expect(machine.bodyBytes == 0)
    }

    @Test func withoutAMinimumRateOnlyPausesCount() {
        var machine = Machine(timeouts: Self.timeouts)
        _ = machine.opened()
        _ = machine.headReceived()
        #expect(machine.bodyReceived(1, elapsed: .seconds(3600)) == .arm(.body, after: .seconds(30)))
    }
}
