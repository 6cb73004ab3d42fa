import ASGI
import DequeModule
import NIOCore

/// What one Redis connection is doing, without any I/O: the requests waiting for replies (in
/// the order they were written, which is the order Redis answers), the reply timer, and
/// whether the connection has failed. ``RedisProtocolHandler`` feeds it events and performs
/// the actions it returns, as the state machines of swift-nio and postgres-nio do, so every
/// path (pipelining, a reply nobody asked for, a stalled server, a slow large reply, a closed
/// socket) is tested without a socket.
///
/// `Waiter` is whatever completes a request: an event-loop promise in the handler, a plain
/// value in tests.
struct RedisConnectionStateMachine<Waiter> {
    private struct Pending {
        let expected: Int
        var replies: [RedisReply]
        let waiter: Waiter
        let deadline: NIODeadline
        let timeout: TimeAmount
        /// Whether this request already got a fresh window for a stall of this process (once:
        /// a loop that runs every timer late must not hide a dead Redis forever).
        var stallForgiven = false
    }

    private enum State {
        /// Writing requests and reading replies.
        case active(Deque<Pending>)
        /// Failed or closed: every later request fails with this error.
        case failed(ChannelLayerError)
        /// Only while a method changes the queue: the state gives up its reference for that
        /// moment, so the queue is uniquely referenced and changes in place instead of being
        /// copied whole on every write and every reply.
        case modifying
    }

    private var state: State = .active([])
    /// When bytes last came from Redis: a reply still streaming in is progress, not a stall.
    private var lastRead: NIODeadline
    /// Whether a timer is armed (there is one at a time, for the oldest request).
    private(set) var timerArmed = false
    /// Since when the oldest request has been overdue while the connection stayed up after its
    /// peer was probed (nil: nothing overdue, or bytes came since).
    private var overdueSince: NIODeadline?
    /// Whether the socket probes its peer on its own (set once, on the first overdue reply).
    private(set) var peerProbed = false
    /// Whether Redis has answered anything on this connection: a peer that never did (a port
    /// that accepts and says nothing, a service that is not Redis) is not waited for.
    private var answered = false

    private let endpoint: RedisEndpoint

    init(endpoint: RedisEndpoint, now: NIODeadline) {
        self.endpoint = endpoint
        self.lastRead = now
    }

    /// Requests written and not yet fully answered.
    var waiting: Int {
        if case .active(let pending) = state { pending.count } else { 0 }
    }

    /// The error the connection failed with, if it has.
    var failure: ChannelLayerError? {
        if case .failed(let error) = state { error } else { nil }
    }

    enum WriteAction {
        /// Write the request; arm the reply timer at the deadline if one is given.
        case write(armTimer: NIODeadline?)
        /// The connection has failed: fail this request with the error, write nothing.
        case fail(ChannelLayerError)
    }

    /// A request of `commands` commands is about to be written.
    mutating func write(commands: Int, waiter: Waiter, timeout: TimeAmount, now: NIODeadline) -> WriteAction {
        switch state {
        case .failed(let error):
            return .fail(error)
        case .modifying:
            preconditionFailure("the Redis connection state machine was re-entered")
        case .active(var pending):
            state = .modifying
            let deadline = now + timeout
            pending.append(Pending(expected: commands, replies: [], waiter: waiter, deadline: deadline, timeout: timeout))
            state = .active(pending)
            if timerArmed { return .write(armTimer: nil) }
            timerArmed = true
            return .write(armTimer: deadline)
        }
    }

    /// Bytes came from Redis (whether or not they completed a reply).
    mutating func bytesRead(now: NIODeadline) {
        lastRead = now
        overdueSince = nil
    }

    enum ReplyAction {
        /// The reply was one of several the head request expects: nothing to do yet.
        case none
        /// The head request has all its replies: complete it.
        case succeed(Waiter, [RedisReply])
        /// Redis sent a reply nobody asked for: the stream cannot be trusted. Fail the waiters
        /// and close the connection.
        case failConnection(ChannelLayerError, [Waiter])
        /// The server turned read-only (`-READONLY`: it is a replica now, demoted by a failover
        /// or an operator, and still alive): complete the head request with what it got, fail
        /// the requests behind it, and close the connection, so that the next one finds the
        /// master again (through the sentinels) instead of writing to a replica forever.
        case succeedThenRetire(Waiter, [RedisReply], ChannelLayerError, [Waiter])
    }

    /// One whole reply was parsed.
    mutating func replyReceived(_ reply: RedisReply) -> ReplyAction {
        guard case .active(var pending) = state else { return .none }
        guard !pending.isEmpty else { return fail("a reply nobody asked for") }
        state = .modifying
        pending[pending.startIndex].replies.append(reply)
        guard pending[pending.startIndex].replies.count == pending[pending.startIndex].expected else {
            state = .active(pending)
            return .none
        }
        let done = pending.removeFirst()
        state = .active(pending)
        answered = true
        if done.replies.contains(where: { $0.errorMessage?.hasPrefix("READONLY") == true }) {
            guard
                case .failConnection(let error, let behind) = failed(
                    ChannelLayerError(.connectionLost, "Redis at \(endpoint) is a read-only replica now"))
            else { return .succeed(done.waiter, done.replies) }
            return .succeedThenRetire(done.waiter, done.replies, error, behind)
        }
        return .succeed(done.waiter, done.replies)
    }

    enum TimerAction {
        /// Nothing is waiting: the timer stays off until the next write.
        case none
        /// Arm the timer again at this deadline.
        case rearm(NIODeadline)
        /// Nothing came from Redis for the oldest request's whole timeout: fail every waiter
        /// and close the connection.
        case failConnection(ChannelLayerError, [Waiter])
        /// Nothing came for the oldest request's whole timeout, for the first time on this
        /// connection: make the socket probe its peer (keepalive every second, so the kernel
        /// closes an idle connection whose Redis host stops answering), then call
        /// ``peerProbeSet(_:now:)``.
        case probePeer
    }

