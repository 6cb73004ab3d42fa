import ASGI
import Foundation
import TestSupport
import Testing

@testable import RedisChannelLayer

/// Fernet as the spec (github.com/fernet/spec) and the `cryptography` package define it.
@Suite("Fernet")
struct FernetTests {
    // The spec's generate.json / verify.json vector.
    static let secret = "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4="
    static let token = "gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA=="
    static let stamp: Int64 = 499_162_800  // 1985-10-26T01:20:00-07:00
    static let iv = Array(UInt8(0)...UInt8(15))

    @Test("the spec's vector: encrypt with a fixed time and IV, decrypt within the TTL")
    func specVector() throws {
        let fernet = try #require(Fernet(key: Self.secret))
        #expect(String(decoding: fernet.encrypt(Array("hello".utf8), now: Self.stamp, iv: Self.iv), as: UTF8.self) == Self.token)
        #expect(try fernet.decrypt(Array(Self.token.utf8), ttl: 60, now: Self.stamp + 1) == Array("hello".utf8))
        #expect(try fernet.decrypt(Array(Self.token.utf8), ttl: nil, now: Self.stamp + 1_000_000) == Array("hello".utf8))
    }

    @Test("the spec's invalid tokens are refused, each for its reason")
    func invalidTokens() throws {
        let fernet = try #require(Fernet(key: Self.secret))
        func reason(_ token: String, ttl: Int? = 60, now: Int64 = FernetTests.stamp + 1) -> FernetError.Reason? {
            do {
                _ = try fernet.decrypt(Array(token.utf8), ttl: ttl, now: now)
                return nil
            } catch {
                return error.reason
            }
        }
        // Too old: 91 s after the stamp with a TTL of 60.
        #expect(reason(Self.token, now: Self.stamp + 91) == .expired)
        // Stamped far in the future (more than 60 s of clock skew).
        #expect(reason(Self.token, now: Self.stamp - 61) == .fromTheFuture)
        #expect(reason(Self.token, now: Self.stamp - 59) == nil)
        // An altered HMAC, an altered ciphertext, another key.
        var altered = Array(Self.token.utf8)
        altered[altered.count - 5] = altered[altered.count - 5] == UInt8(ascii: "A") ? UInt8(ascii: "B") : UInt8(ascii: "A")
        #expect(reason(String(decoding: altered, as: UTF8.self)) == .badSignature)
        let other = Fernet(asgiRedisKey: "another key")
        #expect(throws: FernetError(reason: .badSignature)) { try other.decrypt(Array(Self.token.utf8), ttl: nil) }
        // Not base64, too short, wrong version byte, a ciphertext that is not whole blocks.
        #expect(reason("gAAAAAAdwJ6w%%%%") == .malformed)
        #expect(reason("gAAAAAAdwJ6wAAECAwQF") == .malformed)
        var raw = try #require(Base64URL.decode(Array(Self.token.utf8)))
        raw[0] = 0x81
        #expect(reason(String(decoding: Base64URL.encode(raw), as: UTF8.self)) == .malformed)
        raw[0] = 0x80
        raw.remove(at: 30)
        #expect(reason(String(decoding: Base64URL.encode(raw), as: UTF8.self)) == .malformed)
    }

    @Test("urlsafe base64 round-trips every length, with and without padding")
    func base64() {
        for length in 0..<40 {
            let bytes = (0..<length).map { UInt8(truncatingIfNeeded: $0 * 37 + 250) }
            let encoded = Base64URL.encode(bytes)
            #expect(encoded.count % 4 == 0)
            #expect(Base64URL.decode(encoded) == bytes)
            #expect(Base64URL.decode(Array(encoded.prefix { $0 != UInt8(ascii: "=") })) == bytes)
        }
        #expect(Base64URL.decode(Array("ab+/".utf8)) == nil, "standard base64's + and / are not urlsafe")
    }

    @Test("MultiFernet: the first key encrypts, any key decrypts")
    func rotation() throws {
        let old = MultiFernet(asgiRedisKeys: ["old"])
        let rotated = MultiFernet(asgiRedisKeys: ["new", "old"])
        let newOnly = MultiFernet(asgiRedisKeys: ["new"])
        let token = old.encrypt(Array("payload".utf8))
        #expect(try rotated.decrypt(token, ttl: 60) == Array("payload".utf8))
        #expect(throws: FernetError(reason: .badSignature)) { try newOnly.decrypt(token, ttl: 60) }
        #expect(throws: FernetError.self) { try old.decrypt(rotated.encrypt([1, 2, 3]), ttl: 60) }
    }
}

