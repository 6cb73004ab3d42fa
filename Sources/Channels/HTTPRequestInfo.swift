import ASGI
import Foundation

/// Reading cookies and query parameters out of `http.request` / `websocket.connect` messages.
public enum HTTPRequestInfo {
    /// The request's cookies (the first value of each name wins, as browsers send the most specific first).
    public static func cookies(in message: Message) -> [String: String] {
        var result: [String: String] = [:]
        for header in message["headers"]?.arrayValue ?? [] {
            guard let pair = header.arrayValue, pair.count == 2,
                  let name = pair[0].bytesValue ?? pair[0].stringValue.map({ Array($0.utf8) }),
                  String(decoding: name, as: UTF8.self).lowercased() == "cookie",
                  let value = pair[1].bytesValue ?? pair[1].stringValue.map({ Array($0.utf8) }) else { continue }
            for part in String(decoding: value, as: UTF8.self).split(separator: ";") {
                let item = part.trimmingCharacters(in: .whitespaces)
                guard let eq = item.firstIndex(of: "=") else { continue }
                let name = String(item[..<eq])
                var value = String(item[item.index(after: eq)...])
                if value.hasPrefix("\""), value.hasSuffix("\""), value.count >= 2 { value = String(value.dropFirst().dropLast()) }
                if result[name] == nil { result[name] = value }
            }
        }
        return result
    }

    /// One parameter of the raw query string, percent-decoded.
    public static func queryParameter(_ name: String, in message: Message) -> String? {
        let raw = message["query_string"]?.bytesValue.map { String(decoding: $0, as: UTF8.self) }
            ?? message["query_string"]?.stringValue ?? ""
        for part in raw.split(separator: "&") {
            let pieces = part.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let key = String(pieces[0]).replacingOccurrences(of: "+", with: " ").removingPercentEncoding
            if key == name {
                let value = pieces.count > 1 ? String(pieces[1]) : ""
                return value.replacingOccurrences(of: "+", with: " ").removingPercentEncoding ?? value
            }
        }
        return nil
    }

    /// The value of a form field of an `application/x-www-form-urlencoded` body.
    public static func formFields(_ body: [UInt8]) -> [String: String] {
        var result: [String: String] = [:]
        for part in String(decoding: body, as: UTF8.self).split(separator: "&") {
            let pieces = part.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let key = String(pieces[0]).replacingOccurrences(of: "+", with: " ").removingPercentEncoding ?? String(pieces[0])
            let value = pieces.count > 1 ? String(pieces[1]) : ""
            result[key] = value.replacingOccurrences(of: "+", with: " ").removingPercentEncoding ?? value
        }
        return result
    }
}
