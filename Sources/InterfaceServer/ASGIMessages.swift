import Foundation
import ASGI
import NIOCore
import NIOHTTP1

/// Builds the ASGI 1.0 messages of SPEC.md §3 from NIO's request types.
enum ASGIMessages {
    /// Header names lowercased, as bytes; order and duplicates kept. Names with `_` are
    /// dropped, as Daphne does, so `X_Forwarded_For` cannot pose as `X-Forwarded-For`.
    static func headers(_ headers: HTTPHeaders) -> ASGIValue {
        var list: [ASGIValue] = []
        for (name, value) in headers where !name.contains("_") {
            list.append(.array([.bytes(Array(name.lowercased().utf8)), .bytes(Array(value.utf8))]))
        }
        return .array(list)
    }

    /// `(path, query)` from a request target: the path percent-decoded, the query raw.
    static func splitTarget(_ uri: String) -> (path: String, query: [UInt8]) {
        let utf8 = Array(uri.utf8)
        let queryStart = utf8.firstIndex(of: UInt8(ascii: "?"))
        let rawPath = Array(utf8[..<(queryStart ?? utf8.count)])
        let query = queryStart.map { Array(utf8[($0 + 1)...]) } ?? []
        return (percentDecode(rawPath), query)
    }

    static func percentDecode(_ bytes: [UInt8]) -> String {
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count)
        var i = 0
        while i < bytes.count {
            if bytes[i] == UInt8(ascii: "%"), i + 2 < bytes.count,
               let high = hexValue(bytes[i + 1]), let low = hexValue(bytes[i + 2]) {
                out.append(high << 4 | low)
                i += 3
            } else {
                out.append(bytes[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    private static func hexValue(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): c - UInt8(ascii: "A") + 10
        default: nil
        }
    }

    static func address(_ address: SocketAddress?) -> ASGIValue {
        guard let address, let ip = address.ipAddress, let port = address.port else { return .null }
        return [.string(ip), .int(Int64(port))]
    }

    /// Client address and scheme, honouring proxy headers when configured.
    static func client(head: HTTPRequestHead, remote: SocketAddress?, proxyHeaders: Bool) -> (client: ASGIValue, secure: Bool) {
        var client = address(remote)
        var secure = false
        if proxyHeaders {
            if let forwarded = head.headers.first(name: "x-forwarded-for")?.split(separator: ",").first {
                let host = forwarded.trimmingCharacters(in: .whitespaces)
                let port = head.headers.first(name: "x-forwarded-port").flatMap { Int64($0) } ?? 0
                client = [.string(host), .int(port)]
            }
            secure = head.headers.first(name: "x-forwarded-proto")?.lowercased() == "https"
        }
        return (client, secure)
    }

    /// "host:port" of the client for access logs (the forwarded one behind a trusted proxy).
    static func clientDescription(head: HTTPRequestHead, remote: SocketAddress?, proxyHeaders: Bool) -> String {
        let (client, _) = self.client(head: head, remote: remote, proxyHeaders: proxyHeaders)
        guard let pair = client.arrayValue, pair.count == 2, let host = pair[0].stringValue else { return "-" }
        return "\(host):\(pair[1].intValue ?? 0)"
    }

    static func version(_ version: HTTPVersion) -> String {
        switch (version.major, version.minor) {
        case (1, 0): "1.0"
        case (2, _): "2"
        default: "1.1"
        }
    }

    /// Response headers from a reply's `headers` (pairs of bytes or strings); bad entries skipped.
    static func responseHeaders(_ value: ASGIValue?) -> HTTPHeaders {
        var headers = HTTPHeaders()
        guard case .array(let pairs)? = value else { return headers }
        for pair in pairs {
            guard case .array(let items) = pair, items.count == 2,
                  let name = text(items[0]), let value = text(items[1]) else { continue }
            headers.add(name: name, value: value)
        }
        return headers
    }

    static func text(_ value: ASGIValue) -> String? {
        switch value {
        case .string(let s): s
        case .bytes(let b): String(decoding: b, as: UTF8.self)
        default: nil
        }
    }
}
