import ASGI
import Foundation
import Synchronization

/// What the session and auth wrappers need from the application: where sessions live, their
/// settings, and how to load a user.
public struct ConsumerEnvironment: Sendable {
    /// Where sessions live (in memory by default; Redis with `--session-store`).
    public var sessionStore: any SessionStore
    /// Session cookie and lifetime settings.
    public var sessionConfiguration: SessionConfiguration
    /// Loads users by id for the `...User` wrappers; without one every user is anonymous.
    public var users: (any UserProvider)?
    /// How long a consumer's send to a full channel or an unreachable layer (a Redis restart)
    /// is retried, with growing pauses, before it fails (an immediate send throws; a buffered
    /// one is dropped, logged and counted).
    public var sendRetry: Duration
    /// How long ordered messages wait for one before them that never comes (lost with a
    /// killed worker) before it is skipped.
    public var orderingGapTimeout: Duration
    /// Gaps skipped by the ordering wrappers (shared by the copies of this environment).
    public var orderingGaps: OrderingGaps
    /// How long an ordering gate holds back a message marked as sent again after a lost
    /// connection (`Message.resentField`) whose turn has come, before it looks at the order
    /// once more: the copy stored by the first try, if there is one, runs meanwhile and this
    /// one is then dropped as late. Held in memory, not in a consumer slot; at least a
    /// sixteenth of `orderingGapTimeout` and 0.1 s (how long a worker's turns go on from a
    /// session they saved without reading it again).
    public var resentGrace: Duration = .seconds(1)
    /// Attempt counters for rate limits (login): in memory, or on the layer's Redis so every
    /// worker shares them.
    public var rateLimiter: any RateLimiter
    /// Verifies (and issues) signed tokens for ``tokenUser(required:_:)``; nil: no token is accepted.
    public var tokens: TokenAuthenticator?

    /// An environment; every argument has the embedded default.
    public init(
        sessionStore: any SessionStore = InMemorySessionStore(), sessionConfiguration: SessionConfiguration = .init(),
        users: (any UserProvider)? = nil, sendRetry: Duration = .seconds(10),
        orderingGapTimeout: Duration = .seconds(10), orderingGaps: OrderingGaps = OrderingGaps(),
        rateLimiter: any RateLimiter = InMemoryRateLimiter(), tokens: TokenAuthenticator? = nil
    ) {
        self.tokens = tokens
        self.orderingGaps = orderingGaps
        self.rateLimiter = rateLimiter
        self.sessionStore = sessionStore
        self.sessionConfiguration = sessionConfiguration
        self.users = users
        self.sendRetry = sendRetry
        self.orderingGapTimeout = orderingGapTimeout
    }
}

// MARK: channel_session

/// `channel_session`: gives the consumer `context.channelSession`, a session keyed by the
/// message's reply channel (one per WebSocket), saved after the consumer returns (or throws)
/// when it was modified. A message without a reply channel is an error.
///
/// The session lives `channelSessionAge` seconds after its last use (renewed while the socket
/// sends) and is deleted once the socket's `websocket.disconnect` ran, with the ordering state
/// the socket's consumers started (``ConsumerContext/send(_:to:orderedBy:immediately:)``).
public func channelSession(_ consumer: @escaping Consumer) -> Consumer {
    { context in
        if context.loadedChannelSession != nil { return try await consumer(context) }
        let session = try await context.openChannelSession()
        do {
            try await consumer(context)
        } catch {
            // A refused connect leaves nothing behind: anyone may knock, and a knock must not
            // cost the store a session.
            var retried = false
            if case .consumeLater? = error as? ConsumerError { retried = true }
            if context.channel == ASGIChannel.websocketConnect, !retried {
                try? await session.delete()
            } else {
                try? await context.finishChannelSession(session)
            }
            throw error
        }
        try await context.finishChannelSession(session)
    }
}

