import NIOCore

/// One event loop's sockets looked at on one timer instead of one each: the WebSocket pings
/// (``PingWheel``) and the followed groups' tail checks (``WebSocketSession/tailTick()``).
///
/// NIO keeps an event loop's timers in a heap: a push and a pop each move a handful of its
/// entries (copies that retain), and a cancel is a linear search. With a repeating ping timer
/// per socket, every cancel on that loop (each closing socket's ping, each request's deadline,
/// each connect timeout) walked every open socket's timer: a close storm of N sockets cost
/// O(N²). With a tail-check timer per following socket, re-armed each second while its group
/// is busy, the heap's pushes and pops were 7 % of a server's samples in the chat example's
/// 1,000-member run. Here the sockets sit in `slots` buckets, one bucket looked at per tick (a
/// tick is `interval / slots`), so each socket is looked at about once per interval; joining
/// and leaving are O(1) (the leaving socket's place is taken by the bucket's last one). The
/// timer runs only while the loop has sockets on the wheel.
///
/// Used on its event loop only.
final class LoopWheel<Member: AnyObject>: @unchecked Sendable {
    let slots: Int
    let loop: any EventLoop
    private let tick: TimeAmount
    /// Where a member keeps its place on this wheel (bucket, index), while it is on it.
    private let place: ReferenceWritableKeyPath<Member, (bucket: Int, index: Int)?>
    /// What a member's turn does (it may take the member off the wheel).
    private let turnAction: (Member) -> Void
    private var buckets: [[Member]]
    /// The bucket the last tick looked at: a member that joins goes there, so it is first looked
    /// at one whole turn later (between `interval - tick` and `interval` after it joined).
    private var current = 0
    private var count = 0
    private var timer: RepeatedTask?

    init(
        loop: any EventLoop, interval: Duration, slots: Int, place: ReferenceWritableKeyPath<Member, (bucket: Int, index: Int)?>,
        turn: @escaping (Member) -> Void
    ) {
        self.loop = loop
        self.slots = slots
        self.tick = .nanoseconds(max(1, TimeAmount(interval).nanoseconds / Int64(slots)))
        self.buckets = Array(repeating: [], count: slots)
        self.place = place
        self.turnAction = turn
    }

    /// Members on the wheel.
    var sockets: Int { count }

    /// Whether its timer runs (only while it has members).
    var isTicking: Bool { timer != nil }

    func add(_ member: Member) {
        loop.preconditionInEventLoop()
        guard member[keyPath: place] == nil else { return }
        member[keyPath: place] = (current, buckets[current].count)
        buckets[current].append(member)
        count += 1
        if timer == nil {
            timer = loop.scheduleRepeatedTask(initialDelay: tick, delay: tick) { [weak self] _ in self?.turn() }
        }
    }

    func remove(_ member: Member) {
        loop.preconditionInEventLoop()
        guard let (bucket, index) = member[keyPath: place] else { return }
        member[keyPath: place] = nil
        let last = buckets[bucket].removeLast()
        if index < buckets[bucket].count {
            buckets[bucket][index] = last
            last[keyPath: place] = (bucket, index)
        }
        count -= 1
        if count == 0 {
            timer?.cancel()
            timer = nil
        }
    }

    /// The next bucket's members take their turn (which may take them off).
    private func turn() {
        current = (current + 1) % slots
        let due = buckets[current]
        for member in due where member[keyPath: place] != nil { turnAction(member) }
    }
}

/// An event loop's WebSocket pings: eight buckets, each socket pinged about once per interval.
typealias PingWheel<Socket: PingedSocket> = LoopWheel<Socket>

extension LoopWheel where Member: PingedSocket {
    convenience init(loop: any EventLoop, interval: Duration) {
        self.init(loop: loop, interval: interval, slots: 8, place: \.pingPlace) { $0.ping() }
    }
}

/// What a ``PingWheel`` holds: a socket that keeps its place on the wheel and pings its client.
protocol PingedSocket: AnyObject {
    /// Its bucket and index on the wheel, while it is on one; kept by the wheel.
    var pingPlace: (bucket: Int, index: Int)? { get set }
    /// Pings the client, or closes the socket when the last ping went unanswered.
    func ping()
}