/// The layer's encryption on a real Redis, and with the real asgi_redis 1.4.3 + cryptography.
@Suite("encryption compatible with asgi_redis", .timeLimit(.minutes(2)))
struct EncryptionInteropTests {
    func peer(keys: [String]) throws -> (PythonPeer, [String]) {
        let peer = PythonPeer(hosts: [try TestRedis.requireURL()], prefix: TestRedis.uniquePrefix())
        return (peer, keys)
    }

    func layer(_ peer: PythonPeer, keys: [String]) throws -> RedisChannelLayer {
        var configuration = try RedisChannelLayerConfiguration(urls: peer.hosts)
        configuration.prefix = peer.prefix
        configuration.statsPrefix = String(peer.prefix.dropLast()) + "-meta:"
        configuration.symmetricEncryptionKeys = keys
        return try RedisChannelLayer(configuration: configuration)
    }

    func python(_ peer: PythonPeer, keys: [String], _ command: String, _ args: String...) async throws -> Any {
        let arguments =
            [
                try PythonPeer.python(), PythonPeer.script, "--hosts", peer.hosts[0], "--prefix", peer.prefix, "--keys",
                keys.joined(separator: ","), command,
            ]
            + args
        let (status, output) = try await runProgram(arguments)
        try #require(status == 0, "peer \(command) failed with \(status): \(output)")
        return try JSONSerialization.jsonObject(with: Data(output.utf8), options: [.fragmentsAllowed])
    }

