import NIOCore
import NIOEmbedded
import Testing

@testable import InterfaceServer

/// The ping wheel on an embedded event loop (its clock moves only when told): each socket is
/// pinged once per interval, a socket that leaves is never pinged again and takes nothing with
/// it, and the wheel's one timer runs only while it holds sockets.
@Suite("Ping wheel")
struct PingWheelTests {
    final class Socket: PingedSocket {
        let id: Int
        var pingPlace: (bucket: Int, index: Int)?
        var pings = 0
        init(_ id: Int) { self.id = id }
        func ping() { pings += 1 }
    }

    @Test("1,000 sockets joining over a turn are each pinged once per interval; 500 leaving in random order are never pinged again")
    func everySocketOncePerIntervalAndLeaversNever() throws {
        let loop = EmbeddedEventLoop()
        let wheel = PingWheel<Socket>(loop: loop, interval: .seconds(8))
        #expect(!wheel.isTicking)
        // Joins spread over one interval (8 ticks of 1 s), as sockets come in.
        var sockets: [Socket] = []
        for i in 0..<1_000 {
            let socket = Socket(i)
            wheel.add(socket)
            sockets.append(socket)
            if i % 125 == 124 { loop.advanceTime(by: .seconds(1)) }
        }
        #expect(wheel.isTicking && wheel.sockets == 1_000)
        // A socket is first pinged between 7 and 8 s after it joined, then every 8 s.
        for socket in sockets { socket.pings = 0 }
        loop.advanceTime(by: .seconds(16))
        #expect(sockets.allSatisfy { $0.pings == 2 }, "pings per socket: \(Set(sockets.map(\.pings)))")
        // Half leave, in random order: the others keep their pace, the leavers get nothing.
        var generator = SystemRandomNumberGenerator()
        let leaving = Set(sockets.indices.shuffled(using: &generator).prefix(500))
        for index in leaving.shuffled(using: &generator) { wheel.remove(sockets[index]) }
        #expect(wheel.sockets == 500)
        for socket in sockets { socket.pings = 0 }
        loop.advanceTime(by: .seconds(24))
        for (index, socket) in sockets.enumerated() {
            #expect(socket.pings == (leaving.contains(index) ? 0 : 3), "socket \(index)")
            #expect((socket.pingPlace == nil) == leaving.contains(index))
        }
        // Removing twice is nothing; the last one out stops the timer.
        wheel.remove(sockets[leaving.first!])
        for (index, socket) in sockets.enumerated() where !leaving.contains(index) { wheel.remove(socket) }
        #expect(wheel.sockets == 0 && !wheel.isTicking)
        loop.advanceTime(by: .seconds(24))
        #expect(sockets.allSatisfy { $0.pings == 3 || $0.pings == 0 })
        // And starts again with the next socket.
        let late = Socket(1_000)
        wheel.add(late)
        #expect(wheel.isTicking)
        loop.advanceTime(by: .seconds(8))
        #expect(late.pings == 1)
        try loop.syncShutdownGracefully()
    }

    @Test("a socket that closes from inside its ping (unresponsive) leaves the wheel without upsetting the turn")
    func aSocketLeavingDuringItsPing() throws {
        final class Closing: PingedSocket {
            var pingPlace: (bucket: Int, index: Int)?
            var wheel: PingWheel<Closing>?
            var pings = 0
            let closes: Bool
            init(closes: Bool) { self.closes = closes }
            func ping() {
                pings += 1
                if closes { wheel?.remove(self) }
            }
        }
        let loop = EmbeddedEventLoop()
        let wheel = PingWheel<Closing>(loop: loop, interval: .seconds(8))
        let sockets = (0..<10).map { Closing(closes: $0 % 2 == 0) }
        for socket in sockets {
            socket.wheel = wheel
            wheel.add(socket)
        }
        loop.advanceTime(by: .seconds(16))
        for (index, socket) in sockets.enumerated() {
            #expect(socket.pings == (index % 2 == 0 ? 1 : 2), "socket \(index)")
        }
        #expect(wheel.sockets == 5)
        try loop.syncShutdownGracefully()
    }
}
