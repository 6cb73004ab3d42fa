import ASGI

/// Reading cookies and query parameters out of `http.request` / `websocket.connect` messages.
public enum HTTPRequestInfo {
    /// The request's cookies (the first value of each name wins, as browsers send the most specific first).
    /// A message whose headers cannot be read has none.
    public static func cookies(in message: Message) -> [String: String] {
        guard let value = message.optional("headers"), let headers = try? ASGIHeaders(value) else { return [:] }
        return headers.cookies
    }

    /// One parameter of the raw query string, percent-decoded.
    public static func queryParameter(_ name: String, in message: Message) -> String? {
        let raw = message["query_string"]?.bytesValue ?? message["query_string"]?.stringValue.map { Array($0.utf8) } ?? []
        return PercentCoding.parameter(name, in: raw)
    }

    /// The fields of an `application/x-www-form-urlencoded` body (the last of a repeated name wins).
    public static func formFields(_ body: [UInt8]) -> [String: String] {
        var result: [String: String] = [:]
        for (name, value) in PercentCoding.parameters(body) { result[name] = value }
        return result
    }
}
