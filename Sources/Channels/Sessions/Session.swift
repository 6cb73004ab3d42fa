import ASGI
import Crypto
import Foundation
import Logging
import OrderedCollections
import Synchronization

/// A cookie's `SameSite` attribute.
public enum SameSite: String, Sendable {
    /// Sent on top-level navigations from other sites, not on their subrequests (the default).
    case lax = "Lax"
    /// Never sent on requests another site starts.
    case strict = "Strict"
    /// Sent on every request; browsers then require `Secure`, so the cookie always gets it.
    case none = "None"
}

/// The earlier name of ``SessionConfiguration``.
@available(*, deprecated, renamed: "SessionConfiguration")
public typealias SessionSettings = SessionConfiguration

/// What every session shares: ages, the cookie, the secret.
public struct SessionConfiguration: Sendable {
    /// How long an HTTP session lives after its last save (Django's SESSION_COOKIE_AGE: two
    /// weeks). Whole seconds in the store and the cookie.
    public var age: Duration = .seconds(14 * 24 * 3600)
    /// How long a socket's channel session lives after its last use. It is renewed while the
    /// socket sends, and deleted once the socket's `websocket.disconnect` ran.
    public var channelSessionAge: Duration = .seconds(24 * 3600)
    /// The cookie that names an HTTP session.
    public var cookieName: String = "sessionid"
    /// Cookie attributes.
    public var cookiePath: String = "/"
    /// Send the cookie over HTTPS only, always. Without it the cookie is still `Secure` when the
    /// request came over TLS (or `X-Forwarded-Proto: https` behind a trusted proxy).
    public var cookieSecure: Bool = false
    /// Hide the cookie from scripts.
    public var cookieHTTPOnly: Bool = true
    /// The cookie's `SameSite` attribute.
    public var cookieSameSite: SameSite = .lax
    /// How many times a save re-reads and re-applies its changes after losing a race.
    public var saveAttempts: Int = 10
    /// The deployment's secret: channel-session keys and CSRF tokens are keyed with it. Every
    /// process of a deployment needs the same one (the commands read `CHANNELS_SECRET_KEY`);
    /// the default is random, for one process.
    public var secret: DeploymentSecret = .random()
    /// Encrypts stored sessions when set (the commands set it from the layer's
    /// `symmetric_encryption_keys`): a store then holds no readable session data.
    public var cipher: (any SessionCipher)?

    /// Django's defaults.
    public init() {}
}

/// Encrypts what a store holds (sessions, delayed messages).
public protocol SessionCipher: Sendable {
    /// The sealed form of `plaintext`.
    func seal(_ plaintext: [UInt8]) -> [UInt8]
    /// The plaintext of `sealed`; throws when no key opens it.
    func open(_ sealed: [UInt8]) throws -> [UInt8]
}

/// A session could not be used.
public struct SessionError: CodedError, Sendable {
    /// What kind of failure.
    public enum Code: String, Sendable, Hashable, CustomStringConvertible {
        /// No session here: the consumer is not wrapped in the decorator that loads it, or the
        /// message has no `reply_channel` to key a channel session by.
        case notLoaded
        /// A save lost every race to concurrent writers of the same session.
        case saveConflict
        /// The stored session data is not a map (written by something else, or corrupt).
        case malformed
        /// The session has no key (it was never saved).
        case noKey
        /// `enforceOrdering` got a message without its `order` key.
        case noOrder

        /// The code's name.
        public var description: String { rawValue }
    }

    /// What kind of failure.
    public var code: Code
    /// What happened.
    public var message: String

    /// An error of `code`.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }
}

