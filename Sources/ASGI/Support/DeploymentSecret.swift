import Crypto
import Synchronization

/// The secret one deployment's processes share (Django's `SECRET_KEY`): channel-session keys,
/// CSRF tokens and the tags that stand for reply channels in logs are keyed hashes made with it,
/// so none of them can be computed from what a log line, `stats` or Redis shows.
///
/// Give every process of a deployment the same one (`CHANNELS_SECRET_KEY`, or a file through
/// `CHANNELS_SECRET_KEY_FILE`); ``random()`` is for a deployment that lives in one process.
public struct DeploymentSecret: Sendable {
    /// An HMAC already keyed (its key pads hashed once): each MAC starts from a copy of it, which
    /// the digests' copy-on-write makes a fresh state. Never mutated after init, so sharing it
    /// between threads is reading it (`HMAC` is not marked `Sendable` in swift-crypto 3).
    private final class Keyed: @unchecked Sendable {
        let hmac: HMAC<SHA256>
        /// ``hex(_:_:length:)``'s answers by purpose and value: a worker makes a socket's
        /// channel-session key for each of its messages, and the MAC (through swift-crypto's
        /// generic updates) had been a twentieth of a relaying worker's CPU. Bounded: past
        /// `remembered` values it starts again.
        let hexes = Mutex<[[UInt8]: String]>([:])
        static let remembered = 16_384
        init(_ key: [UInt8]) { hmac = HMAC<SHA256>(key: SymmetricKey(data: key)) }
    }

    private let keyed: Keyed

    /// A secret from configured bytes (any length; they are hashed into the key).
    public init(_ secret: some Sequence<UInt8>) {
        self.keyed = Keyed(Array(SHA256.hash(data: Array(secret))))
    }

    /// A secret of 32 random bytes from the system's secure generator, for one process.
    public static func random() -> DeploymentSecret { DeploymentSecret(RandomToken.bytes(32)) }

    /// HMAC-SHA256 of `value` for one `purpose`: the purposes never share a value.
    public func mac(_ purpose: StaticString, _ value: String) -> [UInt8] {
        var hmac = keyed.hmac
        purpose.withUTF8Buffer { hmac.update(data: $0) }
        hmac.update(data: [0])
        var value = value
        value.withUTF8 { hmac.update(data: UnsafeRawBufferPointer($0)) }
        return Array(hmac.finalize())
    }

    /// The first `length` lowercase hex digits of ``mac(_:_:)``.
    public func hex(_ purpose: StaticString, _ value: String, length: Int = 64) -> String {
        // Keyed by the bytes the MAC is made of: Swift's strings compare as characters, and
        // two values that look the same ("é" as one scalar or two) must not share an answer.
        var key: [UInt8] = []
        key.reserveCapacity(purpose.utf8CodeUnitCount + 1 + value.utf8.count)
        purpose.withUTF8Buffer { key += $0 }
        key.append(0)
        key += value.utf8
        if let known = keyed.hexes.withLock({ $0[key] }) { return String(known.prefix(length)) }
        let made = Hex.encode(mac(purpose, value))
        keyed.hexes.withLock { hexes in
            if hexes.count >= Keyed.remembered { hexes.removeAll(keepingCapacity: true) }
            hexes[key] = made
        }
        return String(made.prefix(length))
    }

    /// A short tag that stands for a reply channel in logs: the same in every process of the
    /// deployment (lines can be correlated), useless for anything else.
    public func socketTag(_ replyChannel: String) -> String { hex("socket-tag", replyChannel, length: 12) }

    /// True when `a` and `b` are equal, in a time that does not depend on where they differ.
    public static func constantTimeEquals(_ a: some Collection<UInt8>, _ b: some Collection<UInt8>) -> Bool {
        guard a.count == b.count else { return false }
        var difference: UInt8 = 0
        for (x, y) in zip(a, b) { difference |= x ^ y }
        return difference == 0
    }
}
