/// Hexadecimal digits, both ways: the one place the package writes and reads hex.
public enum Hex {
    /// `0-9a-f` as ASCII bytes.
    public static let lowercaseDigits: [UInt8] = Array("0123456789abcdef".utf8)
    /// `0-9A-F` as ASCII bytes (percent-encoding writes these).
    public static let uppercaseDigits: [UInt8] = Array("0123456789ABCDEF".utf8)

    /// `bytes` as lowercase hex.
    @inlinable
    public static func encode(_ bytes: some Sequence<UInt8>) -> String {
        var out: [UInt8] = []
        out.reserveCapacity(bytes.underestimatedCount * 2)
        for byte in bytes {
            out.append(lowercaseDigits[Int(byte >> 4)])
            out.append(lowercaseDigits[Int(byte & 0x0f)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// The `digits` lowest hex digits of `value`, most significant first, appended to `out`.
    @inlinable
    public static func append(_ value: UInt64, digits: Int = 16, into out: inout [UInt8]) {
        for i in stride(from: digits - 1, through: 0, by: -1) {
            out.append(lowercaseDigits[Int((value >> (UInt64(i) * 4)) & 0xf)])
        }
    }

    /// The value of one hex digit (either case), or nil.
    public static func value(of digit: UInt8) -> UInt8? {
        switch digit {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): digit - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): digit - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): digit - UInt8(ascii: "A") + 10
        default: nil
        }
    }
}

/// Random names and keys, all from the system's secure generator (read in blocks,
/// ``SecureRandomPool``): the one place the package makes them.
public enum RandomToken {
    /// ASCII letters, as asgi_redis uses for new channel names.
    public static let letters: [UInt8] = Array("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ".utf8)
    /// Lowercase letters and digits, as Django's session keys.
    public static let lowercaseAlphanumerics: [UInt8] = Array("abcdefghijklmnopqrstuvwxyz0123456789".utf8)
    /// Letters and digits, as Django's password salts.
    public static let alphanumerics: [UInt8] = Array("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789".utf8)

    /// `count` characters drawn uniformly from `alphabet`. Each 64-bit draw yields as many
    /// characters as fit without bias worth counting (below 2^-60): one getrandom call per ~11
    /// letters instead of one per letter.
    public static func string(_ count: Int, from alphabet: [UInt8] = letters) -> String {
        precondition(alphabet.count > 1 && alphabet.count < 256)
        let base = UInt64(alphabet.count)
        var perDraw = 0
        var capacity: UInt64 = 1
        while capacity <= UInt64.max / base / (1 << 4) {
            capacity *= base
            perDraw += 1
        }
        var generator = SecureRandomPool()
        var out = [UInt8]()
        out.reserveCapacity(count)
        while out.count < count {
            var bits = generator.next() as UInt64
            for _ in 0..<min(perDraw, count - out.count) {
                out.append(alphabet[Int(bits % base)])
                bits /= base
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// `count` random bytes.
    public static func bytes(_ count: Int) -> [UInt8] {
        var generator = SecureRandomPool()
        var out = [UInt8]()
        out.reserveCapacity(count + 8)
        while out.count < count {
            let bits = generator.next() as UInt64
            for shift in stride(from: 0, to: 64, by: 8) where out.count < count {
                out.append(UInt8(truncatingIfNeeded: bits >> UInt64(shift)))
            }
        }
        return out
    }

    /// 32 lowercase hex characters of a random version-4 UUID, as Python's `uuid4().hex` writes it.
    public static func uuid4Hex(into out: inout [UInt8]) {
        let (high, low) = uuid4()
        Hex.append(high, into: &out)
        Hex.append(low, into: &out)
    }

    /// The 128 bits of a random version-4 UUID (version and variant bits set), high word first.
    public static func uuid4() -> (UInt64, UInt64) {
        var generator = SecureRandomPool()
        let high = generator.next() as UInt64
        let low = generator.next() as UInt64
        return ((high & ~0xF000) | 0x4000, (low & ~(0xC000_0000_0000_0000 as UInt64)) | 0x8000_0000_0000_0000)
    }
}