/// Runs `consumer` with a session opened by `open` (unless an outer wrapper already opened it)
/// and saves it afterwards when modified, also when the consumer threw.
private func withSession(
    _ consumer: @escaping Consumer, loaded: any KeyPath<ConsumerContext, Session?> & Sendable,
    open: @escaping @Sendable (ConsumerContext) async throws -> Session
) -> Consumer {
    { context in
        if context[keyPath: loaded] != nil { return try await consumer(context) }
        let session = try await open(context)
        do {
            try await consumer(context)
        } catch {
            _ = try? await session.save()
            throw error
        }
        try await session.save()
    }
}

/// Keys the channel-session machinery keeps in a channel session.
enum ChannelSessionKey {
    /// When the session was last renewed (UNIX seconds).
    static let touched = "__channels_touched"
    /// The ordered hand-offs (channel and key) this socket's consumers numbered messages in.
    static let handoffs = "__channels_handoffs"
}

extension ConsumerContext {
    func openChannelSession() async throws -> Session {
        guard let reply = message.replyChannel else {
            throw SessionError(.notLoaded, "channel_session needs a message with a reply_channel; '\(channel)' has none")
        }
        let settings = environment.sessionConfiguration
        let key = Session.channelSessionKey(replyChannel: reply, secret: settings.secret)
        await prefetchHandoffCounters(reply: reply, with: key)
        let session = try await Session.load(
            key: key, store: environment.sessionStore, settings: settings, ttl: settings.channelSessionAge, log: .consumer(self),
            handedOn: true)
        extras.withLock { $0.channelSession = session }
        return session
    }

    /// Reads the channel session under `key` and the ordered hand-off counters this socket's
    /// consumers used in this worker before (``HandoffCounters``) in one round trip, for the
    /// loads that follow; nothing when fewer than two of them must be read (the others were
    /// handed on from the socket's turn before).
    private func prefetchHandoffCounters(reply: String, with key: String) async {
        guard let handOn = SessionHandOn.current else { return }
        let counters = HandoffCounters.known(for: reply)
        guard !counters.isEmpty else { return }
        // What the scope holds from the socket's turn before is not read at all.
        let keys = ([Session.storageKey(key)] + counters).filter { handOn.saved($0) == nil }
        guard keys.count > 1, let values = try? await environment.sessionStore.load(many: keys), values.count == keys.count else {
            return
        }
        for (key, value) in zip(keys, values) { handOn.prefetch(key, value) }
    }

    /// After the consumer: the socket's last message deletes its session and ends its ordered
    /// hand-offs; any other saves it when modified, renewing its lifetime when a quarter of it
    /// has passed.
    func finishChannelSession(_ session: Session) async throws {
        let parked = extras.withLock { $0.parked }
        if channel == ASGIChannel.websocketDisconnect && !parked {
            guard session.isStored || session.isModified else { return }
            for handoff in session[ChannelSessionKey.handoffs]?.arrayValue ?? [] {
                guard let pair = handoff.arrayValue, pair.count == 2, let target = pair[0].stringValue,
                    let key = pair[1].stringValue
                else { continue }
                try await endOrderedSequence(to: target, orderedBy: key)
            }
            if let reply = message.replyChannel { HandoffCounters.forget(reply) }
            try await session.delete()
            return
        }
        let now = WallClock.wholeSeconds
        let touched = session[ChannelSessionKey.touched]?.intValue ?? 0
        let renewing = !session.isModified && session.isStored && now - touched > (session.ttl / 4).components.seconds
        if session.isModified || renewing { session[ChannelSessionKey.touched] = .int(now) }
        // A renewal only renews: if the socket's disconnect deleted the session meanwhile (a
        // parked disconnect this message's turn ran), it stays deleted.
        try await session.save(recreate: !renewing)
    }

    /// The socket's channel session; only inside `channelSession` (or a wrapper that includes it).
    public var channelSession: Session {
        get throws { try Self.required(loadedChannelSession, "no channel session here: wrap the consumer in channelSession(...)") }
    }

