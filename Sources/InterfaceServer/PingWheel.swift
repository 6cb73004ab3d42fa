import NIOCore

/// The WebSocket pings of one event loop's sockets, on one timer instead of one each.
///
/// NIO keeps an event loop's timers in a heap whose cancel is a linear search. With a repeating
/// ping timer per socket, every cancel on that loop (each closing socket's ping, each request's
/// deadline, each connect timeout) walked every open socket's timer: a close storm of N sockets
/// cost O(N²). Here the sockets sit in `slots` buckets, one bucket pinged per tick (a tick is
/// `interval / slots`), so each socket is looked at about once per interval; joining and leaving
/// are O(1) (the leaving socket's place is taken by the bucket's last one). The timer runs only
/// while the loop has sockets.
///
/// Used on its event loop only.
final class PingWheel<Socket: PingedSocket>: @unchecked Sendable {
    static var slots: Int { 8 }

    private let loop: any EventLoop
    private let tick: TimeAmount
    private var buckets: [[Socket]]
    /// The bucket the last tick pinged: a socket that joins goes there, so it is first looked
    /// at one whole turn later (between `interval - tick` and `interval` after it joined).
    private var current = 0
    private var count = 0
    private var timer: RepeatedTask?

    init(loop: any EventLoop, interval: Duration) {
        self.loop = loop
        self.tick = .nanoseconds(max(1, TimeAmount(interval).nanoseconds / Int64(Self.slots)))
        self.buckets = Array(repeating: [], count: Self.slots)
    }

    /// Sockets on the wheel.
    var sockets: Int { count }

    /// Whether its timer runs (only while it has sockets).
    var isTicking: Bool { timer != nil }

    func add(_ session: Socket) {
        loop.preconditionInEventLoop()
        guard session.pingPlace == nil else { return }
        session.pingPlace = (current, buckets[current].count)
        buckets[current].append(session)
        count += 1
        if timer == nil {
            timer = loop.scheduleRepeatedTask(initialDelay: tick, delay: tick) { [weak self] _ in self?.turn() }
        }
    }

    func remove(_ session: Socket) {
        loop.preconditionInEventLoop()
        guard let (bucket, index) = session.pingPlace else { return }
        session.pingPlace = nil
        let last = buckets[bucket].removeLast()
        if index < buckets[bucket].count {
            buckets[bucket][index] = last
            last.pingPlace = (bucket, index)
        }
        count -= 1
        if count == 0 {
            timer?.cancel()
            timer = nil
        }
    }

    /// The next bucket's sockets are pinged (or closed as unresponsive, which takes them off).
    private func turn() {
        current = (current + 1) % Self.slots
        let due = buckets[current]
        for session in due where session.pingPlace != nil { session.ping() }
    }
}

/// What a ``PingWheel`` holds: a socket that keeps its place on the wheel and pings its client.
protocol PingedSocket: AnyObject {
    /// Its bucket and index on the wheel, while it is on one; kept by the wheel.
    var pingPlace: (bucket: Int, index: Int)? { get set }
    /// Pings the client, or closes the socket when the last ping went unanswered.
    func ping()
}
