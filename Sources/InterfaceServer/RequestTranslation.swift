import ASGI
import Foundation
import NIOCore
import NIOHTTP1

/// NIO's request and response types to and from the typed ASGI messages (SPEC.md §3).
enum RequestTranslation {
    /// Header names lowercased; order and duplicates kept. Names with `_` are dropped, as
    /// Daphne does, so `X_Forwarded_For` cannot pose as `X-Forwarded-For`.
    static func headers(_ headers: HTTPHeaders) -> ASGIHeaders {
        var result = ASGIHeaders()
        for (name, value) in headers where !name.contains("_") {
            result.add(name: name, value: value)
        }
        return result
    }

    static func address(_ address: SocketAddress?) -> ASGIAddress? {
        guard let address, let ip = address.ipAddress, let port = address.port else { return nil }
        return ASGIAddress(host: ip, port: port)
    }

    /// Client address and scheme, honouring proxy headers when configured.
    static func client(head: HTTPRequestHead, remote: SocketAddress?, proxyHeaders: Bool) -> (client: ASGIAddress?, secure: Bool) {
        var client = address(remote)
        var secure = false
        if proxyHeaders {
            if let forwarded = head.headers.first(name: "x-forwarded-for")?.split(separator: ",").first {
                let host = forwarded.trimmingCharacters(in: .whitespaces)
                let port = head.headers.first(name: "x-forwarded-port").flatMap { Int($0) } ?? 0
                client = ASGIAddress(host: host, port: port)
            }
            secure = head.headers.first(name: "x-forwarded-proto")?.lowercased() == "https"
        }
        return (client, secure)
    }

    /// "host:port" of the client for access logs (the forwarded one behind a trusted proxy).
    static func clientDescription(head: HTTPRequestHead, remote: SocketAddress?, proxyHeaders: Bool) -> String {
        client(head: head, remote: remote, proxyHeaders: proxyHeaders).client?.description ?? "-"
    }

    static func version(_ version: HTTPVersion) -> String {
        switch (version.major, version.minor) {
        case (1, 0): "1.0"
        case (2, _): "2"
        default: "1.1"
        }
    }

    /// NIO headers for a response.
    static func responseHeaders(_ headers: ASGIHeaders) -> HTTPHeaders {
        var result = HTTPHeaders()
        for field in headers { result.add(name: field.name, value: field.value) }
        return result
    }
}