/// A session: a map of message values, loaded from a ``SessionStore`` and saved back only
/// when modified.
///
/// A save writes conditionally: if another consumer saved the same session since this one was
/// loaded (or created it first), the save re-reads the stored data, re-applies this session's
/// own changes (keys set and removed) on top, and tries again. Two consumers that each set a
/// different key therefore both keep their write, even on the session's very first use.
public final class Session: Sendable {
    private struct State {
        var key: String?
        var base: [String: ASGIValue] = [:]
        var snapshot: [UInt8]?
        /// The stored value is a deletion mark (a delete in progress): the session is gone.
        var deleted = false
        var changes: OrderedDictionary<String, ASGIValue?> = [:]
        /// Items appended to list values: re-applied on top of whatever a lost race brings.
        var appends: [Append] = []
        var cleared = false
        var retiredKeys: [String] = []
        /// Loaded from a ``SessionHandOn`` copy, not from the store (until a reload or a save).
        var handedOn = false
    }

    private struct Append {
        var key: String
        var item: ASGIValue
        var keepingLast: Int
        /// A maximum, not a list item: the key becomes the larger of its integer and `item`.
        var isMaximum = false
    }

    /// Where this session is loaded from and saved to.
    public let store: any SessionStore
    /// Its cookie and lifetime settings.
    public let settings: SessionConfiguration
    private let state: Mutex<State>
    /// Called when a session without a key gets one (the HTTP session sets its cookie then).
    let onNewKey: (@Sendable (String) -> Void)?
    private let log: SessionLog
    /// Seconds the stored session lives after a save.
    let ttl: Duration

    init(
        key: String?, store: any SessionStore, settings: SessionConfiguration, ttl: Duration? = nil, log: SessionLog = .none,
        onNewKey: (@Sendable (String) -> Void)? = nil
    ) {
        self.store = store
        self.settings = settings
        self.ttl = ttl ?? settings.age
        self.state = Mutex(State(key: key))
        self.log = log
        self.onNewKey = onNewKey
    }

    /// Loads the session stored under `key` (an empty session if there is none).
    ///
    /// With `handedOn`, inside a ``SessionHandOn`` scope (a drain of ordered messages), a
    /// session this task saved there last is taken as it was saved instead of being read back:
    /// the store held exactly that after the save, and a writer since is caught by the next
    /// save's compare (which re-reads and re-applies, as after any lost race).
    static func load(
        key: String?, store: any SessionStore, settings: SessionConfiguration, ttl: Duration? = nil, log: SessionLog = .none,
        handedOn: Bool = false, onNewKey: (@Sendable (String) -> Void)? = nil
    ) async throws -> Session {
        let session = Session(key: key, store: store, settings: settings, ttl: ttl, log: log, onNewKey: onNewKey)
        if let key {
            if handedOn, let saved = SessionHandOn.current?.saved(storageKey(key)) {
                session.state.withLock {
                    $0.base = saved.base
                    $0.snapshot = saved.snapshot
                    $0.handedOn = true
                }
            } else if handedOn, let read = SessionHandOn.current?.takePrefetched(storageKey(key)) {
                session.apply(read, key: key)
            } else {
                try await session.reload(from: key)
            }
        }
        return session
    }

    /// Stored data that cannot be decoded (another program wrote it) is logged and read as an
    /// empty session; the next save replaces it.
    private func reload(from key: String) async throws {
        apply(try await store.load(Self.storageKey(key)), key: key)
    }

    /// Takes `raw` (what the store held under `key`, nil for nothing) as read now.
    private func apply(_ raw: [UInt8]?, key: String) {
        var decoded: [String: ASGIValue]?
        if let raw {
            do {
                decoded = try Self.decodeStored(raw, settings: settings)
            } catch {
                log.logger?.warning(
                    "unreadable session data replaced by an empty session",
                    metadata: ["session": "\(Self.storageKey(key).prefix(12))", "bytes": "\(raw.count)", "error": "\(error)"])
            }
        }
        let deleted = decoded?[Self.deletedMark] != nil
        state.withLock {
            $0.snapshot = raw
            $0.deleted = deleted
            $0.base = deleted ? [:] : decoded ?? [:]
            $0.handedOn = false
        }
    }