    @Test("the same token as cryptography's Fernet for asgi_redis's key derivation, and each decrypts the other's")
    func sameTokens() async throws {
        let (peer, _) = try peer(keys: [])
        let key = "secret key £ " + ChannelNames.randomLetters(6)
        let plaintext = MsgPackEncoder.encode(Cases.nested)
        let iv = (0..<16).map { _ in UInt8.random(in: 0...255) }
        let now = Fernet.now()
        let python = try #require(
            try await python(peer, keys: [], "fernet_encrypt", key, hex(plaintext), String(now), hex(iv)) as? String)
        let swift = Fernet(asgiRedisKey: key).encrypt(plaintext, now: now, iv: iv)
        #expect(String(decoding: swift, as: UTF8.self) == python)
        let fresh = String(decoding: Fernet(asgiRedisKey: key).encrypt(plaintext), as: UTF8.self)
        #expect(try await self.python(peer, keys: [], "fernet_decrypt", key, fresh, "70") as? String == hex(plaintext))
        #expect(try await self.python(peer, keys: [], "fernet_decrypt", "wrong", fresh, "70") as? String == "invalid")
    }

    @Test("Swift sends encrypted, Python receives; Python sends encrypted, Swift receives; bodies in Redis are tokens")
    func bothWays() async throws {
        let keys = ["k-" + ChannelNames.randomLetters(10)]
        let (peer, _) = try peer(keys: keys)
        let layer = try layer(peer, keys: keys)
        try await layer.send(Cases.nested, to: "enc.plain")
        // What is stored is a Fernet token, not msgpack.
        let raw = try HiredisConnection(
            endpoint: RedisEndpoint(url: peer.hosts[0]), connectTimeout: .seconds(1), commandTimeout: .seconds(2))
        let bodyKey = try #require(raw.command(["LRANGE", peer.prefix + "enc.plain", "0", "0"]).array?.first?.text)
        let body = try #require(raw.command(["GET", bodyKey]).bytes)
        #expect(body.starts(with: Array("gAAAAA".utf8)))
        let received = try #require(try await python(peer, keys: keys, "receive", "enc.plain") as? [String: Any])
        #expect(try untag(try #require(received["message"])) == normalized(Cases.nested))

        #expect(try await python(peer, keys: keys, "send", "response", "enc.reply!abc") as? String == "ok")
        let got = try #require(try await layer.receive(channels: ["enc.reply!"], timeout: .seconds(2)))
        #expect(got.channel == "enc.reply!abc" && got.message == Cases.response)
        try await layer.flush()
        await layer.close()
    }

    @Test("a rotated key: old-key messages still read on both sides; an unknown key is logged, counted and skipped")
    func rotationAndUnknownKeys() async throws {
        let old = "old-" + ChannelNames.randomLetters(8)
        let new = "new-" + ChannelNames.randomLetters(8)
        let (peer, _) = try peer(keys: [old])
        let oldLayer = try layer(peer, keys: [old])
        let rotated = try layer(peer, keys: [new, old])
        let stranger = try layer(peer, keys: ["stranger"])

        // Python with the old key sends; Swift with [new, old] reads it.
        #expect(try await python(peer, keys: [old], "send", "small", "enc.rot") as? String == "ok")
        #expect(try await rotated.receive(channels: ["enc.rot"], timeout: .seconds(2))?.message == Cases.small)
        // Swift with the old key sends; Python with [new, old] reads it.
        try await oldLayer.send(Cases.small, to: "enc.rot2")
        let received = try #require(try await python(peer, keys: [new, old], "receive", "enc.rot2") as? [String: Any])
        #expect(try untag(try #require(received["message"])) == normalized(Cases.small))
        // Swift rotated sends with the new key; Python with [new, old] reads it, Python with only old cannot.
        try await rotated.send(Cases.small, to: "enc.rot3")
        let read = try #require(try await python(peer, keys: [new, old], "receive", "enc.rot3") as? [String: Any])
        #expect(try untag(try #require(read["message"])) == normalized(Cases.small))

        // A message under a key the reader lacks is dropped and counted; the next one arrives.
        try await stranger.send(Cases.nested, to: "enc.mixed")
        try await oldLayer.send(Cases.small, to: "enc.mixed")
        let next = try await rotated.receive(channels: ["enc.mixed"], timeout: .seconds(2))
        #expect(next?.message == Cases.small)
        #expect(rotated.undecryptableMessagesDropped == 1)
        // A plain (unencrypted) body is not a token either.
        let plain = try layer(peer, keys: [])
        try await plain.send(Cases.small, to: "enc.mixed")
        #expect(try await rotated.receive(channels: ["enc.mixed"], timeout: .milliseconds(300)) == nil)
        #expect(rotated.undecryptableMessagesDropped == 2)
        for layer in [oldLayer, rotated, stranger, plain] { await layer.close() }
    }

    @Test("encrypted group send: plain and ! members on Python, bundled ! members on Swift, every one decrypts")
    func groups() async throws {
        let keys = ["g-" + ChannelNames.randomLetters(10)]
        let (peer, _) = try peer(keys: keys)
        let layer = try layer(peer, keys: keys)
        // Python members: two plain channels and two on one process channel (no bundle reader).
        #expect(try await python(peer, keys: keys, "group_add_many", "room", "enc.py.", "2") as? String == "ok")
        try await layer.groupAdd("room", channel: "enc.pyproc!m0")
        try await layer.groupAdd("room", channel: "enc.pyproc!m1")
        // Swift members: three on one process channel whose reader reads bundles.
        let processList = "enc.server." + ChannelNames.randomLetters(8) + "!"
        _ = try await layer.registeredAsBundleReader(processList)
        for i in 0..<3 { try await layer.groupAdd("room", channel: processList + "s\(i)") }

        #expect(try await python(peer, keys: keys, "send_group", "room", "small") as? String == "ok")
        try await layer.sendGroup("room", message: Cases.nested)

        // Python's members get both messages (Python's group send and ours).
        for i in 0..<2 {
            let got = try #require(try await python(peer, keys: keys, "receive_all", "enc.py.m\(i)", "2", "small") as? [String: Any])
            #expect((got["channels"] as? [String])?.count == 2, "enc.py.m\(i)")
        }
        let procs = try #require(try await python(peer, keys: keys, "receive_all", "enc.pyproc!", "4", "small") as? [String: Any])
        #expect((procs["channels"] as? [String])?.sorted() == ["enc.pyproc!m0", "enc.pyproc!m0", "enc.pyproc!m1", "enc.pyproc!m1"])
        // Ours: both messages for each of the three members.
        var seen: [String: Int] = [:]
        while let got = try await layer.receive(channels: [processList], timeout: .milliseconds(500)) {
            seen[got.channel, default: 0] += 1
        }
        #expect(seen == [processList + "s0": 2, processList + "s1": 2, processList + "s2": 2])
        #expect(layer.undecryptableMessagesDropped == 0)
        try await layer.flush()
        await layer.close()
    }

    @Test("keys from the URL (comma-separated, percent-encoded) and from CHANNEL_LAYER_ENCRYPTION_KEYS")
    func keyOptions() throws {
        let fromURL = try RedisChannelLayerConfiguration(urls: ["redis://h:1/0?symmetric_encryption_keys=a%2Cb,c"])
        #expect(fromURL.symmetricEncryptionKeys == ["a,b", "c"])
        let fromEnvironment = try RedisChannelLayerConfiguration(
            urls: ["redis://h:1/0"], environment: ["CHANNEL_LAYER_ENCRYPTION_KEYS": "x,y%20z"])
        #expect(fromEnvironment.symmetricEncryptionKeys == ["x", "y z"])
        #expect(try RedisChannelLayerConfiguration(urls: ["redis://h:1/0"]).symmetricEncryptionKeys.isEmpty)
    }
}
