import ASGI
import Foundation

/// An HTTP request as an ``HTTPConsumer`` sees it.
public struct HTTPRequest: Sendable {
    /// The message context: route arguments, sessions, sending.
    public let context: ConsumerContext
    /// The request method, upper-case (`GET`, `POST`, ...).
    public let method: String
    /// The request path, percent-decoded.
    public let path: String
    /// The raw query string, without the `?`.
    public let queryString: String
    /// Header names lower-cased, in order, duplicates kept.
    public let headers: ASGIHeaders
    /// The whole body (chunks on a body channel joined).
    public let body: [UInt8]
    /// The `http.request` message as received (its first body chunk only).
    public let request: HTTPRequestMessage

    /// Arguments captured by the route's named groups (`(?P<room>…)` gives `parameters["room"]`).
    public var parameters: [String: String] { context.parameters }
    /// Django's name for ``parameters``.
    @available(*, deprecated, renamed: "parameters")
    public var kwargs: [String: String] { parameters }
    /// The logged-in user (anonymous unless the consumer type sets `httpUser`).
    public var user: User { context.user }
    /// The request's cookies by name.
    public var cookies: [String: String] { headers.cookies }
    /// The first value of a header (names are case-insensitive).
    public func header(_ name: String) -> String? { headers.first(name) }
    /// The first value of a query parameter, percent-decoded.
    public func query(_ name: String) -> String? { request.query(name) }
    /// The body as `application/x-www-form-urlencoded` fields.
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
    /// The status code.
    public var status: Int
    /// Headers to send besides `content-type`.
    public var headers: [(String, String)]
    /// The body bytes.
    public var body: [UInt8]
    /// The `content-type` header's value.
    public var contentType: String

    /// A response with a body of bytes.
    public init(
        status: Int = 200, contentType: String = "text/plain; charset=utf-8", headers: [(String, String)] = [],
        body: [UInt8]
    ) {
        self.status = status
        self.contentType = contentType
        self.headers = headers
        self.body = body
    }

    /// A response with a text body, encoded as UTF-8.
    public init(
        status: Int = 200, contentType: String = "text/plain; charset=utf-8", headers: [(String, String)] = [],
        _ text: String
    ) {
        self.init(status: status, contentType: contentType, headers: headers, body: Array(text.utf8))
    }

    /// A JSON response: `value` encoded with the framework's JSON encoder.
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
    /// Default: no HTTP session or user.
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