    /// For a session loaded from a ``SessionHandOn`` copy: reads it from the store (keeping
    /// changes made since, as a lost race does) and drops every copy of the scope (another
    /// worker may have run turns since: its saves are not in them). True when it was such a
    /// copy. A decision that must see what is stored (the ordering gate's, that a message is
    /// not due) asks for this first.
    func reloadIfHandedOn() async throws -> Bool {
        guard let key = state.withLock({ $0.handedOn ? $0.key : nil }) else { return false }
        SessionHandOn.current?.forgetAll()
        try await reload(from: key)
        return true
    }

    /// What ``deleteReturningData()`` stores for the moment between reading the session and
    /// deleting it: a save that finds it knows the session is gone.
    static let deletedMark = "__channels_deleted"

    /// The session key, or nil for an HTTP session that has not been created yet.
    public var key: String? { state.withLock { $0.key } }

    /// True when something was set or removed since the last save.
    public var isModified: Bool {
        state.withLock { !$0.changes.isEmpty || !$0.appends.isEmpty || $0.cleared || !$0.retiredKeys.isEmpty }
    }

    /// True when the session holds no data.
    public var isEmpty: Bool { data.isEmpty }

    /// True when the store held this session when it was loaded or last saved.
    public var isStored: Bool { state.withLock { $0.snapshot != nil && !$0.deleted } }

    /// What the store held when this session was loaded or last saved (nil when it held nothing).
    var savedState: SessionHandOn.Saved? {
        state.withLock { state in
            guard let snapshot = state.snapshot, !state.deleted else { return nil }
            return SessionHandOn.Saved(base: state.base, snapshot: snapshot)
        }
    }

    /// The session's data as it stands, stored data plus unsaved changes.
    public var data: [String: ASGIValue] { state.withLock { Self.view($0) } }

    private static func view(_ state: State) -> [String: ASGIValue] {
        var result = state.cleared ? [:] : state.base
        for (key, value) in state.changes { result[key] = value }
        for append in state.appends {
            if append.isMaximum {
                if let current = result[append.key]?.intValue, let value = append.item.intValue, current >= value { continue }
                result[append.key] = append.item
                continue
            }
            var list = result[append.key]?.arrayValue ?? []
            list.append(append.item)
            result[append.key] = .array(Array(list.suffix(append.keepingLast)))
        }
        return result
    }

    /// A value by key; setting one marks the session modified (nil removes the key).
    public subscript(key: String) -> ASGIValue? {
        get { state.withLock { Self.view($0)[key] } }
        set {
            let created = state.withLock { state -> String? in
                state.changes[key] = .some(newValue)
                return Self.ensureKey(&state)
            }
            if let created { onNewKey?(created) }
        }
    }

    /// Appends `item` to the list under `key` (a missing or non-list value starts a new list),
    /// keeping its last `keepingLast` items. Unlike setting the whole list, an append survives
    /// a concurrent writer: when the save loses a race it is applied again on top of what the
    /// other one stored, so two consumers that each append both keep their item. An append
    /// alone never re-creates a session someone deleted meanwhile.
    public func append(_ item: ASGIValue, to key: String, keepingLast: Int = .max) {
        let created = state.withLock { state -> String? in
            state.appends.append(Append(key: key, item: item, keepingLast: max(1, keepingLast)))
            return Self.ensureKey(&state)
        }
        if let created { onNewKey?(created) }
    }

    /// Sets `key` to `value` unless it holds a larger integer. Unlike setting it, a raise
    /// survives a concurrent writer: when the save loses a race it is applied again on top of
    /// what the other one stored, so the larger value wins whichever writer came last (an
    /// order that only moves forward).
    public func raise(_ key: String, to value: Int64) {
        let created = state.withLock { state -> String? in
            state.appends.append(Append(key: key, item: .int(value), keepingLast: 1, isMaximum: true))
            return Self.ensureKey(&state)
        }
        if let created { onNewKey?(created) }
    }

    /// Removes every value (logout does this).
    public func removeAll() {
        state.withLock {
            $0.cleared = true
            $0.changes = [:]
            $0.appends = []
        }
    }

