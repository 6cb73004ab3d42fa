/// The one percent-decoder and query-string parser: request paths, query strings and
/// `application/x-www-form-urlencoded` bodies all go through it.
public enum PercentCoding {
    /// `%XX` sequences decoded; with `plusAsSpace` (queries and forms), `+` is a space. A `%`
    /// not followed by two hex digits is kept as it is; invalid UTF-8 becomes U+FFFD.
    public static func decode(_ bytes: some Collection<UInt8>, plusAsSpace: Bool = false) -> String {
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count)
        var i = bytes.startIndex
        while i != bytes.endIndex {
            let c = bytes[i]
            if c == UInt8(ascii: "%") {
                let h = bytes.index(after: i)
                if h != bytes.endIndex, let high = Hex.value(of: bytes[h]) {
                    let l = bytes.index(after: h)
                    if l != bytes.endIndex, let low = Hex.value(of: bytes[l]) {
                        out.append(high << 4 | low)
                        i = bytes.index(after: l)
                        continue
                    }
                }
                out.append(c)
            } else if plusAsSpace && c == UInt8(ascii: "+") {
                out.append(UInt8(ascii: " "))
            } else {
                out.append(c)
            }
            i = bytes.index(after: i)
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// `(path, query)` of a request target: the path percent-decoded, the query raw (bytes after `?`).
    public static func splitTarget(_ target: String) -> (path: String, query: [UInt8]) {
        let utf8 = Array(target.utf8)
        guard let q = utf8.firstIndex(of: UInt8(ascii: "?")) else { return (decode(utf8), []) }
        return (decode(utf8[..<q]), Array(utf8[(q + 1)...]))
    }

    /// The `name=value` pairs of a query string or form body, decoded, in order, duplicates kept.
    public static func parameters(_ query: some Collection<UInt8>) -> [(name: String, value: String)] {
        var result: [(name: String, value: String)] = []
        for part in query.split(separator: UInt8(ascii: "&"), omittingEmptySubsequences: true) {
            if let eq = part.firstIndex(of: UInt8(ascii: "=")) {
                result.append((decode(part[..<eq], plusAsSpace: true), decode(part[part.index(after: eq)...], plusAsSpace: true)))
            } else {
                result.append((decode(part, plusAsSpace: true), ""))
            }
        }
        return result
    }

    /// The first value of `name` in a query string, decoded.
    public static func parameter(_ name: String, in query: some Collection<UInt8>) -> String? {
        parameters(query).first { $0.name == name }?.value
    }

}

extension PercentCoding {
    /// `application/x-www-form-urlencoded` text of `fields`: unreserved bytes kept, space as
    /// `+`, everything else `%XX`.
    public static func formEncode(_ fields: [(String, String)]) -> String {
        fields.map { encode($0.0, spaceAsPlus: true) + "=" + encode($0.1, spaceAsPlus: true) }.joined(separator: "&")
    }

    /// `text` with every byte outside `A-Z a-z 0-9 - _ . ~` written as `%XX`.
    public static func encode(_ text: String, spaceAsPlus: Bool = false) -> String {
        var out: [UInt8] = []
        out.reserveCapacity(text.utf8.count)
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                UInt8(ascii: "-"), UInt8(ascii: "_"), UInt8(ascii: "."), UInt8(ascii: "~"):
                out.append(byte)
            case UInt8(ascii: " ") where spaceAsPlus:
                out.append(UInt8(ascii: "+"))
            default:
                out.append(UInt8(ascii: "%"))
                out.append(Hex.uppercaseDigits[Int(byte >> 4)])
                out.append(Hex.uppercaseDigits[Int(byte & 0x0f)])
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}
