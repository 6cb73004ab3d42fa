import CPBKDF2
import Crypto

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// PBKDF2-HMAC-SHA256 with a 32-byte output (one block: T = U1 ^ U2 ^ … ^ Uc, each U an HMAC of
/// the one before), computed round by round so that the hashing thread can yield the CPU every
/// ``roundsPerSlice`` rounds. Each round is two SHA-256 compressions from the key's precomputed
/// inner and outer states, in C (`CPBKDF2`: the x86 SHA extensions when the CPU has them, 870,000
/// rounds in about 106 ms here, a little faster than BoringSSL's PBKDF2; portable C otherwise).
///
/// Why not one call into BoringSSL: a `SCHED_IDLE` thread busy in one 870,000-round call can
/// still be picked after a hand-off between the server's own threads and then run its whole
/// slice (3-4 ms, seen with `perf sched`) while an event loop with a frame waits. Measured here
/// with a foreign `SCHED_IDLE` process hashing on the server's CPU: echo p99 went from 1.2 to
/// 2.1-3.9 ms when it hashed in one call, and stayed at 1.14 ms when it yielded every 300 rounds.
enum PBKDF2SHA256 {
    /// Rounds between two yields: about a tenth of a millisecond.
    static let roundsPerSlice = 1_000

    static func derive(password: [UInt8], salt: [UInt8], rounds: Int, yielding: Bool) -> [UInt8] {
        var key = password.count > 64 ? Array(SHA256.hash(data: password)) : password
        key += [UInt8](repeating: 0, count: 64 - key.count)
        // The key's inner and outer states: one compression of key ^ ipad, key ^ opad.
        func keyState(_ pad: UInt8) -> [UInt32] {
            var state: [UInt32] = [
                0x6a09_e667, 0xbb67_ae85, 0x3c6e_f372, 0xa54f_f53a, 0x510e_527f, 0x9b05_688c, 0x1f83_d9ab, 0x5be0_cd19,
            ]
            let block = (0..<16).map { words(key.map { $0 ^ pad }, at: 4 * $0) }
            cpbkdf2_sha256_compress(&state, block)
            return state
        }
        let inner = keyState(0x36), outer = keyState(0x5c)
        // U1 = HMAC(password, salt || 00000001), through the library.
        var first = HMAC<SHA256>(key: SymmetricKey(data: password))
        first.update(data: salt + [0, 0, 0, 1])
        let u1 = Array(first.finalize())
        var u = (0..<8).map { words(u1, at: 4 * $0) }
        var t = u
        var done = 1
        while done < rounds {
            let slice = min(rounds - done, roundsPerSlice)
            cpbkdf2_sha256_rounds(inner, outer, &u, &t, slice)
            done += slice
            #if os(Linux)
                if yielding { sched_yield() }
            #endif
        }
        return t.flatMap {
            [UInt8($0 >> 24), UInt8(truncatingIfNeeded: $0 >> 16), UInt8(truncatingIfNeeded: $0 >> 8), UInt8(truncatingIfNeeded: $0)]
        }
    }

    /// The big-endian word at `offset`.
    private static func words(_ bytes: [UInt8], at offset: Int) -> UInt32 {
        UInt32(bytes[offset]) << 24 | UInt32(bytes[offset + 1]) << 16 | UInt32(bytes[offset + 2]) << 8 | UInt32(bytes[offset + 3])
    }
}