    /// Gives the session a new key, keeping its data; the old key is deleted on the next save.
    /// Done at login, so a key an attacker planted before login is worthless after it.
    public func cycleKey() {
        let created = state.withLock { state -> String in
            if let old = state.key { state.retiredKeys.append(old) }
            let fresh = Self.newKey()
            state.key = fresh
            // The new key starts empty in the store: write everything, not only the changes.
            for (key, value) in Self.view(state) where state.changes[key] == nil || state.appends.contains(where: { $0.key == key }) {
                state.changes[key] = .some(value)
            }
            state.appends = []
            state.snapshot = nil
            return fresh
        }
        onNewKey?(created)
    }

    private static func ensureKey(_ state: inout State) -> String? {
        guard state.key == nil else { return nil }
        let fresh = newKey()
        state.key = fresh
        return fresh
    }

    /// A random 32-character key of lowercase letters and digits (Django's form), from the
    /// system's secure generator.
    public static func newKey() -> String {
        RandomToken.string(32, from: RandomToken.lowercaseAlphanumerics)
    }

    /// Saves if modified. On a lost race it re-reads and re-applies its own changes. With
    /// `recreate: false` a session someone deleted meanwhile stays deleted (a renewal must not
    /// bring back the session of a socket that just closed).
    ///
    /// - Returns: false when the changes were dropped because the session was deleted meanwhile
    ///   (with `recreate: false`, or when the only changes were appends); true otherwise.
    @discardableResult
    public func save(recreate: Bool = true) async throws -> Bool {
        guard isModified else { return true }
        let (key, retired) = state.withLock { ($0.key, $0.retiredKeys) }
        guard let key else { return true }
        // Every lost race is another writer's win, so a save whose only changes are appends
        // (a socket listing itself; many may race at once) tries until it lands, within bounds.
        let onlyAppends = state.withLock { $0.changes.isEmpty && !$0.cleared && $0.retiredKeys.isEmpty }
        let attempts = onlyAppends ? max(settings.saveAttempts, Self.appendSaveAttempts) : max(1, settings.saveAttempts)
        for attempt in 1...attempts {
            let (data, expected) = state.withLock { state -> ([UInt8], [UInt8]?) in
                let plain = Self.encode(Self.view(state))
                return (settings.cipher?.seal(plain) ?? plain, state.snapshot)
            }
            if try await store.store(Self.storageKey(key), data: data, expected: expected, ttl: ttl) {
                let base = state.withLock { state in
                    state.base = Self.view(state)
                    state.snapshot = data
                    state.handedOn = false
                    state.changes = [:]
                    state.appends = []
                    state.cleared = false
                    state.retiredKeys = []
                    return state.base
                }
                SessionHandOn.current?.refresh(Self.storageKey(key), base: base, snapshot: data)
                for old in retired where old != key {
                    SessionHandOn.current?.forget(Self.storageKey(old))
                    try await store.delete(Self.storageKey(old))
                }
                return true
            }
            // Someone else wrote it: what this task saved there is no longer what is stored.
            SessionHandOn.current?.forget(Self.storageKey(key))
            if attempt < attempts {
                try await reload(from: key)
                // Appending to a list of a session someone deleted meanwhile does not bring it back.
                if (!recreate || onlyAppends) && !isStored {
                    state.withLock { $0.appends = [] }
                    return false
                }
            }
        }
        throw SessionError(
            .saveConflict,
            "session \(Self.storageKey(key).prefix(12)) could not be saved: \(attempts) concurrent writers won every race")
    }

    /// Tries of a save that only appends (``append(_:to:keepingLast:)``).
    static let appendSaveAttempts = 256

