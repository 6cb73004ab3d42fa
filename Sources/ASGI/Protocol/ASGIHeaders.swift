/// HTTP headers as ASGI 1.0 carries them: a list of `[name, value]` byte-string pairs, names
/// lower-cased, in the order received, duplicates kept.
///
/// The one codec for headers: the interface server builds them from a request, consumers read
/// them, and responses are written with them. Values are kept as text (UTF-8; a non-UTF-8 byte
/// read from another program becomes U+FFFD) because every producer in this package has text.
public struct ASGIHeaders: Sendable, Hashable, Sequence, ExpressibleByArrayLiteral {
    /// One header line.
    public struct Field: Sendable, Hashable {
        /// The name, lower-cased.
        public var name: String
        /// The value.
        public var value: String

        /// A header line; the name is lower-cased here, once, so every look-up compares as is.
        public init(name: String, value: String) {
            self.name = name.lowercased()
            self.value = value
        }
    }

    /// The headers in order, names lower-cased.
    public private(set) var fields: [Field]

    /// Headers from `(name, value)` pairs, in their order (names lower-cased).
    public init(_ fields: [(String, String)] = []) {
        self.fields = fields.map { Field(name: $0.0, value: $0.1) }
    }

    /// Headers written as a literal: `[("content-type", "text/plain")]`.
    public init(arrayLiteral elements: (String, String)...) {
        self.init(elements)
    }

    /// Appends a header line (the name is lower-cased).
    public mutating func add(name: String, value: String) {
        fields.append(Field(name: name, value: value))
    }

    /// The first value of `name` (any case), or nil.
    public func first(_ name: String) -> String? {
        let wanted = name.lowercased()
        return fields.first { $0.name == wanted }?.value
    }

    /// Every value of `name` (any case), in order.
    public func values(_ name: String) -> [String] {
        let wanted = name.lowercased()
        return fields.filter { $0.name == wanted }.map(\.value)
    }

    /// True when a header of this name (any case) is present.
    public func contains(_ name: String) -> Bool { first(name) != nil }

    /// Number of header lines.
    public var count: Int { fields.count }
    /// True when there are no header lines.
    public var isEmpty: Bool { fields.isEmpty }

    /// Iterates over the header lines in order.
    public func makeIterator() -> IndexingIterator<[Field]> { fields.makeIterator() }

    /// The request's cookies: the first value of each name wins (browsers send the most specific first).
    public var cookies: [String: String] {
        var result: [String: String] = [:]
        for header in values("cookie") {
            for part in header.split(separator: ";") {
                let item = part.trimmingASCIISpaces()
                guard let eq = item.firstIndex(of: "=") else { continue }
                let name = String(item[..<eq])
                var value = item[item.index(after: eq)...]
                if value.count >= 2, value.hasPrefix("\""), value.hasSuffix("\"") { value = value.dropFirst().dropLast() }
                if result[name] == nil { result[name] = String(value) }
            }
        }
        return result
    }

    /// `[[name, value], ...]` with both as bytes, as Daphne sends them.
    public var asgiValue: ASGIValue {
        .array(fields.map { .array([.bytes(Array($0.name.utf8)), .bytes(Array($0.value.utf8))]) })
    }

    /// Reads `[[name, value], ...]`; names and values may be bytes or strings (ASGI 1.0 allows
    /// both in responses). Anything else throws, naming `key`.
    public init(_ value: ASGIValue, key: String = "headers") throws(MessageError) {
        guard case .array(let pairs) = value else {
            throw MessageError(.wrongType, key: key, detail: "expected an array of [name, value] pairs, found \(value.typeName)")
        }
        var fields: [Field] = []
        fields.reserveCapacity(pairs.count)
        for (index, pair) in pairs.enumerated() {
            guard case .array(let items) = pair, items.count == 2,
                let name = Self.text(items[0]), let value = Self.text(items[1])
            else {
                throw MessageError(.invalidValue, key: key, detail: "entry \(index) is not a [name, value] pair of bytes or strings")
            }
            fields.append(Field(name: name, value: value))
        }
        self.fields = fields
    }

    private static func text(_ value: ASGIValue) -> String? {
        switch value {
        case .bytes(let b): String(decoding: b, as: UTF8.self)
        case .string(let s): s
        default: nil
        }
    }
}

extension Substring {
    func trimmingASCIISpaces() -> Substring {
        var s = self
        while let c = s.first, c == " " || c == "\t" { s = s.dropFirst() }
        while let c = s.last, c == " " || c == "\t" { s = s.dropLast() }
        return s
    }
}
