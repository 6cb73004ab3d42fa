import OrderedCollections

/// An ASGI message: a map with string keys, kept in insertion order so that encoding it
/// gives the same bytes as Python's `msgpack.packb` of the same dict.
public struct Message: Sendable, Hashable {
    /// The message's fields, in insertion order (the order msgpack writes them).
    public var fields: OrderedDictionary<String, ASGIValue>

    /// The message's keys, sorted: what a log line may say of a message whose values may be
    /// secrets (cookies, tokens, bodies).
    public var fieldNames: [String] { fields.keys.sorted() }

    /// A message with these fields.
    public init(_ fields: OrderedDictionary<String, ASGIValue> = [:]) {
        self.fields = fields
    }

    /// A field by key; setting nil removes it.
    public subscript(key: String) -> ASGIValue? {
        get { fields[key] }
        set { fields[key] = newValue }
    }

    /// The field names, in order.
    public var keys: OrderedSet<String> { fields.keys }
    /// True when the message has no fields.
    public var isEmpty: Bool { fields.isEmpty }
    /// The number of fields.
    public var count: Int { fields.count }

    /// Removes a key and returns its value.
    @discardableResult
    public mutating func removeValue(forKey key: String) -> ASGIValue? {
        fields.removeValue(forKey: key)
    }

    // MARK: Typed accessors

    private func required(_ key: String) throws(MessageError) -> ASGIValue {
        guard let value = fields[key] else { throw MessageError(.missingKey, key: key) }
        return value
    }

    /// The value at `key` as `extract` reads it; throws when it is missing or of another type.
    private func typed<T>(_ key: String, _ expected: String, _ extract: (ASGIValue) -> T?) throws(MessageError) -> T {
        let value = try required(key)
        guard let typed = extract(value) else { throw mismatch(key, expected, value) }
        return typed
    }

    private func mismatch(_ key: String, _ expected: String, _ value: ASGIValue) -> MessageError {
        MessageError(.wrongType, key: key, detail: "expected \(expected), found \(value.typeName)")
    }

    /// The string at `key`; throws when it is missing or not a string.
    public func string(_ key: String) throws(MessageError) -> String {
        try typed(key, "string", \.stringValue)
    }

    /// The bytes at `key`; throws when it is missing or not bytes.
    public func bytes(_ key: String) throws(MessageError) -> [UInt8] {
        try typed(key, "bytes", \.bytesValue)
    }

    /// The integer at `key`; throws when it is missing or not an integer.
    public func int(_ key: String) throws(MessageError) -> Int64 {
        try typed(key, "int", \.intValue)
    }

    /// The boolean at `key`; throws when it is missing or not a boolean.
    public func bool(_ key: String) throws(MessageError) -> Bool {
        try typed(key, "bool", \.boolValue)
    }

    /// The number at `key` (an int is widened); throws when it is missing or not a number.
    public func double(_ key: String) throws(MessageError) -> Double {
        try typed(key, "double", \.doubleValue)
    }

    /// The array at `key`; throws when it is missing or not an array.
    public func array(_ key: String) throws(MessageError) -> [ASGIValue] {
        try typed(key, "array", \.arrayValue)
    }

    /// The map at `key`; throws when it is missing or not a map.
    public func map(_ key: String) throws(MessageError) -> OrderedDictionary<String, ASGIValue> {
        try typed(key, "map", \.mapValue)
    }

    /// The value at `key` unless it is missing or nil.
    public func optional(_ key: String) -> ASGIValue? {
        guard let value = fields[key], !value.isNull else { return nil }
        return value
    }

    /// The string at `key`, nil when absent or nil; throws when present with another type.
    public func optionalString(_ key: String) throws(MessageError) -> String? {
        guard let value = optional(key) else { return nil }
        guard let s = value.stringValue else { throw mismatch(key, "string", value) }
        return s
    }

    /// The bytes at `key`, nil when absent or nil; throws when present with another type.
    public func optionalBytes(_ key: String) throws(MessageError) -> [UInt8]? {
        guard let value = optional(key) else { return nil }
        guard let b = value.bytesValue else { throw mismatch(key, "bytes", value) }
        return b
    }

    /// The boolean at `key`, `defaultValue` when absent or nil; throws when present with another type.
    public func bool(_ key: String, default defaultValue: Bool) throws(MessageError) -> Bool {
        guard let value = optional(key) else { return defaultValue }
        guard let b = value.boolValue else { throw mismatch(key, "bool", value) }
        return b
    }
}

extension Message: ExpressibleByDictionaryLiteral {
    /// A message written as a dictionary literal: `["text": "hi"]`.
    public init(dictionaryLiteral elements: (String, ASGIValue)...) {
        self.init(OrderedDictionary(elements, uniquingKeysWith: { _, last in last }))
    }
}

extension Message: CustomStringConvertible {
    /// The fields, as a map value prints them.
    public var description: String { ASGIValue.map(fields).description }
}

/// A message lacked a key or held a value of the wrong type.
public struct MessageError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What is wrong with a message.
    public enum Code: Sendable, Hashable {
        case missingKey
        case wrongType
        /// Present with the right type but a value the protocol does not allow.
        case invalidValue
    }

    /// What is wrong.
    public var code: Code
    /// The key it is wrong about.
    public var key: String
    /// More detail, for logs.
    public var detail: String

    /// An error about `key`.
    public init(_ code: Code, key: String, detail: String = "") {
        self.code = code
        self.key = key
        self.detail = detail
    }

    /// The code, the key and the detail.
    public var description: String {
        switch code {
        case .missingKey: detail.isEmpty ? "message has no key '\(key)'" : "message has no key '\(key)': \(detail)"
        case .wrongType, .invalidValue: "message key '\(key)': \(detail)"
        }
    }
}

extension Message {
    /// The field that marks a message sent again after the layer's connection was lost with an
    /// earlier send of it in flight (`true`). That send may have been stored before its reply was
    /// lost (a Redis SIGKILLed between writing its append-only file and answering, a proxy that
    /// cut the connection), so the layer may hold the message twice: the first copy without the
    /// mark, this one with it. An ordering gate (`enforceOrdering`, `inSendOrder`) gives the
    /// first copy time to finish its turn before this one runs, and then drops this one as late.
    public static let resentField = "__resent"

    /// Whether this message carries ``resentField``.
    public var isResent: Bool { fields[Self.resentField]?.boolValue == true }

    /// This message with ``resentField`` set: what a sender sends when it tries again after
    /// its connection to the layer was lost with the send in flight.
    public func markedResent() -> Message {
        var marked = self
        marked.fields[Self.resentField] = .bool(true)
        return marked
    }
}
