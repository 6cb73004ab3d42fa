import ASGI
import Foundation
import Synchronization

/// Where the delay server keeps messages until they are due.
public protocol DelayStore: Sendable {
    /// Keeps `entry` until `due` (milliseconds since 1970).
    func schedule(_ entry: [UInt8], due: Int64) async throws
    /// Removes and returns up to `limit` entries due at `now`, atomically: two servers taking
    /// at once never get the same entry.
    func takeDue(now: Int64, limit: Int) async throws -> [[UInt8]]
    /// When the earliest entry is due, if there is one.
    func nextDue() async throws -> Int64?
}

/// Delayed messages in this process (the in-memory layer's companion).
public final class InMemoryDelayStore: DelayStore {
    private let entries = Mutex<[(due: Int64, entry: [UInt8])]>([])

    /// An empty store.
    public init() {}

    /// Keeps `entry` until `due` (milliseconds since the epoch).
    public func schedule(_ entry: [UInt8], due: Int64) async throws {
        entries.withLock { entries in
            let index = entries.firstIndex { $0.due > due } ?? entries.endIndex
            entries.insert((due, entry), at: index)
        }
    }

    /// Removes and returns up to `limit` entries due at `now`, earliest first.
    public func takeDue(now: Int64, limit: Int) async throws -> [[UInt8]] {
        entries.withLock { entries in
            let count = min(limit, entries.prefix { $0.due <= now }.count)
            defer { entries.removeFirst(count) }
            return entries.prefix(count).map(\.entry)
        }
    }

    /// When the earliest entry is due, if there is one.
    public func nextDue() async throws -> Int64? { entries.withLock { $0.first?.due } }
}
