import ASGI
import Foundation

/// An HTTP request as an ``HTTPConsumer`` sees it.
public struct HTTPRequest: Sendable {
    public let context: ConsumerContext
    public let method: String
    public let path: String
    public let queryString: String
    /// Header names lower-cased, in order, duplicates kept.
    public let headers: ASGIHeaders
    /// The whole body (chunks on a body channel joined).
    public let body: [UInt8]
    /// The `http.request` message as received (its first body chunk only).
    public let request: HTTPRequestMessage

    public var kwargs: [String: String] { context.kwargs }
    public var user: User { context.user }
    public var cookies: [String: String] { headers.cookies }
    public func header(_ name: String) -> String? { headers.first(name) }
    public func query(_ name: String) -> String? { request.query(name) }
    public var form: [String: String] { HTTPRequestInfo.formFields(body) }

    static func from(_ context: ConsumerContext) async throws -> HTTPRequest {
        let request = try HTTPRequestMessage(context.message)
        return HTTPRequest(
            context: context, method: request.method, path: request.path,
            queryString: String(decoding: request.queryString, as: UTF8.self),
            headers: request.headers, body: try await context.requestBody(), request: request)
    }
}

/// A whole HTTP response.
public struct HTTPResponse: Sendable {
    public var status: Int
    public var headers: [(String, String)]
    public var body: [UInt8]
    public var contentType: String

    public init(
        status: Int = 200, contentType: String = "text/plain; charset=utf-8", headers: [(String, String)] = [],
        body: [UInt8]
    ) {
        self.status = status
        self.contentType = contentType
        self.headers = headers
        self.body = body
    }

    public init(
        status: Int = 200, contentType: String = "text/plain; charset=utf-8", headers: [(String, String)] = [],
        _ text: String
    ) {
        self.init(status: status, contentType: contentType, headers: headers, body: Array(text.utf8))
    }

    public static func json<T: Encodable>(_ value: T, status: Int = 200) throws -> HTTPResponse {
        HTTPResponse(status: status, contentType: "application/json", body: Array(try JSONEncoder.channels.encode(value)))
    }
}

/// An HTTP consumer type: request in, response out. Return nil when the consumer answered
/// itself (a streamed response through `request.context.respondStart` / `respondChunk`).
public protocol HTTPConsumer: Sendable {
    init()
    /// Wrap in `httpSessionUser` so `request.user` and `context.httpSession` work.
    static var httpUser: Bool { get }
    func handle(_ request: HTTPRequest) async throws -> HTTPResponse?
}

extension HTTPConsumer {
    public static var httpUser: Bool { false }
}

/// Routes an HTTP consumer type on `http.request`.
public func route<C: HTTPConsumer>(
    _ type: C.Type, path: String? = nil, method: String? = nil,
    filters: [String: String] = [:], name: String? = nil
) -> RoutingEntry {
    var consumer: Consumer = { context in
        let request = try await HTTPRequest.from(context)
        if let response = try await C().handle(request) {
            try await context.respond(
                status: response.status, contentType: response.contentType,
                headers: response.headers, body: response.body)
        }
    }
    if C.httpUser { consumer = httpSessionUser(consumer) }
    return route(ASGIChannel.httpRequest, path: path, method: method, filters: filters, name: name ?? "\(C.self)", consumer)
}
