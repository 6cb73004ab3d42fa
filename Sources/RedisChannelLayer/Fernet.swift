import ASGI
import Crypto
import Foundation
import _CryptoExtras

/// Why a Fernet token was refused.
public struct FernetError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What is wrong with the token.
    public enum Reason: String, Sendable, Hashable {
        /// Not urlsafe base64, too short, or not version 0x80.
        case malformed
        /// The HMAC does not match: another key, or the token was altered.
        case badSignature
        /// Older than the time to live.
        case expired
        /// Stamped more than 60 seconds in the future.
        case fromTheFuture
        /// The decrypted bytes are not PKCS#7-padded.
        case badPadding
    }
    /// What is wrong with the token.
    public var reason: Reason
    /// The reason, in words.
    public var description: String { "invalid Fernet token (\(reason.rawValue))" }
}

/// Fernet (the `cryptography` package's authenticated encryption, spec at
/// github.com/fernet/spec): version byte 0x80, a big-endian 64-bit timestamp, a 16-byte IV,
/// AES-128-CBC with PKCS#7 padding, and an HMAC-SHA256 over all of that; urlsafe base64.
/// Built on swift-crypto (AES-CBC from `_CryptoExtras`, HMAC and SHA-256 from `Crypto`).
/// `@unchecked`: its keys are immutable values (`SymmetricKey` is not marked `Sendable` in swift-crypto 3).
struct Fernet: @unchecked Sendable {
    private let signingKey: SymmetricKey
    private let encryptionKey: SymmetricKey
    /// How far in the future a token's timestamp may be (the `cryptography` package's value).
    static let maxClockSkew: Int64 = 60

    /// A Fernet with a 32-byte key: the first half signs, the second encrypts.
    init(rawKey: some Collection<UInt8>) {
        precondition(rawKey.count == 32, "a Fernet key is 32 bytes")
        signingKey = SymmetricKey(data: Array(rawKey.prefix(16)))
        encryptionKey = SymmetricKey(data: Array(rawKey.suffix(16)))
    }

    /// A Fernet from its urlsafe-base64 key text (44 characters); nil if that is not one.
    init?(key: String) {
        guard let raw = Base64URL.decode(Array(key.utf8)), raw.count == 32 else { return nil }
        self.init(rawKey: raw)
    }

    /// asgi_redis 1.4's key derivation: the Fernet key is urlsafe-base64(SHA-256(key)), so any
    /// text of any length is a key.
    init(asgiRedisKey key: String) {
        self.init(rawKey: Array(SHA256.hash(data: Array(key.utf8))))
    }

    /// The token (urlsafe base64, with padding) of `plaintext`, stamped `now` (seconds since 1970).
    func encrypt(_ plaintext: [UInt8], now: Int64 = Fernet.now(), iv: [UInt8]? = nil) -> [UInt8] {
        // A random IV from two 64-bit draws of the secure generator's pool. The IV is 16 bytes
        // and the key 16: neither call can fail.
        let ivBytes =
            iv
            ?? {
                var generator = SecureRandomPool()
                let (a, b): (UInt64, UInt64) = (generator.next(), generator.next())
                return (0..<8).map { UInt8(truncatingIfNeeded: a >> ($0 * 8)) } + (0..<8).map { UInt8(truncatingIfNeeded: b >> ($0 * 8)) }
            }()
        let cipherIV = try! AES._CBC.IV(ivBytes: ivBytes)
        let ciphertext = try! AES._CBC.encrypt(plaintext, using: encryptionKey, iv: cipherIV)
        var token: [UInt8] = []
        token.reserveCapacity(1 + 8 + 16 + ciphertext.count + 32)
        token.append(0x80)
        withUnsafeBytes(of: UInt64(bitPattern: now).bigEndian) { token.append(contentsOf: $0) }
        token.append(contentsOf: ivBytes)
        token.append(contentsOf: ciphertext)
        let mac = HMAC<SHA256>.authenticationCode(for: token, using: signingKey)
        token.append(contentsOf: mac)
        return Base64URL.encode(token)
    }

    /// The plaintext of `token`; `ttl` seconds bounds its age (nil: any age).
    func decrypt(_ token: some Collection<UInt8>, ttl: Int?, now: Int64 = Fernet.now()) throws(FernetError) -> [UInt8] {
        guard let raw = Base64URL.decode(Array(token)), raw.count >= 1 + 8 + 16 + 16 + 32, raw[0] == 0x80,
            (raw.count - 57) % 16 == 0
        else { throw FernetError(reason: .malformed) }
        var stamp: UInt64 = 0
        for byte in raw[1..<9] { stamp = stamp << 8 | UInt64(byte) }
        let timestamp = Int64(bitPattern: stamp)
        if let ttl, timestamp + Int64(ttl) < now { throw FernetError(reason: .expired) }
        if now + Self.maxClockSkew < timestamp { throw FernetError(reason: .fromTheFuture) }
        let signed = raw[..<(raw.count - 32)]
        guard HMAC<SHA256>.isValidAuthenticationCode(raw[(raw.count - 32)...], authenticating: signed, using: signingKey) else {
            throw FernetError(reason: .badSignature)
        }
        do {
            let iv = try AES._CBC.IV(ivBytes: raw[9..<25])
            return Array(try AES._CBC.decrypt(raw[25..<(raw.count - 32)], using: encryptionKey, iv: iv))
        } catch {
            throw FernetError(reason: .badPadding)
        }
    }

