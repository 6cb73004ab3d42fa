import ASGI
import ChannelsTesting
import Crypto
import Foundation
import JWTKit
import Testing
import _CryptoExtras

@testable import Channels

/// Signed tokens, attacked: expired, foreign signatures, `alg: none`, algorithm confusion,
/// tampered payloads; and the three places a client may carry one.
@Suite("tokens", .timeLimit(.minutes(2)))
struct TokenAuthTests {
    static func base64URL(_ bytes: some Sequence<UInt8>) -> String {
        Data(Array(bytes)).base64EncodedString().replacingOccurrences(of: "+", with: "-")
            .replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
    }

    static func json(_ object: [String: Any]) -> String {
        base64URL(try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]))
    }

    /// A token signed by hand: `header.payload.HMAC-SHA256(key, header.payload)`.
    static func hs256(_ payload: [String: Any], key: [UInt8], alg: String = "HS256") -> String {
        let input = json(["alg": alg, "typ": "JWT"]) + "." + json(payload)
        let mac = HMAC<SHA256>.authenticationCode(for: Array(input.utf8), using: SymmetricKey(data: key))
        return input + "." + base64URL(mac)
    }

    let future = Int(Date().timeIntervalSince1970) + 600

    @Test func issuedTokensVerifyAndExpire() async throws {
        let secret = DeploymentSecret(Array("one".utf8))
        let tokens = try await TokenAuthenticator(secret: secret)
        let token = try await tokens.issue(for: User(id: "7", username: "alice"))
        let claims = try await tokens.verify(token)
        #expect(claims.sub.value == "7" && claims.name == "alice")
        // Another deployment's secret does not accept it.
        let foreign = await #expect(throws: TokenAuthenticator.TokenError.self) {
            try await TokenAuthenticator(secret: DeploymentSecret(Array("two".utf8))).verify(token)
        }
        #expect(foreign?.code == .invalid)
        let key = secret.mac("jwt-hs256", "")
        #expect(
            try await tokens.verify(Self.hs256(["sub": "7", "exp": future], key: key)).sub.value == "7", "the hand-made control verifies")
        // Expired, no exp, alg none, tampered, an alg we hold no key for, garbage.
        let expired = Self.hs256(["sub": "7", "exp": Int(Date().timeIntervalSince1970) - 5], key: key)
        let noExpiry = Self.hs256(["sub": "7"], key: key)
        let none = Self.json(["alg": "none", "typ": "JWT"]) + "." + Self.json(["sub": "7", "exp": future]) + "."
        let parts = token.split(separator: ".")
        let tampered = parts[0] + "." + Self.json(["sub": "1", "exp": future, "name": "admin"]) + "." + parts[2]
        let hs512 = Self.hs256(["sub": "7", "exp": future], key: key, alg: "HS512")
        for bad in [expired, noExpiry, none, String(tampered), hs512, "not.a.jwt", "", "a.b"] {
            await #expect(throws: TokenAuthenticator.TokenError.self, "\(bad)") { try await tokens.verify(bad) }
        }
    }

    @Test func publicKeyTokensAndAlgorithmConfusion() async throws {
        let rsa = try _RSA.Signing.PrivateKey(keySize: .bits2048)
        let ecdsa = P256.Signing.PrivateKey()
        let verifier = try await TokenAuthenticator(
            hmacSecret: nil, rsaPublicKeyPEM: rsa.publicKey.pemRepresentation, ecdsaPublicKeyPEM: ecdsa.publicKey.pemRepresentation)
        let claims = TokenAuthenticator.Claims(user: User(id: "9", username: "idp-user"), expires: Date().addingTimeInterval(600))
        let rs256 = try await JWTKeyCollection().add(rsa: try Insecure.RSA.PrivateKey(pem: rsa.pemRepresentation), digestAlgorithm: .sha256)
            .sign(claims)
        let es256 = try await JWTKeyCollection().add(ecdsa: try ES256PrivateKey(pem: ecdsa.pemRepresentation)).sign(claims)
        #expect(try await verifier.verify(rs256).sub.value == "9")
        #expect(try await verifier.verify(es256).sub.value == "9")
        // The classic confusion: an HS256 token keyed with the RSA public key's PEM.
        let confused = Self.hs256(["sub": "1", "exp": future], key: Array(rsa.publicKey.pemRepresentation.utf8))
        await #expect(throws: TokenAuthenticator.TokenError.self) { try await verifier.verify(confused) }
        // The same with the header claiming RS256.
        let relabelled = Self.hs256(["sub": "1", "exp": future], key: Array(rsa.publicKey.pemRepresentation.utf8), alg: "RS256")
        await #expect(throws: TokenAuthenticator.TokenError.self) { try await verifier.verify(relabelled) }
        // Another RSA key's token.
        let other = try await JWTKeyCollection().add(
            rsa: try Insecure.RSA.PrivateKey(pem: try _RSA.Signing.PrivateKey(keySize: .bits2048).pemRepresentation),
            digestAlgorithm: .sha256
        ).sign(claims)
        await #expect(throws: TokenAuthenticator.TokenError.self) { try await verifier.verify(other) }
        // A verifier without a signing key issues nothing.
        let unsigned = await #expect(throws: TokenAuthenticator.TokenError.self) {
            try await verifier.issue(for: User(id: "1", username: "x"))
        }
        #expect(unsigned?.code == .noSigningKey)
    }

    @Test func audienceAndIssuerAreCheckedWhenSet() async throws {
        let rsa = try _RSA.Signing.PrivateKey(keySize: .bits2048)
        let verifier = try await TokenAuthenticator(
            hmacSecret: nil, rsaPublicKeyPEM: rsa.publicKey.pemRepresentation, audience: "chat", issuer: "https://idp.example")
        let signer = try await JWTKeyCollection().add(
            rsa: try Insecure.RSA.PrivateKey(pem: rsa.pemRepresentation), digestAlgorithm: .sha256)
        let user = User(id: "9", username: "idp-user")
        let expires = Date().addingTimeInterval(600)
        let ours = try await signer.sign(
            TokenAuthenticator.Claims(user: user, expires: expires, audience: "chat", issuer: "https://idp.example"))
        #expect(try await verifier.verify(ours).sub.value == "9")
        for claims in [
            TokenAuthenticator.Claims(user: user, expires: expires, audience: "billing", issuer: "https://idp.example"),
            TokenAuthenticator.Claims(user: user, expires: expires, audience: nil, issuer: "https://idp.example"),
            TokenAuthenticator.Claims(user: user, expires: expires, audience: "chat", issuer: "https://other.example"),
        ] {
            let token = try await signer.sign(claims)
            await #expect(throws: TokenAuthenticator.TokenError.self) { try await verifier.verify(token) }
        }
    }

    @Test func tokenUserReadsTheHeaderTheQueryAndTheSubprotocol() async throws {
        let secret = DeploymentSecret(Array("tokens".utf8))
        let tokens = try await TokenAuthenticator(secret: secret)
        let harness = try TestHarness(
            [
                route("http.request", tokenUser(required: true) { context in try await context.respond("\(context.user)") }),
                route("websocket.connect", tokenUser(required: true) { context in try await context.accept() }),
            ], environment: ConsumerEnvironment(tokens: tokens))
        let token = try await tokens.issue(for: User(id: "3", username: "carol"))
        let client = HTTPTestClient(harness)
        #expect(try await client.get("/", headers: [("authorization", "Bearer " + token)]).text == "carol")
        #expect(try await client.get("/", query: "token=" + token).text == "carol")
        let refused = try await client.get("/", headers: [("authorization", "Bearer " + token + "x")])
        #expect(refused.status == 401 && refused.header("www-authenticate") == "Bearer")
        #expect(try await client.get("/").status == 401)
        #expect(
            try await WebSocketTestClient(harness, path: "/", headers: [("sec-websocket-protocol", "access_token, " + token)]).connect())
        #expect(try await WebSocketTestClient(harness, path: "/", query: "token=" + token).connect())
        #expect(try await WebSocketTestClient(harness, path: "/", headers: [("sec-websocket-protocol", "access_token")]).connect() == false)
    }
}
