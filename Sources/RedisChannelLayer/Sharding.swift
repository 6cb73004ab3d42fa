/// Placement of names on a ring of Redis hosts, as asgi_redis computes it.
enum Sharding {
    private static let table: [UInt32] = (0..<256).map { n -> UInt32 in
        var c = UInt32(n)
        for _ in 0..<8 { c = (c & 1) != 0 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
        return c
    }

    /// The CRC-32 (IEEE, as zlib and Python's `binascii.crc32`) of some bytes.
    static func crc32<S: Sequence>(_ bytes: S) -> UInt32 where S.Element == UInt8 {
        var crc: UInt32 = 0xFFFF_FFFF
        for byte in bytes {
            crc = table[Int((crc ^ UInt32(byte)) & 0xff)] ^ (crc >> 8)
        }
        return crc ^ 0xFFFF_FFFF
    }

    /// `int((crc32(name) & 0xfff) / (4096 / hostCount))` in floating point, as Python does it.
    static func shard(_ name: String, hostCount: Int) -> Int {
        let bucket = Double(crc32(name.utf8) & 0xfff)
        let index = Int(bucket / (4096.0 / Double(hostCount)))
        return min(index, hostCount - 1)
    }
}
