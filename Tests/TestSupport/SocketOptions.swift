import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// This process's own TCP sockets, found through `/proc/self/fd`, and the options set on them:
/// what a test checks after code it does not hold the descriptors of (NIO's) made a connection.
public enum OwnSockets {
    /// A TCP socket of this process: its descriptor and its local and peer ports.
    public struct Socket: Sendable, Equatable {
        public let descriptor: CInt
        public let localPort: Int
        public let peerPort: Int
    }

    /// Every connected IPv4/IPv6 TCP socket this process holds now.
    public static func all() -> [Socket] {
        #if os(Linux)
            let names = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
            return names.compactMap { CInt($0) }.compactMap { descriptor in
                guard let local = port(descriptor, peer: false), let peer = port(descriptor, peer: true) else { return nil }
                return Socket(descriptor: descriptor, localPort: local, peerPort: peer)
            }
        #else
            return []
        #endif
    }

    /// An integer option of a socket (`level`, `name`), nil when it cannot be read.
    public static func option(_ descriptor: CInt, level: CInt, name: CInt) -> CInt? {
        var value: CInt = 0
        var length = socklen_t(MemoryLayout<CInt>.size)
        return getsockopt(descriptor, level, name, &value, &length) == 0 ? value : nil
    }

    /// Whether Nagle's algorithm is off (`TCP_NODELAY`).
    public static func noDelay(_ descriptor: CInt) -> Bool? {
        option(descriptor, level: CInt(IPPROTO_TCP), name: TCP_NODELAY).map { $0 != 0 }
    }

    /// Whether `SO_DEBUG` is set: what `TCP_NODELAY`'s number means at the socket level, so a
    /// no-delay option given at the wrong level sets this instead.
    public static func debugFlag(_ descriptor: CInt) -> Bool? {
        option(descriptor, level: SOL_SOCKET, name: SO_DEBUG).map { $0 != 0 }
    }

    private static func port(_ descriptor: CInt, peer: Bool) -> Int? {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let result = withUnsafeMutablePointer(to: &storage) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { address in
                peer ? getpeername(descriptor, address, &length) : getsockname(descriptor, address, &length)
            }
        }
        guard result == 0 else { return nil }
        switch Int32(storage.ss_family) {
        case AF_INET:
            return withUnsafeBytes(of: &storage) { Int(UInt16(bigEndian: $0.load(fromByteOffset: 2, as: UInt16.self))) }
        case AF_INET6:
            return withUnsafeBytes(of: &storage) { Int(UInt16(bigEndian: $0.load(fromByteOffset: 2, as: UInt16.self))) }
        default:
            return nil
        }
    }
}
