import ASGI
import Foundation
import JWTKit
import Logging

/// Signed tokens (JWT) for clients that have no cookies: mobile apps, other services. Built on
/// vapor's jwt-kit. A token is accepted only when its header's `alg` is one this authenticator
/// has a key for, its signature verifies with that key, and it has not expired (`exp` is
/// required); `alg: none`, a token signed for another algorithm (an RS256 public key used as an
/// HS256 secret) and a tampered payload are refused.
public struct TokenAuthenticator: Sendable {
    /// The claims of a token: `sub` (the user id), `exp`, and optionally `name` (the user name).
    public struct Claims: JWTPayload, Sendable {
        /// The user id.
        public var sub: SubjectClaim
        /// When the token stops being accepted.
        public var exp: ExpirationClaim
        /// The user name shown to people.
        public var name: String?
        /// Who the token is for (checked when the authenticator has an audience).
        public var aud: AudienceClaim?
        /// Who issued it (checked when the authenticator has an issuer).
        public var iss: IssuerClaim?

        /// Claims for `user` until `expires`.
        public init(user: User, expires: Date, audience: String? = nil, issuer: String? = nil) {
            sub = SubjectClaim(value: user.id)
            exp = ExpirationClaim(value: expires)
            name = user.username
            aud = audience.map { AudienceClaim(value: [$0]) }
            iss = issuer.map { IssuerClaim(value: $0) }
        }

        /// Refuses an expired token.
        public func verify(using algorithm: some JWTAlgorithm) async throws { try exp.verifyNotExpired() }
    }

    /// A token could not be accepted.
    public struct TokenError: Error, CustomStringConvertible, Sendable {
        /// Why a token was not accepted (or could not be issued).
        public enum Code: Sendable, Hashable {
            /// Only verifying keys are configured: this process cannot issue tokens.
            case noSigningKey
            /// Not a JWT (three base64url parts with a JSON header naming its `alg`).
            case malformed
            /// Its `alg` is one no key here verifies (`none`, or an algorithm not configured).
            case algorithmNotAccepted
            /// The signature does not verify, or it has expired.
            case invalid
            /// It was issued for another audience or by another issuer.
            case notForUs
        }

        /// Why.
        public var code: Code
        /// Why, in words.
        public var description: String
    }

    /// Keys by the algorithm they verify: a token is checked only with the key of its own `alg`.
    private let keys: [String: JWTKeyCollection]
    /// The algorithm ``issue(for:lifetime:)`` signs with (HS256 when there is an HMAC key).
    private let signingAlgorithm: String?
    /// When set, a token's `aud` must include it (an identity provider's tokens for another
    /// application of the same provider are refused).
    public let audience: String?
    /// When set, a token's `iss` must be it.
    public let issuer: String?

    /// An authenticator that signs and verifies HS256 tokens with `hmacSecret`, and verifies
    /// RS256 / ES256 tokens with the given PEM public keys (an identity provider's).
    public init(
        hmacSecret: [UInt8]?, rsaPublicKeyPEM: String? = nil, ecdsaPublicKeyPEM: String? = nil, audience: String? = nil,
        issuer: String? = nil
    ) async throws {
        self.audience = audience
        self.issuer = issuer
        var keys: [String: JWTKeyCollection] = [:]
        if let hmacSecret {
            keys["HS256"] = await JWTKeyCollection().add(hmac: HMACKey(from: hmacSecret), digestAlgorithm: .sha256)
        }
        if let rsaPublicKeyPEM {
            keys["RS256"] = await JWTKeyCollection().add(
                rsa: try Insecure.RSA.PublicKey(pem: rsaPublicKeyPEM), digestAlgorithm: .sha256)
        }
        if let ecdsaPublicKeyPEM {
            keys["ES256"] = await JWTKeyCollection().add(ecdsa: try ES256PublicKey(pem: ecdsaPublicKeyPEM))
        }
        self.keys = keys
        self.signingAlgorithm = hmacSecret == nil ? nil : "HS256"
    }

    /// An HS256 authenticator keyed with the deployment's secret (a purpose of its own), so every
    /// process of the deployment issues and accepts the same tokens.
    public init(secret: DeploymentSecret) async throws {
        try await self.init(hmacSecret: secret.mac("jwt-hs256", ""))
    }

