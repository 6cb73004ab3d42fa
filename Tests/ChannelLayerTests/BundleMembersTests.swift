import ASGI
import OrderedCollections
import Testing

@testable import RedisChannelLayer

/// The table of bundles' member lists: which bodies it recognises (every msgpack header width the
/// send script or another writer may use), what it answers, and its bounds (a list count and a
/// byte budget, so a join storm in a room of thousands cannot grow it without end).
@Suite("bundle member lists matched by their bytes")
struct BundleMembersTests {
    static let process = "bundle.table!"

    static func body(_ names: [String], text: String = "hi") -> [UInt8] {
        MsgPackEncoder.encode(.map(["__asgi_channel__": .array(names.map(ASGIValue.string)), "text": .string(text)]))
    }

    @Test("every header width is read: fixed and wide maps, arrays and strings")
    func everyHeaderWidth() throws {
        // 20 members: an array16; names of 40 and 300 bytes: str8 and str16.
        let names = (0..<20).map { Self.process + String(repeating: "a", count: $0 % 2 == 0 ? 25 : 285) + "\($0)" }
        let body = Self.body(names)
        let layout = try #require(BundleMembers.layout(of: body))
        #expect(layout.mapCount == 2)
        let list = try MsgPackDecoder().decode(body[layout.list])
        #expect(list == .array(names.map(ASGIValue.string)), "the range is exactly the member list")
        // A map of 16 entries (map16) with the list first.
        var fields: [(String, ASGIValue)] = [("__asgi_channel__", .array([.string(Self.process + "x")]))]
        for i in 0..<15 { fields.append(("f\(i)", .int(Int64(i)))) }
        var wide: [UInt8] = [0xde, 0, 16]
        for (key, value) in fields {
            MsgPackEncoder.writeString(key, into: &wide)
            MsgPackEncoder.write(value, into: &wide)
        }
        #expect(BundleMembers.layout(of: wide)?.mapCount == 16)
        // Not the layout: the list not first, a non-string member, a body cut short.
        #expect(BundleMembers.layout(of: MsgPackEncoder.encode(.map(["text": "x", "__asgi_channel__": .array([.string("a!b")])]))) == nil)
        #expect(BundleMembers.layout(of: MsgPackEncoder.encode(.map(["__asgi_channel__": .array([.int(1)])]))) == nil)
        #expect(BundleMembers.layout(of: Array(body.dropLast(body.count - 30))) == nil)
    }

    @Test("a list is answered for its own channel and its exact bytes only")
    func answersOnlyTheSameBytesOnTheSameChannel() throws {
        let table = BundleMembers()
        let names = (0..<3).map { Self.process + "m\($0)" }
        let body = Self.body(names)
        let layout = try #require(BundleMembers.layout(of: body))
        #expect(table.names(in: body, at: layout, listName: Self.process) == nil, "nothing kept yet")
        table.keep(names, of: body, at: layout, listName: Self.process)
        let next = Self.body(names, text: "another message")
        #expect(table.names(in: next, at: try #require(BundleMembers.layout(of: next)), listName: Self.process) == names)
        // The same instance each time: a server keeps what a list resolved to by its identity.
        let once = table.members(in: next, at: try #require(BundleMembers.layout(of: next)), listName: Self.process)
        let twice = table.members(in: body, at: layout, listName: Self.process)
        #expect(once != nil && once === twice)
        #expect(table.names(in: body, at: layout, listName: "bundle.other!") == nil)
        // Same length, same first and last 64 bytes, one name changed in the middle.
        var changed = names
        changed[1] = Self.process + "mX"
        let other = Self.body((0..<9).map { Self.process + "m\($0)" })
        var middle = (0..<9).map { Self.process + "m\($0)" }
        middle[4] = Self.process + "mX"
        let otherBody = Self.body(middle)
        table.keep(
            (0..<9).map { Self.process + "m\($0)" }, of: other, at: try #require(BundleMembers.layout(of: other)), listName: Self.process)
        #expect(table.names(in: otherBody, at: try #require(BundleMembers.layout(of: otherBody)), listName: Self.process) == nil)
    }

    @Test("bounded: past 256 lists, or past its byte budget, the table starts again; a huge list is not kept")
    func bounded() throws {
        let table = BundleMembers()
        func kept(_ tag: Int, members: Int = 2) throws -> (body: [UInt8], layout: BundleMembers.Layout, names: [String]) {
            let names = (0..<members).map { Self.process + "t\(tag)n\($0)" }
            let body = Self.body(names)
            return (body, try #require(BundleMembers.layout(of: body)), names)
        }
        let first = try kept(0)
        table.keep(first.names, of: first.body, at: first.layout, listName: Self.process)
        for tag in 1..<BundleMembers.limit {
            let list = try kept(tag)
            table.keep(list.names, of: list.body, at: list.layout, listName: Self.process)
        }
        #expect(table.names(in: first.body, at: first.layout, listName: Self.process) == first.names, "256 lists fit")
        let overflow = try kept(BundleMembers.limit)
        table.keep(overflow.names, of: overflow.body, at: overflow.layout, listName: Self.process)
        #expect(table.names(in: first.body, at: first.layout, listName: Self.process) == nil, "the 257th started it again")
        #expect(table.names(in: overflow.body, at: overflow.layout, listName: Self.process) == overflow.names)

        // Lists of about 0.95 MB (names counted twice: 1.9 MB each, under a quarter of the budget):
        // five pass the 8 MiB budget, so the table starts again on the way; a list past a
        // quarter of the budget is never kept.
        let big = BundleMembers()
        var lists: [(body: [UInt8], layout: BundleMembers.Layout, names: [String])] = []
        for tag in 0..<5 {
            let list = try kept(1000 + tag, members: 38_000)
            #expect(2 * list.layout.list.count <= BundleMembers.byteBudget / 4)
            big.keep(list.names, of: list.body, at: list.layout, listName: Self.process)
            lists.append(list)
        }
        let answered = lists.filter { big.names(in: $0.body, at: $0.layout, listName: Self.process) != nil }.count
        #expect(answered < 5, "five lists of 1.9 MB each were all kept: no byte budget")
        #expect(big.names(in: lists[4].body, at: lists[4].layout, listName: Self.process) != nil, "the newest is kept")
        let huge = try kept(2000, members: 80_000)
        big.keep(huge.names, of: huge.body, at: huge.layout, listName: Self.process)
        #expect(big.names(in: huge.body, at: huge.layout, listName: Self.process) == nil, "a list over a quarter of the budget was kept")
    }
}

extension BundleMembers {
    /// The names of a list kept before (see ``members(in:at:listName:)``).
    fileprivate func names(in body: [UInt8], at layout: Layout, listName: String) -> [String]? {
        members(in: body, at: layout, listName: listName)?.names
    }

    /// Keeps `names` as a list.
    fileprivate func keep(_ names: [String], of body: [UInt8], at layout: Layout, listName: String) {
        keep(BundleMemberList(names), of: body, at: layout, listName: listName)
    }
}
