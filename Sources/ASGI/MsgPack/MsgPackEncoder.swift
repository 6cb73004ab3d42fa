import OrderedCollections

/// Writes msgpack exactly as Python's `msgpack.packb(value, use_bin_type=True)` does:
/// the smallest integer form (unsigned forms for non-negative values), float64 for
/// doubles, the str family for strings and the bin family for bytes.
public enum MsgPackEncoder {
    /// Encodes a message (a map) to msgpack bytes.
    public static func encode(_ message: Message) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(64)
        writeMap(message.fields, into: &out)
        return out
    }

    /// Encodes any value to msgpack bytes.
    public static func encode(_ value: ASGIValue) -> [UInt8] {
        var out: [UInt8] = []
        write(value, into: &out)
        return out
    }

    /// Appends the encoding of `value` to `out`.
    public static func write(_ value: ASGIValue, into out: inout [UInt8]) {
        switch value {
        case .null: out.append(0xc0)
        case .bool(let b): out.append(b ? 0xc3 : 0xc2)
        case .int(let i): writeInt(i, into: &out)
        case .double(let d):
            out.append(0xcb)
            appendBigEndian(d.bitPattern, into: &out)
        case .string(let s): writeString(s, into: &out)
        case .bytes(let b):
            writeHeader(count: b.count, small: nil, family: (0xc4, 0xc5, 0xc6), into: &out)
            out.append(contentsOf: b)
        case .array(let a):
            writeHeader(count: a.count, small: (0x90, 15), family: (nil, 0xdc, 0xdd), into: &out)
            for element in a { write(element, into: &out) }
        case .map(let m): writeMap(m, into: &out)
        }
    }

    /// Appends a map: the header, then each key and value.
    public static func writeMap(_ map: OrderedDictionary<String, ASGIValue>, into out: inout [UInt8]) {
        writeMapHeader(count: map.count, into: &out)
        for (key, value) in map {
            writeString(key, into: &out)
            write(value, into: &out)
        }
    }

    /// Appends a map header for `count` pairs.
    public static func writeMapHeader(count: Int, into out: inout [UInt8]) {
        writeHeader(count: count, small: (0x80, 15), family: (nil, 0xde, 0xdf), into: &out)
    }

    /// Appends a string as msgpack `str`.
    public static func writeString(_ s: String, into out: inout [UInt8]) {
        var s = s
        s.withUTF8 { utf8 in
            writeHeader(count: utf8.count, small: (0xa0, 31), family: (0xd9, 0xda, 0xdb), into: &out)
            out.append(contentsOf: utf8)
        }
    }

    static func writeInt(_ i: Int64, into out: inout [UInt8]) {
        if i >= 0 {
            if i <= 0x7f {
                out.append(UInt8(i))
            } else if i <= 0xff {
                out.append(0xcc); out.append(UInt8(i))
            } else if i <= 0xffff {
                out.append(0xcd); appendBigEndian(UInt16(i), into: &out)
            } else if i <= 0xffff_ffff {
                out.append(0xce); appendBigEndian(UInt32(i), into: &out)
            } else {
                out.append(0xcf); appendBigEndian(UInt64(i), into: &out)
            }
        } else {
            if i >= -32 {
                out.append(UInt8(bitPattern: Int8(i)))
            } else if i >= -128 {
                out.append(0xd0); out.append(UInt8(bitPattern: Int8(i)))
            } else if i >= -32768 {
                out.append(0xd1); appendBigEndian(UInt16(bitPattern: Int16(i)), into: &out)
            } else if i >= -2_147_483_648 {
                out.append(0xd2); appendBigEndian(UInt32(bitPattern: Int32(i)), into: &out)
            } else {
                out.append(0xd3); appendBigEndian(UInt64(bitPattern: i), into: &out)
            }
        }
    }

    /// `small` is the fix-form base and its largest count; `family` the 8/16/32-bit markers.
    private static func writeHeader(
        count: Int, small: (UInt8, Int)?, family: (UInt8?, UInt8, UInt8), into out: inout [UInt8]
    ) {
        if let (base, limit) = small, count <= limit {
            out.append(base | UInt8(count))
        } else if let m8 = family.0, count <= 0xff {
            out.append(m8); out.append(UInt8(count))
        } else if count <= 0xffff {
            out.append(family.1); appendBigEndian(UInt16(count), into: &out)
        } else {
            out.append(family.2); appendBigEndian(UInt32(truncatingIfNeeded: count), into: &out)
        }
    }

    @inline(__always)
    static func appendBigEndian<T: FixedWidthInteger>(_ value: T, into out: inout [UInt8]) {
        var v = value.bigEndian
        withUnsafeBytes(of: &v) { out.append(contentsOf: $0) }
    }
}

extension MsgPackEncoder {
    /// The number of bytes `encode` would write, computed without allocating.
    public static func encodedSize(_ message: Message) -> Int {
        var size = headerSize(count: message.count, fixLimit: 15, has8: false)
        for (key, value) in message.fields {
            size += stringSize(key) + encodedSize(value)
        }
        return size
    }

    /// The exact size of `value`'s encoding, without encoding it.
    public static func encodedSize(_ value: ASGIValue) -> Int {
        switch value {
        case .null, .bool: return 1
        case .int(let i):
            if i >= -32 && i <= 0x7f { return 1 }
            if i >= -128 && i <= 0xff { return 2 }
            if i >= -32768 && i <= 0xffff { return 3 }
            if i >= -2_147_483_648 && i <= 0xffff_ffff { return 5 }
            return 9
        case .double: return 9
        case .string(let s): return stringSize(s)
        case .bytes(let b): return headerSize(count: b.count, fixLimit: -1, has8: true) + b.count
        case .array(let a):
            return a.reduce(headerSize(count: a.count, fixLimit: 15, has8: false)) { $0 + encodedSize($1) }
        case .map(let m):
            return m.reduce(headerSize(count: m.count, fixLimit: 15, has8: false)) {
                $0 + stringSize($1.key) + encodedSize($1.value)
            }
        }
    }

    private static func stringSize(_ s: String) -> Int {
        let n = s.utf8.count
        return headerSize(count: n, fixLimit: 31, has8: true) + n
    }

    private static func headerSize(count: Int, fixLimit: Int, has8: Bool) -> Int {
        if count <= fixLimit { return 1 }
        if has8 && count <= 0xff { return 2 }
        if count <= 0xffff { return 3 }
        return 5
    }
}
