import ASGI
import Crypto
import Foundation
import NIOPosix
import Synchronization
import _CryptoExtras

/// Who sent a message: a user loaded by id, or anonymous.
public struct User: Sendable, Hashable, CustomStringConvertible {
    /// The user's id, as the session stores it; empty for the anonymous user.
    public var id: String
    /// The name shown to people.
    public var username: String

    /// A user with an id and a name.
    public init(id: String, username: String) {
        self.id = id
        self.username = username
    }

    /// The user of a session nobody logged in to.
    public static let anonymous = User(id: "", username: "")

    /// True for a logged-in user.
    public var isAuthenticated: Bool { !id.isEmpty }
    /// True for the anonymous user.
    public var isAnonymous: Bool { id.isEmpty }
    /// The user name, or `anonymous`.
    public var description: String { isAuthenticated ? username : "anonymous" }
}

/// How the application loads a user by the id kept in the session.
public protocol UserProvider: Sendable {
    func user(id: String) async throws -> User?
}

/// A provider that can also check a user's credentials (Django's authentication backend): what
/// `HTTPTestClient.login(username:password:)` calls.
public protocol UserAuthenticator: UserProvider {
    /// The user these credentials name, or nil when they are wrong.
    func authenticate(username: String, password: String) async throws -> User?
}

/// A provider from a closure.
public struct UserLookup: UserProvider {
    let lookup: @Sendable (String) async throws -> User?
    /// A provider that calls `lookup` for each id.
    public init(_ lookup: @escaping @Sendable (String) async throws -> User?) { self.lookup = lookup }
    /// The user with this id, or nil.
    public func user(id: String) async throws -> User? { try await lookup(id) }
}

/// The session keys auth uses (Django's names).
enum AuthSessionKey {
    static let userID = "_auth_user_id"
    /// In a channel session: where the HTTP session the user came from is stored (a hash, not
    /// its key), so the socket's user ends with that session.
    static let httpSession = "_auth_http_session"
    /// Reply channels of the sockets opened with this HTTP session by a logged-in user
    /// (``channelSessionUserFromHTTP(_:)``): logout signs them out too.
    static let sockets = "_channels_sockets"
    /// How many of them are remembered (the most recent).
    static let maxSockets = 64
}

extension ConsumerContext {
    /// The user of this message: set by the `...User` wrappers; anonymous otherwise.
    public var user: User { extras.withLock { $0.user } ?? .anonymous }

    func resolveUser(id: ASGIValue?) async throws -> User {
        guard let id = id?.stringValue, !id.isEmpty, let users = environment.users else { return .anonymous }
        return try await users.user(id: id) ?? .anonymous
    }

    func setUser(_ user: User) { extras.withLock { $0.user = user } }

    /// Logs `user` in on the HTTP session: the session gets a new key (no session fixation),
    /// remembers the user, and the response carries the new cookie. Needs `httpSession`.
    public func login(_ user: User) async throws {
        let session = try httpSession
        if let current = session[AuthSessionKey.userID]?.stringValue, current != user.id {
            session.removeAll()
        }
        session.cycleKey()
        session[AuthSessionKey.userID] = .string(user.id)
        setUser(user)
    }