    /// A signed token for `user`, valid for `lifetime`.
    public func issue(for user: User, lifetime: Duration = .seconds(3600)) async throws -> String {
        guard let signingAlgorithm, let collection = keys[signingAlgorithm] else {
            throw TokenError(code: .noSigningKey, description: "no signing key: tokens are only verified here")
        }
        let expires = Date().addingTimeInterval(Double(lifetime.components.seconds))
        return try await collection.sign(Claims(user: user, expires: expires, audience: audience, issuer: issuer))
    }

    /// The claims of `token`; throws ``TokenError`` for anything not signed by our keys or expired.
    public func verify(_ token: String) async throws -> Claims {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let headerBytes = Base64URLDecoding.decode(parts[0]),
            let header = try? JSONSerialization.jsonObject(with: Data(headerBytes)) as? [String: Any],
            let alg = header["alg"] as? String
        else { throw TokenError(code: .malformed, description: "not a JWT") }
        guard let collection = keys[alg] else {
            throw TokenError(code: .algorithmNotAccepted, description: "algorithm '\(alg.prefix(20))' is not accepted")
        }
        let claims: Claims
        do {
            claims = try await collection.verify(token, as: Claims.self)
        } catch {
            throw TokenError(code: .invalid, description: "refused: \(error)")
        }
        if let audience, claims.aud?.value.contains(audience) != true {
            throw TokenError(code: .notForUs, description: "refused: not issued for this audience")
        }
        if let issuer, claims.iss?.value != issuer { throw TokenError(code: .notForUs, description: "refused: another issuer") }
        return claims
    }

    /// The token a message carries: `Authorization: Bearer …`, the `token` query parameter, or
    /// an offered WebSocket subprotocol that is a JWT (browsers cannot set headers on a socket).
    public static func token(in message: Message) -> String? {
        for pair in message["headers"]?.arrayValue ?? [] {
            guard let items = pair.arrayValue, items.count == 2,
                let name = items[0].bytesValue ?? items[0].stringValue.map({ Array($0.utf8) }),
                let value = items[1].bytesValue.map({ String(decoding: $0, as: UTF8.self) }) ?? items[1].stringValue
            else { continue }
            switch String(decoding: name, as: UTF8.self).lowercased() {
            case "authorization" where value.hasPrefix("Bearer "):
                return String(value.dropFirst(7)).trimmingCharacters(in: .whitespaces)
            case "sec-websocket-protocol":
                for offered in value.split(separator: ",") {
                    let candidate = offered.trimmingCharacters(in: .whitespaces)
                    if candidate.split(separator: ".", omittingEmptySubsequences: false).count == 3 { return candidate }
                }
            default: continue
            }
        }
        return HTTPRequestInfo.queryParameter("token", in: message)
    }
}

/// Decodes unpadded base64url (a JWT's parts).
enum Base64URLDecoding {
    static func decode(_ text: Substring) -> [UInt8]? {
        var base64 = text.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        while base64.count % 4 != 0 { base64 += "=" }
        return Data(base64Encoded: base64).map(Array.init)
    }
}

/// `tokenUser`: sets `context.user` from a signed token the message carries (see
/// ``TokenAuthenticator/token(in:)``), loaded through the environment's users when there are
/// any. Without a valid token the user is anonymous; with `required`, the consumer does not run
/// (an HTTP request gets 401, a WebSocket connect is refused with 403).
public func tokenUser(required: Bool = false, _ consumer: @escaping Consumer) -> Consumer {
    { context in
        var user = User.anonymous
        if let token = TokenAuthenticator.token(in: context.message), let authenticator = context.environment.tokens {
            do {
                let claims = try await authenticator.verify(token)
                let id = claims.sub.value
                if let users = context.environment.users {
                    user = try await users.user(id: id) ?? .anonymous
                } else {
                    user = User(id: id, username: claims.name ?? id)
                }
            } catch {
                context.logger.info("token refused", metadata: ["reason": "\(error)"])
            }
        }
        context.setUser(user)
        if required && user.isAnonymous {
            if context.channel == ASGIChannel.websocketConnect { throw ConsumerError.denyConnection }
            if context.channel == ASGIChannel.httpRequest {
                return try await context.respond(
                    status: 401, contentType: "application/json", headers: [("WWW-Authenticate", "Bearer")],
                    "{\"error\": \"a valid token is needed\"}")
            }
            return
        }
        try await consumer(context)
    }
}
