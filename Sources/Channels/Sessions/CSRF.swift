import ASGI
import Foundation
import Logging

/// Cross-site request forgery protection, Django's `CsrfViewMiddleware` in a wrapper.
///
/// Unsafe methods (POST, PUT, PATCH, DELETE) must carry a token (the `X-CSRFToken` header or
/// the `csrfmiddlewaretoken` form field) that equals the `csrftoken` cookie and was made for
/// the request's HTTP session with the deployment's secret; an `Origin` header, when there is
/// one, must name an allowed host (and over TLS, without `Origin`, so must the `Referer`).
/// Otherwise the answer is 403 and the consumer does not run. Safe methods pass; a page gets a
/// token with ``ConsumerContext/csrfToken()``.
///
/// The wrapper includes `httpSession`. `allowedHosts` are the hosts pages may come from (the
/// request's own `Host` is always one).
public func csrfProtect(allowedHosts: [String] = [], _ consumer: @escaping Consumer) -> Consumer {
    let hosts = AllowedHosts(allowedHosts)
    return httpSession { context in
        let method = context.message["method"]?.stringValue?.uppercased() ?? "GET"
        guard ["POST", "PUT", "PATCH", "DELETE"].contains(method) else { return try await consumer(context) }
        if let reason = context.csrfFailure(hosts: hosts) {
            context.logger.info("CSRF check failed", metadata: ["reason": "\(reason)"])
            let body = (try? JSONSerialization.data(withJSONObject: ["error": "CSRF check failed: \(reason)"])) ?? Data("{}".utf8)
            return try await context.respond(status: 403, contentType: "application/json", body: Array(body))
        }
        try await consumer(context)
    }
}

/// Names of the CSRF cookie, header and form field (Django's).
public enum CSRF {
    /// The cookie that carries the token.
    public static let cookieName = "csrftoken"
    /// The header a script sends the token in (Django's `X-CSRFToken`).
    public static let headerName = "x-csrftoken"
    /// The form field a form sends the token in.
    public static let formField = "csrfmiddlewaretoken"
}

extension ConsumerContext {
    /// A CSRF token for this request's HTTP session (also set as the `csrftoken` cookie): a
    /// random nonce and its HMAC with the session key, so a token is worthless with another
    /// session. Needs `httpSession`; a login or logout changes the session, so answer them
    /// with a fresh token.
    public func csrfToken() -> String {
        let nonce = RandomToken.string(16, from: RandomToken.alphanumerics)
        let token = nonce + csrfSignature(nonce: nonce)
        setCookie(
            cookieHeader(name: CSRF.cookieName, value: token, maxAge: 365 * 24 * 3600, httpOnly: false),
            name: CSRF.cookieName)
        return token
    }

    private func csrfSignature(nonce: String) -> String {
        let sessionKey = loadedHTTPSession?.key ?? ""
        return environment.sessionConfiguration.secret.hex("csrf", nonce + ":" + sessionKey, length: 32)
    }

    /// Why this unsafe request fails the CSRF check, or nil when it passes.
    func csrfFailure(hosts: AllowedHosts) -> String? {
        let headers = message["headers"]?.arrayValue ?? []
        func header(_ name: String) -> String? {
            for pair in headers {
                guard let items = pair.arrayValue, items.count == 2,
                    let key = items[0].bytesValue.map({ String(decoding: $0, as: UTF8.self) }) ?? items[0].stringValue,
                    key.lowercased() == name
                else { continue }
                return items[1].bytesValue.map { String(decoding: $0, as: UTF8.self) } ?? items[1].stringValue
            }
            return nil
        }
        let requestHost = header("host").flatMap(AllowedHosts.hostName(fromHeader:))
        let pageHosts = AllowedHosts(hosts.patterns + (requestHost.map { [$0] } ?? []))
        if let origin = header("origin") {
            guard pageHosts.allows(origin: origin) else { return "origin \(origin.prefix(100)) is not allowed" }
            // A secure request from an insecure page is a page an attacker on the network may have written.
            if isSecureRequest && !origin.lowercased().hasPrefix("https://") { return "an http:// origin on an HTTPS request" }
        } else if isSecureRequest {
            guard let referer = header("referer"), let schemeEnd = referer.firstRange(of: "://") else { return "no Referer over HTTPS" }
            guard referer.lowercased().hasPrefix("https://") else { return "an http:// Referer on an HTTPS request" }
            let authority = referer[schemeEnd.upperBound...].prefix { $0 != "/" && $0 != "?" }
            guard pageHosts.allows(host: String(authority)) else { return "Referer is another site" }
        }
        guard let cookie = HTTPRequestInfo.cookies(in: message)[CSRF.cookieName], cookie.count == 48 else {
            return "no CSRF cookie"
        }
        var presented = header(CSRF.headerName)
        if presented == nil, (message["body"]?.bytesValue?.count ?? 0) > 0 {
            presented = HTTPRequestInfo.formFields(message["body"]?.bytesValue ?? [])[CSRF.formField]
        }
        guard let presented, DeploymentSecret.constantTimeEquals(Array(presented.utf8), Array(cookie.utf8)) else {
            return "CSRF token missing or incorrect"
        }
        let nonce = String(cookie.prefix(16))
        guard DeploymentSecret.constantTimeEquals(Array(cookie.dropFirst(16).utf8), Array(csrfSignature(nonce: nonce).utf8)) else {
            return "CSRF token not made for this session"
        }
        return nil
    }
}

/// Channels' `OriginValidator` for one route: a WebSocket connect whose `Origin` is not one of
/// `origins` (exact origins like `https://partner.example`, host patterns like `.example.com`,
/// or `*`) is refused with 403 before `consumer` runs. A connect without `Origin` (not a
/// browser) is refused too unless `allowMissing`.
public func originValidator(_ origins: [String], allowMissing: Bool = false, _ consumer: @escaping Consumer) -> Consumer {
    let exact = origins.filter { $0.contains("://") || $0 == "*" }
    let allowed = AllowedHosts(origins.filter { !$0.contains("://") && $0 != "*" }, origins: exact)
    return { context in
        var origin: String?
        for pair in context.message["headers"]?.arrayValue ?? [] {
            guard let items = pair.arrayValue, items.count == 2,
                let key = items[0].bytesValue.map({ String(decoding: $0, as: UTF8.self) }) ?? items[0].stringValue,
                key.lowercased() == "origin"
            else { continue }
            origin = items[1].bytesValue.map { String(decoding: $0, as: UTF8.self) } ?? items[1].stringValue
        }
        let ok = origin.map { allowed.allows(origin: $0) } ?? allowMissing
        guard ok else {
            context.logger.info("origin refused by the route", metadata: ["origin": "\(origin?.prefix(100) ?? "none")"])
            throw ConsumerError.denyConnection
        }
        try await consumer(context)
    }
}