    /// Forgets the user and the whole HTTP session, and expires the cookie. The sockets the
    /// user opened with this session are signed out too: their channel sessions forget the
    /// user at once and the sockets are closed (1008), so a stolen socket does not outlive the logout.
    public func logout() async throws {
        let session = try httpSession
        let loaded = session[AuthSessionKey.sockets]?.arrayValue?.compactMap(\.stringValue) ?? []
        // The list as it stood when the session was deleted: a socket that listed itself while
        // this request ran is on it; one that tries after finds the session gone.
        let final = try await session.deleteReturningData()
        var sockets = final[AuthSessionKey.sockets]?.arrayValue?.compactMap(\.stringValue) ?? []
        for reply in loaded where !sockets.contains(reply) { sockets.append(reply) }
        setUser(.anonymous)
        let settings = environment.sessionConfiguration
        setCookie(
            cookieHeader(name: settings.cookieName, value: "", maxAge: 0, httpOnly: settings.cookieHTTPOnly),
            name: settings.cookieName)
        // Each socket on its own: one that fails does not leave the others signed in.
        var failure: (any Error)?
        for reply in sockets {
            do {
                let socket = try await Session.load(
                    key: Session.channelSessionKey(replyChannel: reply, secret: settings.secret),
                    store: environment.sessionStore, settings: settings, ttl: settings.channelSessionAge)
                if socket.isStored, socket[AuthSessionKey.userID] != nil {
                    socket[AuthSessionKey.userID] = nil
                    // A socket whose disconnect deleted its session meanwhile stays deleted.
                    try await socket.save(recreate: false)
                }
                try await send(WebSocketSendMessage.close(code: 1008).message, to: reply)
            } catch {
                failure = failure ?? error
            }
        }
        if let failure { throw failure }
    }
}

/// `http_session_user`: `httpSession`, plus `context.user` loaded from it.
public func httpSessionUser(_ consumer: @escaping Consumer) -> Consumer {
    httpSession { context in
        context.setUser(try await context.resolveUser(id: try context.httpSession[AuthSessionKey.userID]))
        try await consumer(context)
    }
}

/// `channel_session_user`: `channelSession`, plus `context.user` loaded from it.
///
/// A user carried over from an HTTP session (``channelSessionUserFromHTTP(_:)``) stays only
/// while that HTTP session exists: after its logout (or expiry) the socket is anonymous from its
/// next message on, however many sockets were opened with it and however they raced.
public func channelSessionUser(_ consumer: @escaping Consumer) -> Consumer {
    channelSession { context in
        let session = try context.channelSession
        var id = session[AuthSessionKey.userID]
        if id != nil, let origin = session[AuthSessionKey.httpSession]?.stringValue,
            try await context.environment.sessionStore.load(origin) == nil
        {
            session[AuthSessionKey.userID] = nil
            session[AuthSessionKey.httpSession] = nil
            id = nil
        }
        context.setUser(try await context.resolveUser(id: id))
        try await consumer(context)
    }
}

/// `channel_session_user_from_http`: for a socket's connect. Reads the user from the HTTP
/// session (cookie or `?session_key=`) and copies it into the channel session, so every later
/// message of the socket (wrapped in `channelSessionUser`) knows the user.
///
/// A logged-in socket's reply channel is added to its HTTP session's socket list (the newest
/// 64) before the consumer runs, so a ``ConsumerContext/logout()`` closes every socket whose
/// handshake had completed, also those opened at the same moment.
public func channelSessionUserFromHTTP(_ consumer: @escaping Consumer) -> Consumer {
    httpSessionUser(
        channelSession { context in
            let session = try context.channelSession
            // Written only when it changes: an anonymous connect stores nothing.
            let id: ASGIValue? = context.user.isAuthenticated ? .string(context.user.id) : nil
            if session[AuthSessionKey.userID] != id { session[AuthSessionKey.userID] = id }
            let origin: ASGIValue? =
                context.user.isAuthenticated ? context.loadedHTTPSession?.key.map { .string(Session.storageKey($0)) } : nil
            if session[AuthSessionKey.httpSession] != origin { session[AuthSessionKey.httpSession] = origin }
            if context.user.isAuthenticated, let reply = context.message.replyChannel,
                let http = context.loadedHTTPSession, http.key != nil
            {
                // An append, not a set: two sockets opened at once both stay listed (a set
                // re-applied after a lost save race would drop the other's reply channel, and
                // logout would leave that socket open).
                // Saved before the consumer can accept: a socket whose handshake completed is
                // on the list a logout closes, however soon the logout follows.
                http.append(.string(reply), to: AuthSessionKey.sockets, keepingLast: AuthSessionKey.maxSockets)
                if try await !http.save() {
                    // The HTTP session was deleted meanwhile (a logout): the socket is not the user's.
                    context.setUser(.anonymous)
                    session[AuthSessionKey.userID] = nil
                    session[AuthSessionKey.httpSession] = nil
                }
            }
            try await consumer(context)
        })
}

