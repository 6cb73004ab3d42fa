import ASGI
import Foundation
import Synchronization

/// A scheduled message taken from a ``DelayStore``: what to deliver and when it was due.
public struct DueEntry: Sendable, Equatable {
    /// The stored message (the delay server's msgpack envelope).
    public var entry: [UInt8]
    /// When it was due (milliseconds since 1970).
    public var due: Int64
    /// The store's handle on the taken entry (``DelayStore/finished(_:)`` lets go of it); not
    /// part of what the entry is.
    public var receipt: [UInt8]

    /// An entry due at `due`; `receipt` is what the store needs to let go of it once handled.
    public init(entry: [UInt8], due: Int64, receipt: [UInt8] = []) {
        self.entry = entry
        self.due = due
        self.receipt = receipt
    }

    /// The same message due at the same time (whatever the receipt).
    public static func == (lhs: DueEntry, rhs: DueEntry) -> Bool { lhs.entry == rhs.entry && lhs.due == rhs.due }
}

/// Where the delay server keeps messages until they are due.
public protocol DelayStore: Sendable {
    /// Keeps `entry` until `due` (milliseconds since 1970).
    func schedule(_ entry: [UInt8], due: Int64) async throws
    /// Removes and returns up to `limit` entries due at `now`, atomically: two servers taking
    /// at once never get the same entry.
    func takeDue(now: Int64, limit: Int) async throws -> [DueEntry]
    /// Lets go of an entry handed out by ``takeDue(now:limit:)`` once it was delivered (or
    /// stored again for another try). A store shared by processes keeps what it handed out until
    /// then, and hands it out again if its taker never finishes it (it died between the take and
    /// the send).
    func finished(_ taken: DueEntry) async throws
    /// How long a taken entry stays this taker's before another may take it over (nil: as long
    /// as the process lives, a store in the process).
    var deliveryLease: Duration? { get }
    /// When the earliest entry is due, if there is one.
    func nextDue() async throws -> Int64?
    /// The store's own clock (milliseconds since 1970), shared by every delay server that uses
    /// it, or nil for this process's clock. Due times are set and compared on it, so two
    /// delay servers on machines whose clocks differ agree on when a message is due.
    func now() async throws -> Int64?
}

extension DelayStore {
    /// This process's clock (a store in the process).
    public func now() async throws -> Int64? { nil }
    /// Nothing to let go of (a store in the process dies with its taker).
    public func finished(_ taken: DueEntry) async throws {}
    /// No lease: a store in the process dies with its taker.
    public var deliveryLease: Duration? { nil }
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
    public func takeDue(now: Int64, limit: Int) async throws -> [DueEntry] {
        entries.withLock { entries in
            let count = min(limit, entries.prefix { $0.due <= now }.count)
            defer { entries.removeFirst(count) }
            return entries.prefix(count).map { DueEntry(entry: $0.entry, due: $0.due) }
        }
    }

    /// When the earliest entry is due, if there is one.
    public func nextDue() async throws -> Int64? { entries.withLock { $0.first?.due } }
}