    /// Seconds since 1970, now.
    static func now() -> Int64 { WallClock.wholeSeconds }
}

/// Several Fernet keys: the first encrypts, each is tried in turn to decrypt (key rotation),
/// as `cryptography`'s `MultiFernet`.
struct MultiFernet: Sendable {
    let fernets: [Fernet]

    /// asgi_redis 1.4's `symmetric_encryption_keys`.
    init(asgiRedisKeys keys: [String]) {
        precondition(!keys.isEmpty)
        fernets = keys.map(Fernet.init(asgiRedisKey:))
    }

    func encrypt(_ plaintext: [UInt8]) -> [UInt8] { fernets[0].encrypt(plaintext) }

    func decrypt(_ token: some Collection<UInt8>, ttl: Int?, now: Int64 = Fernet.now()) throws(FernetError) -> [UInt8] {
        var firstError = FernetError(reason: .badSignature)
        for (index, fernet) in fernets.enumerated() {
            do {
                return try fernet.decrypt(token, ttl: ttl, now: now)
            } catch {
                // A signature that matches no key says less than an expired or malformed token.
                if index == 0 || error.reason != .badSignature { firstError = error }
            }
        }
        throw firstError
    }
}

/// Urlsafe base64 (RFC 4648 section 5): `-` and `_` for `+` and `/`, padded with `=`.
enum Base64URL {
    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8)
    private static let values: [UInt8] = {
        var table = [UInt8](repeating: 0xFF, count: 256)
        for (index, char) in alphabet.enumerated() { table[Int(char)] = UInt8(index) }
        return table
    }()

    static func encode(_ bytes: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity((bytes.count + 2) / 3 * 4)
        var i = 0
        while i + 3 <= bytes.count {
            let n = UInt32(bytes[i]) << 16 | UInt32(bytes[i + 1]) << 8 | UInt32(bytes[i + 2])
            out.append(alphabet[Int(n >> 18 & 63)])
            out.append(alphabet[Int(n >> 12 & 63)])
            out.append(alphabet[Int(n >> 6 & 63)])
            out.append(alphabet[Int(n & 63)])
            i += 3
        }
        let left = bytes.count - i
        if left > 0 {
            let n = UInt32(bytes[i]) << 16 | (left == 2 ? UInt32(bytes[i + 1]) << 8 : 0)
            out.append(alphabet[Int(n >> 18 & 63)])
            out.append(alphabet[Int(n >> 12 & 63)])
            out.append(left == 2 ? alphabet[Int(n >> 6 & 63)] : UInt8(ascii: "="))
            out.append(UInt8(ascii: "="))
        }
        return out
    }

    /// The bytes, or nil if `text` is not urlsafe base64 (padding optional).
    static func decode(_ text: [UInt8]) -> [UInt8]? {
        var end = text.count
        while end > 0, text[end - 1] == UInt8(ascii: "=") { end -= 1 }
        guard text.count - end <= 2, end % 4 != 1 else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(end * 3 / 4)
        var accumulator: UInt32 = 0
        var bits = 0
        for i in 0..<end {
            let value = values[Int(text[i])]
            guard value != 0xFF else { return nil }
            accumulator = accumulator << 6 | UInt32(value)
            bits += 6
            if bits >= 8 {
                bits -= 8
                out.append(UInt8(truncatingIfNeeded: accumulator >> UInt32(bits)))
            }
        }
        return out
    }
}

/// The layer's keys applied to what the framework stores beside the layer (sessions, delayed
/// messages): asgi_redis's Fernet scheme, the first key sealing, every key opening, no expiry
/// check (a stored value has its own TTL).
public struct StorageEncryption: Sendable {
    private let crypter: MultiFernet

    /// Encryption with asgi_redis-style keys; nil when `keys` is empty.
    public init?(keys: [String]) {
        guard !keys.isEmpty else { return nil }
        crypter = MultiFernet(asgiRedisKeys: keys)
    }

    /// The sealed form of `plaintext`.
    public func seal(_ plaintext: [UInt8]) -> [UInt8] { crypter.encrypt(plaintext) }

    /// The plaintext of `sealed`; throws ``FernetError`` when no key opens it.
    public func open(_ sealed: [UInt8]) throws -> [UInt8] { try crypter.decrypt(sealed, ttl: nil) }
}
