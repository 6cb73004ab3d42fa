/// The one place secrets are taken out of text before it is printed: start-up lines, errors,
/// log lines and access logs all pass URLs and request targets through here.
public enum Redaction {
    /// Query parameters whose values are secrets: passwords, encryption keys, tokens, session keys.
    public static let secretParameters: Set<String> = [
        "password", "sentinel_password", "symmetric_encryption_keys", "token", "admin_token", "session_key",
        "access_token", "csrfmiddlewaretoken",
    ]

    /// `text` (one URL, a comma-separated list of them, or a request target) with every
    /// password after `user:` in a `scheme://user:password@host` authority and every value of a
    /// ``secretParameters`` query parameter replaced by `***`.
    public static func redact(_ text: String) -> String {
        // Most text has nothing to take out: one pass over its bytes says so.
        guard
            text.utf8.contains(where: {
                $0 == UInt8(ascii: "?") || $0 == UInt8(ascii: "&") || $0 == UInt8(ascii: ";") || $0 == UInt8(ascii: "@")
            })
        else { return text }
        var out = Substring("")
        var rest = Substring(text)
        while !rest.isEmpty {
            // Credentials: "://" then "user:password@" before the next "/", "?" or ",".
            if rest.hasPrefix("://") {
                out += "://"
                rest = rest.dropFirst(3)
                let authorityEnd = rest.firstIndex { $0 == "/" || $0 == "?" || $0 == "," || $0 == " " } ?? rest.endIndex
                if let at = rest[..<authorityEnd].lastIndex(of: "@"), let colon = rest[..<at].firstIndex(of: ":") {
                    out += rest[...colon]
                    out += "***"
                    rest = rest[at...]
                }
                continue
            }
            // A parameter: at the start of a query or after "&" / ";".
            if let first = rest.first, first == "?" || first == "&" || first == ";" {
                out.append(first)
                rest = rest.dropFirst()
                if let equals = rest.firstIndex(of: "="), !rest[..<equals].contains(where: { "&?/ ,".contains($0) }) {
                    let name = rest[..<equals].lowercased()
                    if secretParameters.contains(name) {
                        out += rest[...equals]
                        out += "***"
                        rest = rest[rest.index(after: equals)...]
                        rest = rest[valueEnd(rest)...]
                    }
                }
                continue
            }
            out.append(rest.removeFirst())
        }
        return String(out)
    }

    /// Where a secret value ends: at `&`, a space or quote, or a comma that starts another URL.
    private static func valueEnd(_ value: Substring) -> Substring.Index {
        var index = value.startIndex
        while index < value.endIndex {
            let character = value[index]
            if character == "&" || character == " " || character == "'" || character == "\"" || character == ";" { return index }
            if character == "," {
                let after = value[value.index(after: index)...]
                if let scheme = after.firstRange(of: "://"),
                    after[..<scheme.lowerBound].allSatisfy({ $0.isLetter || $0 == "+" })
                {
                    return index
                }
            }
            index = value.index(after: index)
        }
        return index
    }
}
