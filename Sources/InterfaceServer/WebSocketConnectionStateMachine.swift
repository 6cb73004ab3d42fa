import ASGI

/// The life of one WebSocket, as a pure state machine: the session feeds it what happened (the
/// application's reply, a frame, a close from either side, a deadline, a ping tick) and does
/// what it answers (accept or refuse the handshake, write, close, send `websocket.receive` or
/// `websocket.disconnect` with its `order`). No sockets, no clocks: every transition is
/// unit-tested as it is.
///
/// What it guarantees, whatever the order of events: the application hears exactly one
/// `websocket.disconnect` for a connect it was sent (and none for one refused before it was
/// sent); `order` counts up by one from the connect (0) through every receive to the
/// disconnect; nothing is written before the accept or after a close.
struct WebSocketConnectionStateMachine: Sendable {
    enum State: Equatable, Sendable {
        /// The connect is with the application; the handshake is held open.
        case connecting
        /// Accepted; `attached` once the upgrade is done and frames can be written.
        case open(attached: Bool)
        /// We sent a close frame; the client's answer (or a timer) ends the connection.
        case closing
        /// Over.
        case closed
    }

    /// Why a handshake is refused.
    enum Refusal: String, Equatable, Sendable {
        /// The application refused (`accept: false`) or closed before accepting.
        case denied, closed
        /// The application did not answer within the connect timeout.
        case timeout
        /// The server is shutting down (or closes the socket) before the answer.
        case shutdown
        /// The client left before the answer.
        case clientGone = "client gone"
        /// Refused before the connect was sent: a `Host` not allowed, a foreign `Origin`.
        case host, origin
        /// The connect could not reach the layer (full or down for the whole bound).
        case unavailable

        /// Whether the application was sent the connect and did not refuse it itself: then it
        /// hears `websocket.disconnect` (1006), so what its connect consumer stored is cleaned up.
        var tellsApplication: Bool { self == .timeout || self == .shutdown || self == .clientGone }

        /// The HTTP status the handshake is refused with.
        var status: Int {
            switch self {
            case .host: 400
            // Too busy to answer in time (a join storm): try again, later (with Retry-After).
            case .unavailable, .timeout: 503
            default: 403
            }
        }
    }

    enum ReplyAction: Equatable, Sendable {
        /// Nothing to do (an empty reply, or the socket is over).
        case none
        /// A reply before the accept that neither accepts nor refuses: ignored (logged).
        case ignoredBeforeAccept
        /// Finish the handshake, then deliver this reply again (its data and close).
        case accept
        /// Refuse the handshake (403), and tell the application when the refusal does.
        case refuse(Refusal, disconnectOrder: Int64?)
        /// Keep the reply until the upgrade is done (`attached`).
        case hold
        /// Write the reply's data (if any), then close with `close` (if any).
        case deliver(close: UInt16?)
    }

    enum CloseAction: Equatable, Sendable {
        case none
        /// Still connecting: refuse the handshake instead.
        case refuse(Refusal, disconnectOrder: Int64?)
        /// Send a close frame with the code and tell the application (`websocket.disconnect` at
        /// `disconnectOrder`).
        case sendCloseFrame(code: UInt16, disconnectOrder: Int64)
    }

    enum PingAction: Equatable, Sendable {
        case none
        case sendPing
        /// No pong within the timeout: close with 1011.
        case closeUnresponsive
    }

    private(set) var state: State = .connecting
    /// The `order` of the last message sent to the application for this socket (the connect is 0).
    private(set) var order: Int64 = 0
    private(set) var disconnectSent = false
    /// We sent a close frame: the client's close frame completes the handshake.
    private(set) var closeFrameSent = false
    private var awaitingPong = false
    private var lastPong: Duration

    /// `now`: the time on whatever clock the caller feeds `pingDue` and `pongReceived`.
    init(now: Duration = .zero) {
        lastPong = now
    }

    /// The application's reply (already validated).
    mutating func reply(_ send: WebSocketSendMessage) -> ReplyAction {
        switch state {
        case .connecting:
            if send.accept == false { return refuse(.denied) }
            if send.accept == true || send.data != nil {
                state = .open(attached: false)
                return .accept
            }
            if send.close != nil { return refuse(.closed) }
            return .ignoredBeforeAccept
        case .open(attached: false):
            return .hold
        case .open(attached: true):
            return .deliver(close: send.close.map { UInt16(clamping: $0) })
        case .closing, .closed:
            return .none
        }
    }

    /// The upgrade is done: held replies can be written now.
    mutating func attached() {
        if case .open(attached: false) = state { state = .open(attached: true) }
    }

    /// The handshake is refused by the server (before the connect was sent, or without an answer
    /// from the application): a bad host or origin, the connect's deadline, a client that left.
    mutating func refuseHandshake(_ why: Refusal) -> ReplyAction {
        guard state == .connecting else { return .none }
        return refuse(why)
    }

    /// A message frame from the client: the `order` of its `websocket.receive`, or nil when the
    /// socket is not open (the frame is dropped).
    mutating func frameReceived() -> Int64? {
        guard case .open = state else { return nil }
        order += 1
        return order
    }

    /// We close (a shutdown, the socket's lifetime, a protocol error, the application's close).
    mutating func close(code: UInt16) -> CloseAction {
        switch state {
        case .connecting:
            let refusal = refuse(.shutdown)
            guard case .refuse(let why, let order) = refusal else { return .none }
            return .refuse(why, disconnectOrder: order)
        case .open:
            state = .closing
            closeFrameSent = true
            return .sendCloseFrame(code: code, disconnectOrder: disconnect())
        case .closing, .closed:
            return .none
        }
    }

    /// The client sent a close frame, or the connection dropped: the `order` of the
    /// `websocket.disconnect` to send, or nil when one was already sent.
    mutating func clientClosed() -> Int64? {
        switch state {
        case .connecting, .closed:
            // While connecting, the handshake's own path (`refuseHandshake`) tells the
            // application; a refused or finished socket has nothing more to say.
            return nil
        case .open, .closing:
            state = .closed
            return disconnectSent ? nil : disconnect()
        }
    }

    /// The ping interval passed.
    mutating func pingDue(now: Duration, timeout: Duration) -> PingAction {
        guard case .open(attached: true) = state else { return .none }
        if awaitingPong, now - lastPong > timeout { return .closeUnresponsive }
        awaitingPong = true
        return .sendPing
    }

    mutating func pongReceived(now: Duration) {
        awaitingPong = false
        lastPong = now
    }

    private mutating func refuse(_ why: Refusal) -> ReplyAction {
        state = .closed
        return .refuse(why, disconnectOrder: why.tellsApplication ? disconnect() : nil)
    }

    private mutating func disconnect() -> Int64 {
        disconnectSent = true
        order += 1
        return order
    }
}
