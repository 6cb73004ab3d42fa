import ASGI
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// The member lists of bundles this layer decoded, by their bytes: a group's next message to the
/// same members carries the same list (the send script copies it from the group's cached split),
/// so its 500 names are compared with the ones decoded before (one `memcmp`) instead of being
/// decoded, checked and allocated again.
///
/// Only the layout the send script writes is recognised: a map whose first key is
/// `__asgi_channel__` and whose value is an array of strings. Anything else takes the whole
/// decoder, and so does a list seen for the first time; what goes into the table was decoded and
/// checked there (every name one of the process channel's own).
final class BundleMembers: Sendable {
    struct Entry: Sendable {
        let listName: String
        let bytes: [UInt8]
        let members: BundleMemberList
    }

    /// Where a bundle's member list lies in its body, and what follows it.
    struct Layout {
        /// The member list (its array header included).
        let list: Range<Int>
        /// Entries in the map, the member list included.
        let mapCount: Int
    }

    private let entries = Mutex<(table: [Int: Entry], bytes: Int)>(([:], 0))
    /// Lists answered from the table (for tests and profiles).
    let hits = Atomic<Int>(0)
    /// Lists kept at most (one per group of this process with a recent message), and their
    /// bytes at most (a room of 10,000 is a 400 KB list per server, and one that changes at every
    /// send, a join storm's, makes a new one each time); past either the table starts again.
    static let limit = 256
    static let byteBudget = 8 << 20

    private static let key: [UInt8] = [0xb0] + Array("__asgi_channel__".utf8)
    /// The member list's place in `body`, when the body has the send script's layout.
    static func layout(of body: [UInt8]) -> Layout? {
        body.withUnsafeBytes { bytes -> Layout? in
            var offset = 0
            func take(_ count: Int) -> Int? {
                guard count >= 0, offset + count <= bytes.count else { return nil }
                defer { offset += count }
                return offset
            }
            // A msgpack header: a count in the marker (`fixed`, under `mask`) or in the next
            // bytes. The wide markers follow one another from `wide`, their counts 1, 2 and 4
            // bytes wide (str8/16/32) or 2 and 4 (map16/32, array16/32: `shift` 1).
            func header(fixed: ClosedRange<UInt8>, mask: UInt8, wide: UInt8, kinds: UInt8, shift: Int) -> Int? {
                guard let at = take(1) else { return nil }
                let marker = bytes[at]
                if fixed.contains(marker) { return Int(marker & mask) }
                guard marker >= wide, marker - wide < kinds else { return nil }
                let width = 1 << (Int(marker - wide) + shift)
                guard let from = take(width) else { return nil }
                var value = 0
                for index in from..<(from + width) { value = value << 8 | Int(bytes[index]) }
                return value
            }
            guard let mapCount = header(fixed: 0x80...0x8f, mask: 0x0f, wide: 0xde, kinds: 2, shift: 1),
                mapCount >= 1, let keyAt = take(key.count),
                bytes[keyAt..<(keyAt + key.count)].elementsEqual(key)
            else { return nil }
            let start = offset
            guard let count = header(fixed: 0x90...0x9f, mask: 0x0f, wide: 0xdc, kinds: 2, shift: 1) else { return nil }
            for _ in 0..<count {
                guard let length = header(fixed: 0xa0...0xbf, mask: 0x1f, wide: 0xd9, kinds: 3, shift: 0),
                    take(length) != nil
                else { return nil }
            }
            return Layout(list: start..<offset, mapCount: mapCount)
        }
    }

    /// The list decoded before for `listName` (the same instance), when `body[layout.list]` is
    /// its bytes.
    func members(in body: [UInt8], at layout: Layout, listName: String) -> BundleMemberList? {
        let entry = entries.withLock { $0.table[Self.hash(body, layout.list)] }
        guard let entry, entry.listName == listName, entry.bytes.count == layout.list.count else { return nil }
        let same = entry.bytes.withUnsafeBytes { kept in
            body.withUnsafeBytes { given in
                kept.isEmpty || memcmp(kept.baseAddress!, given.baseAddress! + layout.list.lowerBound, kept.count) == 0
            }
        }
        guard same else { return nil }
        hits.wrappingAdd(1, ordering: .relaxed)
        return entry.members
    }

    /// Keeps `members`, decoded and checked from `body[layout.list]`.
    func keep(_ members: BundleMemberList, of body: [UInt8], at layout: Layout, listName: String) {
        // The names cost about their bytes again.
        let size = 2 * layout.list.count
        guard size <= Self.byteBudget / 4 else { return }
        let entry = Entry(listName: listName, bytes: Array(body[layout.list]), members: members)
        entries.withLock { entries in
            if entries.table.count >= Self.limit || entries.bytes + size > Self.byteBudget {
                entries = ([:], 0)
            }
            if let old = entries.table.updateValue(entry, forKey: Self.hash(body, layout.list)) {
                entries.bytes -= 2 * old.bytes.count
            }
            entries.bytes += size
        }
    }

    /// A cheap key for a list: its length and its first and last 64 bytes (the table compares
    /// the whole list before it answers).
    private static func hash(_ body: [UInt8], _ range: Range<Int>) -> Int {
        var hasher = Hasher()
        hasher.combine(range.count)
        body.withUnsafeBytes { bytes in
            let list = UnsafeRawBufferPointer(rebasing: bytes[range])
            hasher.combine(bytes: UnsafeRawBufferPointer(rebasing: list.prefix(64)))
            hasher.combine(bytes: UnsafeRawBufferPointer(rebasing: list.suffix(64)))
        }
        return hasher.finalize()
    }
}
