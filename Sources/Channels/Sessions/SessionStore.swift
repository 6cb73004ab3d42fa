import ASGI
import CoreMetrics
import Foundation
import Synchronization

/// Where sessions live. A store keeps opaque, already-encoded session data under a key with a
/// time to live, and writes conditionally so that two consumers saving the same session at
/// once never silently overwrite each other (see ``Session/save(recreate:)``).
public protocol SessionStore: Sendable {
    /// The stored bytes of a session, or nil when it does not exist or expired.
    func load(_ key: String) async throws -> [UInt8]?
    /// Writes `data` only if the stored value is still `expected` (nil: only if the key does
    /// not exist, i.e. create-only). Returns false when someone else wrote first.
    func store(_ key: String, data: [UInt8], expected: [UInt8]?, ttl: Duration) async throws -> Bool
    func delete(_ key: String) async throws
    /// The stored bytes of several sessions, in the order asked (nil for one that does not
    /// exist): one round trip where the store can (Redis: `MGET`).
    func load(many keys: [String]) async throws -> [[UInt8]?]
}

extension SessionStore {
    /// One load after another.
    public func load(many keys: [String]) async throws -> [[UInt8]?] {
        var out: [[UInt8]?] = []
        out.reserveCapacity(keys.count)
        for key in keys { out.append(try await load(key)) }
        return out
    }
}

/// The embedded default: sessions in this process's memory. Expired sessions are swept out
/// (at most once per `sweepInterval`, on a write), so the store holds only what lives.
public final class InMemorySessionStore: SessionStore {
    private struct Entry {
        var data: [UInt8]
        var expires: ContinuousClock.Instant
    }

    private struct State {
        var entries: [String: Entry] = [:]
        var nextSweep: ContinuousClock.Instant
    }

    private let state: Mutex<State>
    private let sweepInterval: Duration
    /// `channels_sessions_stored`: the sessions this process holds (with `--metrics-port`).
    private static let stored = Gauge(label: "channels_sessions_stored")

    /// An empty store that sweeps expired sessions at most once per `sweepInterval`.
    public init(sweepInterval: Duration = .seconds(10)) {
        self.sweepInterval = sweepInterval
        self.state = Mutex(State(nextSweep: .now + sweepInterval))
    }

    /// The stored bytes, or nil when missing or expired.
    public func load(_ key: String) async throws -> [UInt8]? {
        let now = ContinuousClock.now
        return state.withLock { state -> [UInt8]? in
            guard let entry = state.entries[key] else { return nil }
            if entry.expires <= now {
                state.entries[key] = nil
                return nil
            }
            return entry.data
        }
    }

    /// Writes only if the stored value is still `expected`; false when someone else wrote first.
    public func store(_ key: String, data: [UInt8], expected: [UInt8]?, ttl: Duration) async throws -> Bool {
        let now = ContinuousClock.now
        return state.withLock { state -> Bool in
            if now >= state.nextSweep {
                state.entries = state.entries.filter { $0.value.expires > now }
                state.nextSweep = now + sweepInterval
            }
            var current = state.entries[key]
            if let entry = current, entry.expires <= now { current = nil }
            guard current?.data == expected else { return false }
            state.entries[key] = Entry(data: data, expires: now + ttl)
            Self.stored.record(state.entries.count)
            return true
        }
    }

    /// Removes the session.
    public func delete(_ key: String) async throws {
        state.withLock {
            $0.entries.removeValue(forKey: key)
            Self.stored.record($0.entries.count)
        }
    }

    /// Sessions held (expired ones until the next sweep).
    public var count: Int { state.withLock { $0.entries.count } }
}
