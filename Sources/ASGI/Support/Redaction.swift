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
            // Credentials: "://" then "user:password@". A password may hold an unescaped "/",
            // "?" or "@" (people write them), so the credentials end at the last "@" of this
            // URL (up to a space, a quote, or a comma that starts another URL).
            if rest.hasPrefix("://") {
                out += "://"
                rest = rest.dropFirst(3)
                let urlEnd = valueEnd(rest, stopAtAmpersand: false)
                if let at = rest[..<urlEnd].lastIndex(of: "@"), let colon = rest[..<at].firstIndex(of: ":") {
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
                    // Compared decoded: `?to%6Ben=` is `?token=` to the server.
                    let name = PercentCoding.decode(rest[..<equals].utf8, plusAsSpace: true).lowercased()
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

    /// `message` (an error about `url`) with every quoted fragment that is part of the URL's
    /// credentials replaced by `***`: a parser that split a password at a `/` must not quote the pieces.
    public static func scrub(_ message: String, of url: String) -> String {
        guard let schemeEnd = url.firstRange(of: "://") else { return message }
        let rest = url[schemeEnd.upperBound...]
        guard let at = rest.lastIndex(of: "@") else { return message }
        let credentials = rest[..<at]
        var out = ""
        var inside = false
        var fragment = ""
        for character in message {
            if character == "'" {
                if inside { out += !fragment.isEmpty && credentials.contains(fragment) ? "***" : fragment }
                inside.toggle()
                fragment = ""
                out.append(character)
            } else if inside {
                fragment.append(character)
            } else {
                out.append(character)
            }
        }
        return inside ? out + fragment : out
    }

    /// Where a secret value ends: at `&`, a space or quote, or a comma that starts another URL.
    private static func valueEnd(_ value: Substring, stopAtAmpersand: Bool = true) -> Substring.Index {
        var index = value.startIndex
        while index < value.endIndex {
            let character = value[index]
            if (stopAtAmpersand && (character == "&" || character == ";")) || character == " " || character == "'" || character == "\"" {
                return index
            }
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