    static func required(_ session: Session?, _ otherwise: String) throws -> Session {
        guard let session else { throw SessionError(.notLoaded, otherwise) }
        return session
    }

    var loadedChannelSession: Session? { extras.withLock { $0.channelSession } }
}

// MARK: http_session

/// `http_session`: gives the consumer `context.httpSession`, the session named by the
/// `?session_key=` query parameter or else the session cookie. No key means an empty session
/// without a key, not an error; writing to it creates one (and the response gets its cookie).
public func httpSession(_ consumer: @escaping Consumer) -> Consumer {
    withSession(consumer, loaded: \.loadedHTTPSession) { try await $0.openHTTPSession() }
}

extension ConsumerContext {
    func openHTTPSession() async throws -> Session {
        let settings = environment.sessionConfiguration
        // Only keys of the HTTP form are looked up: a channel-session key, an ordering key or
        // anything else a client found cannot open a session.
        let key =
            (HTTPRequestInfo.queryParameter("session_key", in: message)
            ?? HTTPRequestInfo.cookies(in: message)[settings.cookieName]).flatMap { Session.isHTTPSessionKey($0) ? $0 : nil }
        // A key that names nothing stored is not adopted: a fresh one is made on first write,
        // so a client cannot choose its own session key.
        var session = try await Session.load(
            key: key, store: environment.sessionStore, settings: settings, log: .consumer(self),
            onNewKey: { [weak self] in self?.setSessionCookie($0) })
        if key != nil, !session.isStored {
            session = Session(
                key: nil, store: environment.sessionStore, settings: settings,
                onNewKey: { [weak self] in self?.setSessionCookie($0) })
        }
        extras.withLock { $0.httpSession = session }
        return session
    }

    /// The request's HTTP session; only inside `httpSession` (or a wrapper that includes it).
    public var httpSession: Session {
        get throws { try Self.required(loadedHTTPSession, "no HTTP session here: wrap the consumer in httpSession(...)") }
    }

    var loadedHTTPSession: Session? { extras.withLock { $0.httpSession } }

    func setSessionCookie(_ key: String) {
        let settings = environment.sessionConfiguration
        setCookie(
            cookieHeader(
                name: settings.cookieName, value: key, maxAge: Int(settings.age.components.seconds), httpOnly: settings.cookieHTTPOnly),
            name: settings.cookieName)
    }

    /// True when the request came over TLS: its scheme (`https`, `wss`) says so, which the
    /// server sets from `X-Forwarded-Proto` only behind `--proxy-headers`.
    public var isSecureRequest: Bool {
        let scheme = message["scheme"]?.stringValue ?? ""
        return scheme == "https" || scheme == "wss"
    }

    /// A `Set-Cookie` value with the session settings' path, `SameSite` and `Secure` rules:
    /// `Secure` when the settings ask for it, when the request came over TLS, or with `SameSite=None`.
    public func cookieHeader(name: String, value: String, maxAge: Int, httpOnly: Bool) -> String {
        let settings = environment.sessionConfiguration
        var cookie = "\(name)=\(value); Max-Age=\(maxAge); Path=\(settings.cookiePath); SameSite=\(settings.cookieSameSite.rawValue)"
        if httpOnly { cookie += "; HttpOnly" }
        if settings.cookieSecure || isSecureRequest || settings.cookieSameSite == .none { cookie += "; Secure" }
        return cookie
    }

    /// Adds (or replaces, by cookie name) a `Set-Cookie` header for the responses this consumer sends.
    public func setCookie(_ header: String, name: String) {
        extras.withLock { extras in
            extras.cookies.removeAll { $0.name == name }
            extras.cookies.append((name, header))
        }
    }

    /// The `Set-Cookie` values the response helpers add.
    public var responseCookies: [String] { extras.withLock { $0.cookies.map(\.header) } }
}