/// Password hashing with PBKDF2-HMAC-SHA256, stored in Django's format
/// `pbkdf2_sha256$<iterations>$<salt>$<base64 hash>`.
///
/// A hash costs hundreds of milliseconds of CPU by design: the `async` forms run it on a pool
/// of its own threads (``threads``), never on the event loops that serve sockets, so a burst
/// of logins waits for that pool instead of stalling every connection.
public enum PasswordHasher {
    /// Django 5.1's iteration count for PBKDF2-SHA256.
    public static let defaultIterations = 870_000

    /// Threads hashing may use at once: half the cores (at least one), so the rest keep serving.
    public static let threads = max(1, ProcessInfo.processInfo.activeProcessorCount / 2)

    /// Hashes that may wait for a thread; past it the `async` forms throw ``Busy`` at once
    /// instead of holding a worker's consumer slot for seconds (a burst of logins would otherwise
    /// take every slot and stall every socket's messages behind it).
    public static let maxWaiting = threads * 4

    /// Too many hashes are waiting: answer "try again" (503 with `Retry-After: retryAfter`).
    public struct Busy: Error, CustomStringConvertible, Sendable {
        /// Seconds the client should wait before it tries again: the time the hashes already
        /// queued take on the pool (from the recent hashes' average), plus up to as much again
        /// at random, at least 1. The spread matters: clients refused in one burst and told the
        /// same number come back in one burst, and a server spends its CPU on that herd of
        /// refusals instead of on its sockets.
        public let retryAfter: Int
        /// What to tell the client.
        public var description: String { "password hashing is at capacity; try again in \(retryAfter) s" }
    }

    private static let inFlight = Atomic<Int>(0)
    /// The recent hashes' average duration, in microseconds (an exponential moving average).
    private static let averageMicroseconds = Atomic<Int>(0)

    /// What a hash is taken to cost before one was timed (a server that just started, hit by
    /// the herd of a deploy): about what 870,000 rounds take on one core.
    static let assumedHashMicroseconds = 300_000
    /// The longest `Retry-After` given: the average is wall time, and a starved hashing thread
    /// (it yields to everything) can make it look far longer than a hash costs.
    static let maxRetryAfter = 30

    /// The `Retry-After` for a refusal while `queued` hashes are in flight or waiting.
    static func retryAfter(queued: Int, averageMicroseconds average: Int, random: Double) -> Int {
        let cost = average > 0 ? average : assumedHashMicroseconds
        let drain = Double(queued) * Double(cost) / 1_000_000 / Double(threads)
        return min(maxRetryAfter, max(1, Int((drain * (1 + random)).rounded(.up))))
    }

