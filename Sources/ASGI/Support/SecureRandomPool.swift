import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#elseif canImport(Darwin)
    import Darwin
#endif

/// The system's secure generator, read 512 bytes at a time: one system call per 64 draws
/// instead of one per draw (`SystemRandomNumberGenerator` makes a system call for every 8
/// bytes; a message key took two, a channel name one or two). A word is cleared as it is
/// handed out, so the pool holds only what has not been drawn yet.
public struct SecureRandomPool: RandomNumberGenerator, Sendable {
    /// A handle on the process's pool (it holds no state of its own).
    public init() {}

    /// The next 64 random bits of the pool (refilled from the kernel when drawn empty).
    public mutating func next() -> UInt64 { Self.shared.next() }

    private static let shared = Pool()

    private final class Pool: Sendable {
        private struct State {
            var words = [UInt64](repeating: 0, count: 64)
            var index = 64
        }
        private let state = Mutex(State())

        func next() -> UInt64 {
            state.withLock { state in
                if state.index == state.words.count {
                    Self.fill(&state.words)
                    state.index = 0
                }
                let word = state.words[state.index]
                state.words[state.index] = 0
                state.index += 1
                return word
            }
        }

        /// The kernel's generator, opened once (`/dev/urandom`: what `getrandom` reads, which
        /// Swift's Glibc module does not export); -1 when it cannot be opened.
        #if canImport(Glibc) || canImport(Musl)
            private static let urandom: CInt = open("/dev/urandom", O_RDONLY | O_CLOEXEC)
        #endif

        /// Every word from the kernel's generator; where a read fails or comes short, the rest
        /// from `SystemRandomNumberGenerator` (which traps rather than return weak bytes).
        private static func fill(_ words: inout [UInt64]) {
            let filled = words.withUnsafeMutableBytes { raw -> Int in
                guard let base = raw.baseAddress else { return 0 }
                #if canImport(Glibc) || canImport(Musl)
                    guard urandom >= 0 else { return 0 }
                    var done = 0
                    while done < raw.count {
                        let n = read(urandom, base + done, raw.count - done)
                        if n > 0 {
                            done += n
                        } else if n < 0 && errno == EINTR {
                            continue
                        } else {
                            break
                        }
                    }
                    return done / MemoryLayout<UInt64>.size
                #elseif canImport(Darwin)
                    arc4random_buf(base, raw.count)
                    return raw.count / MemoryLayout<UInt64>.size
                #else
                    return 0
                #endif
            }
            var system = SystemRandomNumberGenerator()
            for i in filled..<words.count { words[i] = system.next() }
        }
    }
}