    /// Deletes the stored session and returns its data as it stood at that moment: a save that
    /// lands before the deletion is in what is returned, one that comes after finds the session
    /// gone (an append is then dropped: ``save(recreate:)`` returns false). Logout reads the
    /// sockets to close this way, so a socket that listed itself while the logout ran is closed
    /// too, or learns that it is not signed in.
    public func deleteReturningData() async throws -> [String: ASGIValue] {
        guard let key = state.withLock({ $0.key }) else { return [:] }
        let storageKey = Self.storageKey(key)
        SessionHandOn.current?.forget(storageKey)
        let plain = Self.encode([Self.deletedMark: .bool(true)])
        let mark = settings.cipher?.seal(plain) ?? plain
        for _ in 1...Self.appendSaveAttempts {
            guard let raw = try await store.load(storageKey) else {
                state.withLock { $0 = State(key: nil) }
                return [:]
            }
            let decoded = (try? Self.decodeStored(raw, settings: settings)) ?? [:]
            if try await store.store(storageKey, data: mark, expected: raw, ttl: .seconds(60)) {
                try await store.delete(storageKey)
                state.withLock { $0 = State(key: nil) }
                return decoded[Self.deletedMark] != nil ? [:] : decoded
            }
        }
        throw SessionError(
            .saveConflict, "session \(storageKey.prefix(12)) could not be deleted: concurrent writers won every race")
    }

    /// Deletes the stored session and forgets its data.
    public func delete() async throws {
        let key = state.withLock { state -> String? in
            defer { state = State(key: nil) }
            return state.key
        }
        if let key {
            SessionHandOn.current?.forget(Self.storageKey(key))
            try await store.delete(Self.storageKey(key))
        }
    }

    static func encode(_ data: [String: ASGIValue]) -> [UInt8] {
        var map = OrderedDictionary<String, ASGIValue>()
        for key in data.keys.sorted() { map[key] = data[key] }
        return MsgPackEncoder.encode(.map(map))
    }

    /// Stored bytes read back: opened with the settings' cipher when there is one.
    static func decodeStored(_ raw: [UInt8], settings: SessionConfiguration) throws -> [String: ASGIValue] {
        try decode(settings.cipher.map { try $0.open(raw) } ?? raw)
    }

    static func decode(_ bytes: [UInt8]) throws -> [String: ASGIValue] {
        guard case .map(let map) = try MsgPackDecoder().decode(bytes) else {
            throw SessionError(.malformed, "stored session data is not a map")
        }
        return Dictionary(uniqueKeysWithValues: map.map { ($0.key, $0.value) })
    }

    /// Where a session is stored: the SHA-256 of its key, so that what a store holds (a Redis
    /// key, a dump) is never a key a client could present.
    public static func storageKey(_ key: String) -> String {
        var key = key
        return key.withUTF8 { Hex.encode(SHA256.hash(data: UnsafeRawBufferPointer($0))) }
    }

    /// True for a key of the form HTTP sessions have (32 lowercase letters and digits): the
    /// only keys a cookie or `?session_key=` may name. Channel-session and ordering keys have
    /// other forms, so none of them can be presented as an HTTP session.
    public static func isHTTPSessionKey(_ key: String) -> Bool {
        key.utf8.count == 32 && key.utf8.allSatisfy { (0x61...0x7a).contains($0) || (0x30...0x39).contains($0) }
    }

    /// The channel session key of a reply channel: "chs" and 61 hex digits of an HMAC of the
    /// reply channel with the deployment's secret. Channels 1.x used a plain SHA-1 of the
    /// reply channel, which anyone who saw the reply channel (a log line) could compute.
    public static func channelSessionKey(replyChannel: String, secret: DeploymentSecret) -> String {
        "chs" + secret.hex("channel-session", replyChannel, length: 61)
    }
}

/// Where a session's log lines go: nowhere, or the logger of the consumer that opened it (whose
/// per-message metadata is only built when a line is logged). The consumer is held weakly: its
/// context holds the session.
struct SessionLog: Sendable {
    private weak var context: ConsumerContext?

    static let none = SessionLog(context: nil)
    static func consumer(_ context: ConsumerContext) -> SessionLog { SessionLog(context: context) }

    var logger: Logger? { context?.logger }
}

