import OrderedCollections

/// Reads every msgpack form that can appear in an ASGI message and rejects everything else
/// with a ``MsgPackError``. Lengths are checked against the bytes that remain before anything
/// is allocated, and nesting is bounded, so hostile input cannot crash, hang or balloon memory.
public struct MsgPackDecoder: Sendable {
    /// Containers nested deeper than this are rejected.
    public var maxDepth: Int

    /// A decoder that refuses nesting deeper than `maxDepth`.
    public init(maxDepth: Int = 256) {
        self.maxDepth = maxDepth
    }

    /// Decodes one top-level value that must be a map, the shape of every ASGI message.
    public func decodeMessage(_ bytes: some Collection<UInt8>) throws(MsgPackError) -> Message {
        let value = try decode(bytes)
        guard case .map(let fields) = value else {
            throw MsgPackError(.notAMap, offset: 0, detail: "top-level \(value.typeName)")
        }
        return Message(fields)
    }

    /// Decodes exactly one value; trailing bytes are an error.
    public func decode(_ bytes: some Collection<UInt8>) throws(MsgPackError) -> ASGIValue {
        let result: Result<ASGIValue, MsgPackError>
        if let fast = bytes.withContiguousStorageIfAvailable({ buffer in
            Self.run(UnsafeRawBufferPointer(buffer), maxDepth: maxDepth)
        }) {
            result = fast
        } else {
            let copy = Array(bytes)
            result = copy.withUnsafeBytes { Self.run($0, maxDepth: maxDepth) }
        }
        return try result.get()
    }

    private static func run(_ buffer: UnsafeRawBufferPointer, maxDepth: Int) -> Result<ASGIValue, MsgPackError> {
        var reader = Reader(buffer: buffer, maxDepth: maxDepth)
        do throws(MsgPackError) {
            let value = try reader.readValue(depth: 0)
            if reader.offset != buffer.count {
                throw MsgPackError(
                    .trailingBytes, offset: reader.offset,
                    detail: "\(buffer.count - reader.offset) bytes after the value")
            }
            return .success(value)
        } catch {
            return .failure(error)
        }
    }
}

private struct Reader {
    let buffer: UnsafeRawBufferPointer
    let maxDepth: Int
    var offset = 0

    init(buffer: UnsafeRawBufferPointer, maxDepth: Int) {
        self.buffer = buffer
        self.maxDepth = maxDepth
    }

    var remaining: Int { buffer.count - offset }

    mutating func byte() throws(MsgPackError) -> UInt8 {
        guard offset < buffer.count else { throw MsgPackError(.truncated, offset: offset) }
        let b = buffer[offset]
        offset += 1
        return b
    }

    mutating func bigEndian<T: FixedWidthInteger>(_: T.Type) throws(MsgPackError) -> T {
        let size = MemoryLayout<T>.size
        guard remaining >= size else { throw MsgPackError(.truncated, offset: offset) }
        var value: T = 0
        for i in 0..<size {
            value = (value << 8) | T(buffer[offset + i])
        }
        offset += size
        return value
    }

    mutating func length(_ width: Int) throws(MsgPackError) -> Int {
        switch width {
        case 1: Int(try byte())
        case 2: Int(try bigEndian(UInt16.self))
        default: Int(try bigEndian(UInt32.self))
        }
    }

    mutating func raw(_ count: Int) throws(MsgPackError) -> UnsafeRawBufferPointer {
        guard count <= remaining else {
            throw MsgPackError(
                .lengthExceedsInput, offset: offset,
                detail: "needs \(count) bytes, \(remaining) remain")
        }
        let slice = UnsafeRawBufferPointer(rebasing: buffer[offset..<(offset + count)])
        offset += count
        return slice
    }

    mutating func string(_ count: Int) throws(MsgPackError) -> String {
        let start = offset
        let slice = try raw(count)
        guard let s = String(validating: slice.bindMemory(to: UInt8.self) as UnsafeBufferPointer<UInt8>, as: UTF8.self) else {
            throw MsgPackError(.invalidUTF8, offset: start)
        }
        return s
    }

