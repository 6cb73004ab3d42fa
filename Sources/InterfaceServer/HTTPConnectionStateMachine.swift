/// The deadlines of one HTTP/1.1 connection, as a pure state machine: the handler feeds it what
/// happened (bytes arrived, a head, a body part, the response started or ended, a deadline
/// passed) and does what it answers (arm a deadline, answer 408 and close, close). No sockets,
/// no clocks: every transition is unit-tested as it is.
///
/// The deadlines, each a setting of ``ServerConfiguration``:
/// - `headerTimeout`: from a connection's opening (or a kept-alive connection's first byte) to a
///   complete request head. A head that does not finish in time (slow-loris) gets 408 and the
///   connection is closed; a new connection that sends nothing is closed without an answer.
/// - `bodyTimeout`: the longest pause between two parts of a request body: 408 and close.
/// - `minBodyRate`: past the first `bodyTimeout` of a body, its bytes must have come at this
///   average rate at least (bytes a second, counted while the server reads): a body dripped a
///   byte just inside every pause gets 408 too.
/// - `httpTimeout`: from the request's end to the response's start (time to first byte): 503.
///   Once a response has started it runs as long as the application streams it.
/// - `keepAliveTimeout`: how long a kept-alive connection may sit idle between requests.
struct HTTPConnectionStateMachine: Sendable {
    enum State: Equatable, Sendable {
        /// No request in progress; `fresh` before the connection's first byte.
        case idle(fresh: Bool)
        /// Bytes of a head arrived; the head is not complete.
        case readingHead
        /// The head arrived; the body (possibly empty) has not ended.
        case readingBody
        /// The request is with the application; no response yet.
        case awaitingResponse
        /// The response has started and is being written; `requestEnded` says whether the
        /// request's body has been read to its end (an application may answer before it).
        case responding(requestEnded: Bool)
        /// The response ended before the request's body did: the rest of the body is read (and
        /// dropped) under the body deadline before the next request.
        case finishingBody
        /// The connection is closing.
        case closed
    }

    enum Deadline: Equatable, Sendable {
        case header, body, firstByte, keepAlive
    }

    enum Action: Equatable, Sendable {
        /// Nothing to do.
        case none
        /// Arm `deadline` (replacing any armed one) to pass after `after`.
        case arm(Deadline, after: Duration)
        /// Cancel the armed deadline.
        case disarm
        /// Answer `status` (408 or 503) to the request in progress; close after it when `close`.
        case answer(status: Int, close: Bool)
        /// Close the connection without an answer.
        case close
    }

    struct Timeouts: Equatable, Sendable {
        var header: Duration
        var body: Duration
        var firstByte: Duration
        var keepAlive: Duration
        /// Bytes a second a body must average past its first `body` (0: no minimum).
        var minBodyRate = 0
    }

    private(set) var state: State = .idle(fresh: true)
    let timeouts: Timeouts
    /// Body bytes of the request in progress.
    private(set) var bodyBytes = 0

    init(timeouts: Timeouts) { self.timeouts = timeouts }

    /// The connection opened: a client has `header` to send its first head.
    mutating func opened() -> Action { .arm(.header, after: timeouts.header) }

    /// Bytes arrived from the client (the handler reports them only while idle).
    mutating func bytesArrived() -> Action {
        guard case .idle(let fresh) = state else { return .none }
        state = .readingHead
        // A fresh connection's header deadline runs from its opening: dripping the first byte
        // late buys no time.
        return fresh ? .none : .arm(.header, after: timeouts.header)
    }

    /// A complete request head arrived.
    mutating func headReceived() -> Action {
        switch state {
        case .idle, .readingHead:
            state = .readingBody
            bodyBytes = 0
            return .arm(.body, after: timeouts.body)
        case .readingBody, .awaitingResponse, .responding, .finishingBody, .closed:
            return .none
        }
    }

    /// `bytes` of the body arrived (or the server resumed reading, with 0), `elapsed` after the
    /// head (not counting the time the server itself did not read): the body deadline starts
    /// again (also while a response that came early is written: the client is still sending),
    /// no later than the time at which the body's average rate would fall under `minBodyRate`.
    mutating func bodyReceived(_ bytes: Int = 0, elapsed: Duration = .zero) -> Action {
        switch state {
        case .readingBody, .finishingBody:
            bodyBytes += bytes
            return .arm(.body, after: bodyDeadline(elapsed: elapsed))
        default:
            return .none
        }
    }

    /// The time left for the next part of the body.
    private func bodyDeadline(elapsed: Duration) -> Duration {
        guard timeouts.minBodyRate > 0 else { return timeouts.body }
        // The average stays at the minimum until bytes / rate after the head; never before the
        // first `body` has passed (a body's start may be slow).
        let allowed = max(timeouts.body, .seconds(Double(bodyBytes) / Double(timeouts.minBodyRate)))
        return max(.zero, min(timeouts.body, allowed - elapsed))
    }

    /// The request (its body) ended.
    mutating func requestEnded() -> Action {
        switch state {
        case .readingBody:
            state = .awaitingResponse
            return .arm(.firstByte, after: timeouts.firstByte)
        case .responding(requestEnded: false):
            state = .responding(requestEnded: true)
            return .disarm
        case .finishingBody:
            state = .idle(fresh: false)
            return .arm(.keepAlive, after: timeouts.keepAlive)
        default:
            return .none
        }
    }

    /// The request was answered by the server itself (400, 413, 431, 503...) without the
    /// application: the same as a response that started.
    mutating func responseStarted() -> Action {
        switch state {
        case .readingBody, .readingHead, .idle:
            // An answer before the request's end (an early answer or a refusal).
            state = .responding(requestEnded: false)
            return .disarm
        case .awaitingResponse:
            state = .responding(requestEnded: true)
            return .disarm
        case .responding, .finishingBody, .closed:
            return .none
        }
    }

    /// The response's last part was handed to the connection (before it is written: a
    /// pipelined request that follows is delivered while that write is in progress). With
    /// keep-alive, the connection waits for its next request, or first for the rest of a body
    /// the application answered early; without, it closes once the write is done.
    mutating func responseEnded(keepAlive: Bool) -> Action {
        guard case .responding(let requestEnded) = state else { return .none }
        guard keepAlive else {
            state = .closed
            return .close
        }
        guard requestEnded else {
            state = .finishingBody
            return .arm(.body, after: timeouts.body)
        }
        state = .idle(fresh: false)
        return .arm(.keepAlive, after: timeouts.keepAlive)
    }

    /// The connection closed (either side).
    mutating func closed() -> Action {
        guard state != .closed else { return .none }
        state = .closed
        return .disarm
    }

    /// `deadline` passed. A deadline that no longer matches the state (it was replaced in a race
    /// with its firing) is ignored.
    mutating func deadlinePassed(_ deadline: Deadline) -> Action {
        switch (state, deadline) {
        case (.idle(fresh: true), .header), (.idle(fresh: false), .keepAlive):
            state = .closed
            return .close
        case (.readingHead, .header), (.readingBody, .body):
            state = .closed
            return .answer(status: 408, close: true)
        case (.finishingBody, .body):
            // The response was given; the rest of the body stopped coming.
            state = .closed
            return .close
        case (.awaitingResponse, .firstByte):
            state = .responding(requestEnded: true)
            return .answer(status: 503, close: false)
        default:
            return .none
        }
    }
}