/// The sessions a task saved in a scope, as saved, by storage key: one socket's messages run
/// one after another in a worker (its mailbox, or a drain of its parked messages), each right
/// after the one before it saved the socket's session (and its ordered hand-off's counter);
/// the next one starts from those instead of reading them back (a round trip each on the
/// socket's critical path). Only the ordering machinery puts sessions in (the gate's session
/// after its turn, an ordered hand-off's counter after its send), and only loads that ask for
/// it (`Session.load(handedOn: true)`) use it; any later save of such a session in the scope
/// updates it, and a save that loses its race, or a delete, forgets it.
///
/// An entry is used for at most `maxAge` after its save: the ordering gate's gap skip, the one
/// writer of a socket's order besides its own turns, moves an order only after it stood for a
/// fraction of the gap timeout (``OrderingGaps/provenGrace(_:)``), and `maxAge` is half that
/// (a turn never starts from an order a skip moved meanwhile). Any other writer since is
/// caught by the next save's compare.
final class SessionHandOn: Sendable {
    struct Saved: Sendable {
        let base: [String: ASGIValue]
        let snapshot: [UInt8]
        var at = ContinuousClock.now
    }

    /// The scope the current task runs in, if any.
    @TaskLocal static var current: SessionHandOn?

    private let sessions = Mutex<[String: Saved]>([:])
    private let maxAge: Duration

    /// A scope whose entries are used for `maxAge` after their save (see the type's notes).
    init(maxAge: Duration) { self.maxAge = maxAge }

    /// How long a scope of the ordering gate keeps an entry, for a gap timeout of `timeout`.
    static func maxAge(gapTimeout timeout: Duration) -> Duration { OrderingGaps.provenGrace(timeout) / 2 }

    /// Records `session` as saved (when it is stored and unmodified).
    func record(_ session: Session) {
        guard let key = session.key, !session.isModified, let saved = session.savedState else { return }
        record(Session.storageKey(key), base: saved.base, snapshot: saved.snapshot)
    }

    func saved(_ storageKey: String) -> Saved? {
        let now = ContinuousClock.now
        return sessions.withLock { sessions in
            guard let saved = sessions[storageKey] else { return nil }
            guard now - saved.at < maxAge else {
                sessions[storageKey] = nil
                return nil
            }
            return saved
        }
    }

    private func record(_ storageKey: String, base: [String: ASGIValue], snapshot: [UInt8]) {
        sessions.withLock { sessions in
            // A handful per socket; bounded all the same.
            if sessions.count >= 64 { sessions.removeAll() }
            sessions[storageKey] = Saved(base: base, snapshot: snapshot)
        }
    }

    /// A save of a session this scope holds: it now holds what was saved.
    func refresh(_ storageKey: String, base: [String: ASGIValue], snapshot: [UInt8]) {
        sessions.withLock { sessions in
            guard sessions[storageKey] != nil else { return }
            sessions[storageKey] = Saved(base: base, snapshot: snapshot)
        }
    }

    func forget(_ storageKey: String) { _ = sessions.withLock { $0.removeValue(forKey: storageKey) } }

    /// Sessions read ahead of their load, in one round trip with another (a socket's ordered
    /// hand-off counters, read with its channel session): each is taken once, by the first load
    /// that asks for it (as if that load had read it then; a writer since is caught by the next
    /// save's compare, as for any read).
    private let prefetched = Mutex<[String: [UInt8]?]>([:])

    /// Keeps `raw`, read from the store under `storageKey`, for the next load of it.
    func prefetch(_ storageKey: String, _ raw: [UInt8]?) {
        prefetched.withLock { prefetched in
            if prefetched.count >= 64 { prefetched.removeAll() }
            prefetched[storageKey] = raw
        }
    }

    /// What was read ahead under `storageKey` (`.some(nil)`: nothing was stored), once.
    func takePrefetched(_ storageKey: String) -> [UInt8]?? {
        prefetched.withLock { $0.removeValue(forKey: storageKey) }
    }

    /// Drops every copy (one of them proved stale: the others may be too).
    func forgetAll() { sessions.withLock { $0.removeAll() } }
}