    /// What the socket says of its peer when a timer fires (`TCP_INFO`).
    enum PeerReport: Sendable {
        /// Nothing known (not TCP, or no information).
        case unknown
        /// Everything sent was acknowledged, or an acknowledgement came within a probe window:
        /// the Redis host is there (its Redis may be stopped, its receive buffer full).
        case acknowledging
        /// Data sent and unacknowledged for a probe window or more: the host is cut off.
        case notAcknowledging
    }

    /// How long a connection whose peer was probed is given before the timer looks again: an
    /// idle connection's kernel closes it within this when the Redis host does not answer the
    /// keepalive probes (1 s idle, 1 s apart, 2 probes); one with data in flight is found out
    /// by ``PeerReport/notAcknowledging``.
    static var probeWindow: TimeAmount { .seconds(3) }
    /// The longest a reply is waited for past its timeout while the Redis host still
    /// acknowledges (the Redis process stopped, or busy with one long command): failing the
    /// connection then would lose what a take took and repeat a send retried elsewhere, since
    /// the commands run when Redis comes back.
    static var longestWaitOnLiveHost: TimeAmount { .seconds(60) }

    /// How late a reply timer may run before the lateness is this process's own: a timer that
    /// runs later than this after its deadline says the process was stopped or starved.
    static var stallLateness: TimeAmount { .milliseconds(500) }

    /// The reply timer fired (`armedFor`: the deadline it was armed for). Replies come in
    /// order, so only the oldest request's deadline matters; when it was answered in the
    /// meantime, the timer moves on to the next oldest. A late request whose bytes are still
    /// arriving (a large reply) is given more time.
    ///
    /// A timer that runs long after its deadline means this process did not run (SIGSTOP, a
    /// paused VM, a loop busy for seconds): Redis's replies may be sitting unread in the
    /// socket, and the loop runs this timer before it reads them. Failing the connection then
    /// would fail commands Redis already ran (a retried send runs twice; a take loses what it
    /// took). Such a stall counts as progress: the oldest request gets a fresh window, from now,
    /// once (a loop that runs every timer late, a process paused again and again, must still
    /// find out a Redis that stopped answering).
    mutating func timerFired(now: NIODeadline, armedFor: NIODeadline? = nil, peer: PeerReport = .unknown) -> TimerAction {
        timerArmed = false
        guard case .active(let pending) = state, let oldest = pending.first else { return .none }
        if oldest.deadline > now {
            timerArmed = true
            return .rearm(oldest.deadline)
        }
        if let armedFor, now - armedFor > Self.stallLateness, !oldest.stallForgiven {
            state = .modifying
            var forgiven = pending
            forgiven[forgiven.startIndex].stallForgiven = true
            state = .active(forgiven)
            lastRead = now
        }
        if lastRead + oldest.timeout > now {
            timerArmed = true
            return .rearm(lastRead + oldest.timeout)
        }
        // Overdue. A connection still up a probe window after its peer was set probing has a
        // Redis host that acknowledges: its Redis is stopped or busy, and the replies will come.
        // Only for a peer that has answered before: it is a Redis.
        guard answered else {
            guard case .failConnection(let error, let waiters) = fail("no reply in time") else { return .none }
            return .failConnection(error, waiters)
        }
        if let since = overdueSince {
            if peer == .notAcknowledging {
                guard
                    case .failConnection(let error, let waiters) = fail(
                        "no reply in time, and the Redis host no longer acknowledges what was sent")
                else { return .none }
                return .failConnection(error, waiters)
            }
            if now - since < Self.longestWaitOnLiveHost {
                timerArmed = true
                return .rearm(now + Self.probeWindow)
            }
            let waited = Double((now - since).nanoseconds) / 1e9
            guard
                case .failConnection(let error, let waiters) = fail(
                    "no reply for \(Int(waited)) s past the timeout, though the Redis host still acknowledges")
            else { return .none }
            return .failConnection(error, waiters)
        }
        overdueSince = now
        timerArmed = true
        if peerProbed { return .rearm(now + Self.probeWindow) }
        return .probePeer
    }

    /// The handler tried to set the socket probing its peer (``TimerAction/probePeer``): when it
    /// did, the timer looks again a probe window later; when it could not (not TCP), the
    /// connection fails as without the probe.
    mutating func peerProbeSet(_ done: Bool, now: NIODeadline) -> TimerAction {
        guard case .active = state else { return .none }
        guard done else {
            guard case .failConnection(let error, let waiters) = fail("no reply in time") else { return .none }
            return .failConnection(error, waiters)
        }
        peerProbed = true
        timerArmed = true
        return .rearm(now + Self.probeWindow)
    }

    /// The connection failed (`what` says how) or closed: returns the waiters to fail with
    /// the returned error. Later calls keep the first error.
    mutating func fail(_ what: String) -> ReplyAction {
        failed(ChannelLayerError(.connectionLost, "Redis at \(endpoint): \(what)"))
    }

    /// The socket closed.
    mutating func closed() -> ReplyAction {
        failed(ChannelLayerError(.connectionLost, "connection to Redis at \(endpoint) closed"))
    }

    private mutating func failed(_ error: ChannelLayerError) -> ReplyAction {
        timerArmed = false
        overdueSince = nil
        switch state {
        case .failed(let first):
            return .failConnection(first, [])
        case .modifying:
            preconditionFailure("the Redis connection state machine was re-entered")
        case .active(let pending):
            state = .failed(error)
            return .failConnection(error, pending.map(\.waiter))
        }
    }
}