    mutating func readValue(depth: Int) throws(MsgPackError) -> ASGIValue {
        let start = offset
        let marker = try byte()
        switch marker {
        case 0x00...0x7f: return .int(Int64(marker))
        case 0xe0...0xff: return .int(Int64(Int8(bitPattern: marker)))
        case 0x80...0x8f: return try readMap(count: Int(marker & 0x0f), depth: depth)
        case 0x90...0x9f: return try readArray(count: Int(marker & 0x0f), depth: depth)
        case 0xa0...0xbf: return .string(try string(Int(marker & 0x1f)))
        case 0xc0: return .null
        case 0xc2: return .bool(false)
        case 0xc3: return .bool(true)
        case 0xc4: return .bytes(Array(try raw(try length(1))))
        case 0xc5: return .bytes(Array(try raw(try length(2))))
        case 0xc6: return .bytes(Array(try raw(try length(4))))
        case 0xca: return .double(Double(Float(bitPattern: try bigEndian(UInt32.self))))
        case 0xcb: return .double(Double(bitPattern: try bigEndian(UInt64.self)))
        case 0xcc: return .int(Int64(try byte()))
        case 0xcd: return .int(Int64(try bigEndian(UInt16.self)))
        case 0xce: return .int(Int64(try bigEndian(UInt32.self)))
        case 0xcf:
            let u = try bigEndian(UInt64.self)
            guard u <= UInt64(Int64.max) else {
                throw MsgPackError(.integerOverflow, offset: start, detail: "\(u) does not fit Int64")
            }
            return .int(Int64(u))
        case 0xd0: return .int(Int64(Int8(bitPattern: try byte())))
        case 0xd1: return .int(Int64(Int16(bitPattern: try bigEndian(UInt16.self))))
        case 0xd2: return .int(Int64(Int32(bitPattern: try bigEndian(UInt32.self))))
        case 0xd3: return .int(Int64(bitPattern: try bigEndian(UInt64.self)))
        case 0xd9: return .string(try string(try length(1)))
        case 0xda: return .string(try string(try length(2)))
        case 0xdb: return .string(try string(try length(4)))
        case 0xdc: return try readArray(count: try length(2), depth: depth)
        case 0xdd: return try readArray(count: try length(4), depth: depth)
        case 0xde: return try readMap(count: try length(2), depth: depth)
        case 0xdf: return try readMap(count: try length(4), depth: depth)
        default:
            // 0xc1 (never used), 0xc7...0xc9 and 0xd4...0xd8 (extension types).
            throw MsgPackError(
                .unsupportedType, offset: start,
                detail: "marker 0x" + String(marker, radix: 16))
        }
    }

    mutating func enter(_ depth: Int) throws(MsgPackError) {
        if depth >= maxDepth {
            throw MsgPackError(.nestingTooDeep, offset: offset - 1, detail: "limit \(maxDepth)")
        }
    }

    mutating func readArray(count: Int, depth: Int) throws(MsgPackError) -> ASGIValue {
        try enter(depth)
        // Every element takes at least one byte: a count above what remains is a lie.
        guard count <= remaining else {
            throw MsgPackError(
                .lengthExceedsInput, offset: offset,
                detail: "array of \(count) with \(remaining) bytes left")
        }
        var elements: [ASGIValue] = []
        elements.reserveCapacity(count)
        for _ in 0..<count {
            elements.append(try readValue(depth: depth + 1))
        }
        return .array(elements)
    }

    mutating func readMap(count: Int, depth: Int) throws(MsgPackError) -> ASGIValue {
        try enter(depth)
        guard count <= remaining / 2 else {
            throw MsgPackError(
                .lengthExceedsInput, offset: offset,
                detail: "map of \(count) with \(remaining) bytes left")
        }
        var fields = OrderedDictionary<String, ASGIValue>(minimumCapacity: count)
        for _ in 0..<count {
            let keyOffset = offset
            let key: String
            switch try readValue(depth: depth + 1) {
            case .string(let s): key = s
            case .bytes(let b):
                // Python 2 era writers sent keys as bytes; accept them when they are text.
                guard let s = String(validating: b, as: UTF8.self) else {
                    throw MsgPackError(.invalidMapKey, offset: keyOffset, detail: "bin key is not UTF-8")
                }
                key = s
            case let other:
                throw MsgPackError(.invalidMapKey, offset: keyOffset, detail: "\(other.typeName) key")
            }
            fields[key] = try readValue(depth: depth + 1)
        }
        return .map(fields)
    }
}