    /// Runs `body` on the hashing pool, or throws ``Busy`` when too many wait already.
    private static func onPool<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        let waiting = inFlight.wrappingAdd(1, ordering: .relaxed).newValue
        defer { inFlight.wrappingSubtract(1, ordering: .relaxed) }
        guard waiting <= threads + maxWaiting else {
            throw Busy(
                retryAfter: retryAfter(
                    queued: waiting - 1, averageMicroseconds: averageMicroseconds.load(ordering: .relaxed),
                    random: Double.random(in: 0..<1)))
        }
        return try await pool.runIfActive {
            lowerThisThreadsPriority()
            let started = ContinuousClock.now
            defer {
                let took = ContinuousClock.now - started
                let micros = Int(took.components.seconds) * 1_000_000 + Int(took.components.attoseconds / 1_000_000_000_000)
                let previous = averageMicroseconds.load(ordering: .relaxed)
                averageMicroseconds.store(previous == 0 ? micros : (previous * 7 + micros) / 8, ordering: .relaxed)
            }
            return try body()
        }
    }

    private static let pool: NIOThreadPool = {
        let pool = NIOThreadPool(numberOfThreads: threads)
        pool.start()
        return pool
    }()

    /// Hashes a password with a fresh random salt, in Django's format.
    public static func hash(_ password: String, iterations: Int = defaultIterations) throws -> String {
        let salt = RandomToken.string(22, from: RandomToken.alphanumerics)
        let derived = try derive(password, salt: salt, iterations: iterations)
        return "pbkdf2_sha256$\(iterations)$\(salt)$\(Data(derived).base64EncodedString())"
    }

    /// ``hash(_:iterations:)`` on the hashing pool; throws ``Busy`` when it is saturated.
    public static func hash(_ password: String, iterations: Int = defaultIterations) async throws -> String {
        try await onPool { try hash(password, iterations: iterations) }
    }

    /// True when `password` matches `encoded`; false for a wrong password or a malformed hash.
    public static func verify(_ password: String, against encoded: String) -> Bool {
        let parts = encoded.split(separator: "$", omittingEmptySubsequences: false)
        guard parts.count == 4, parts[0] == "pbkdf2_sha256", let iterations = Int(parts[1]), iterations > 0,
            iterations <= 10_000_000, let expected = Data(base64Encoded: String(parts[3])),
            let derived = try? derive(password, salt: String(parts[2]), iterations: iterations)
        else { return false }
        return DeploymentSecret.constantTimeEquals(derived, expected)
    }

    /// ``verify(_:against:)`` on the hashing pool; throws ``Busy`` when it is saturated. With no
    /// stored hash (no such user) it hashes anyway, so an unknown name takes as long to refuse as
    /// a wrong password.
    public static func verify(_ password: String, against encoded: String?, iterations: Int = defaultIterations) async throws -> Bool {
        try await onPool {
            guard let encoded else {
                _ = try? derive(password, salt: "unknown-user-salt", iterations: iterations)
                return false
            }
            return verify(password, against: encoded)
        }
    }

    /// The hashing threads yield to the event loops: a hash may wait a little longer when the
    /// machine is busy, a socket's message should not. On Linux the thread takes the
    /// `SCHED_IDLE` policy (any other runnable thread, an event loop waking for a frame,
    /// preempts it at once; with only nice 19 a waking loop can still wait out the hashing
    /// thread's slice), and nice 19 where that policy is refused.
    private static func lowerThisThreadsPriority() {
        #if os(Linux)
            var parameters = sched_param()
            parameters.sched_priority = 0
            // pid 0 is the calling thread on Linux (scheduling policy is per thread there).
            if sched_setscheduler(0, 5 /* SCHED_IDLE */, &parameters) != 0 {
                _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 19)
            }
        #endif
    }

    /// PBKDF2-HMAC-SHA256, 32 bytes; the thread yields every few hundred rounds (see
    /// ``PBKDF2SHA256``).
    static func derive(_ password: String, salt: String, iterations: Int) throws -> [UInt8] {
        PBKDF2SHA256.derive(password: Array(password.utf8), salt: Array(salt.utf8), rounds: iterations, yielding: true)
    }
}

extension Session {
    /// A new HTTP session with `user` logged in, saved in `environment`'s store; returns its key
    /// (the session cookie's value). What Django's `force_login` does: for tests and tools that
    /// need a logged-in client without going through a login form.
    public static func loggedIn(_ user: User, environment: ConsumerEnvironment) async throws -> String {
        let session = try await Session.load(key: nil, store: environment.sessionStore, settings: environment.sessionConfiguration)
        session.cycleKey()
        session[AuthSessionKey.userID] = .string(user.id)
        try await session.save()
        guard let key = session.key else { throw SessionError(.noKey, "the session was not given a key") }
        return key
    }
}
