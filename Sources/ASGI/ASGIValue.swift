import OrderedCollections

/// One value inside an ASGI message.
///
/// ASGI messages are maps whose values are drawn from a small set of types. Strings and
/// bytes are different types and stay different through encoding, storage and decoding:
/// a header name sent as bytes is received as bytes.
public enum ASGIValue: Sendable, Hashable {
    case null
    case bool(Bool)
    case int(Int64)
    case double(Double)
    case string(String)
    case bytes([UInt8])
    case array([ASGIValue])
    case map(OrderedDictionary<String, ASGIValue>)

    /// A short name of the case, used in error messages.
    public var typeName: String {
        switch self {
        case .null: "nil"
        case .bool: "bool"
        case .int: "int"
        case .double: "double"
        case .string: "string"
        case .bytes: "bytes"
        case .array: "array"
        case .map: "map"
        }
    }

    /// True for null.
    public var isNull: Bool { if case .null = self { true } else { false } }

    /// The string, if this is one.
    public var stringValue: String? { if case .string(let s) = self { s } else { nil } }
    /// The bytes, if this is a byte string.
    public var bytesValue: [UInt8]? { if case .bytes(let b) = self { b } else { nil } }
    /// The integer, if this is one.
    public var intValue: Int64? { if case .int(let i) = self { i } else { nil } }
    /// The boolean, if this is one.
    public var boolValue: Bool? { if case .bool(let b) = self { b } else { nil } }
    /// The array, if this is one.
    public var arrayValue: [ASGIValue]? { if case .array(let a) = self { a } else { nil } }
    /// The map, if this is one.
    public var mapValue: OrderedDictionary<String, ASGIValue>? { if case .map(let m) = self { m } else { nil } }
    /// The number as a double, for a float or an integer.
    public var doubleValue: Double? {
        switch self {
        case .double(let d): d
        case .int(let i): Double(i)
        default: nil
        }
    }

    /// Convenience: bytes built from the UTF-8 of a string.
    public static func utf8Bytes(_ string: String) -> ASGIValue { .bytes(Array(string.utf8)) }
}

extension ASGIValue: ExpressibleByNilLiteral {
    /// `nil` as null.
    public init(nilLiteral: ()) { self = .null }
}

extension ASGIValue: ExpressibleByBooleanLiteral {
    /// A boolean literal.
    public init(booleanLiteral value: Bool) { self = .bool(value) }
}

extension ASGIValue: ExpressibleByIntegerLiteral {
    /// An integer literal.
    public init(integerLiteral value: Int64) { self = .int(value) }
}

extension ASGIValue: ExpressibleByFloatLiteral {
    /// A float literal.
    public init(floatLiteral value: Double) { self = .double(value) }
}

extension ASGIValue: ExpressibleByStringLiteral {
    /// A string literal (text, not bytes).
    public init(stringLiteral value: String) { self = .string(value) }
}

extension ASGIValue: ExpressibleByArrayLiteral {
    /// An array literal.
    public init(arrayLiteral elements: ASGIValue...) { self = .array(elements) }
}

extension ASGIValue: ExpressibleByDictionaryLiteral {
    /// A dictionary literal as a map, keys in the order written.
    public init(dictionaryLiteral elements: (String, ASGIValue)...) {
        self = .map(OrderedDictionary(elements, uniquingKeysWith: { _, last in last }))
    }
}

extension ASGIValue: CustomStringConvertible {
    /// The value in a Python-like notation, for logs (`b'...'` for bytes).
    public var description: String {
        switch self {
        case .null: return "nil"
        case .bool(let b): return b ? "true" : "false"
        case .int(let i): return String(i)
        case .double(let d): return String(d)
        case .string(let s): return String(reflecting: s)
        case .bytes(let b):
            return "b\""
                + b.map { byte -> String in
                    if byte >= 0x20 && byte < 0x7f && byte != 0x22 && byte != 0x5c {
                        return String(UnicodeScalar(byte))
                    }
                    return "\\x" + (byte < 16 ? "0" : "") + String(byte, radix: 16)
                }.joined() + "\""
        case .array(let a): return "[" + a.map(\.description).joined(separator: ", ") + "]"
        case .map(let m):
            return "{" + m.map { "\(String(reflecting: $0.key)): \($0.value)" }.joined(separator: ", ") + "}"
        }
    }
}
