import NIOCore

#if canImport(Glibc)
    import Glibc
    private let systemSend = Glibc.send
#elseif canImport(Musl)
    import Musl
    private let systemSend = Musl.send
#endif

/// A plain TCP connection's socket, written with one system call of our own when a group
/// message's hand-over reaches it and NIO holds nothing unwritten for it.
///
/// Why: a message to a room of 1,000 is one write per member. Through the channel, each write
/// crosses the pipeline, the pending-writes queue, a flush and `write(2)` on 500 cold
/// connections per server; `perf` put that user-space part at about a third of the server's time
/// per delivery, beside the kernel's own. Here it is a `send(2)` of bytes encoded once for every
/// member.
///
/// The rules that keep it as correct as the channel:
/// - The descriptor is the channel's own, found once at attach and checked: its local and peer
///   addresses (`getsockname`, `getpeername`) must be the channel's, or there is no direct path.
/// - Only on the channel's event loop, where NIO itself closes the descriptor: a channel that is
///   still open there still owns it. This object sits next to the pipeline's head and sees
///   `channelInactive`, which NIO sends as it closes the descriptor: from then on, no send.
/// - Only when the channel holds no unwritten bytes: what NIO still has to write goes first, so
///   the direct path never overtakes it. Every write that enters the channel passes this object
///   (next to the head, nothing can write past it), which notes it; after one, the channel is
///   asked (`bufferedWritableBytes`) until it says 0. Between, no question is needed: nothing
///   entered, so nothing waits (and the channel is below its high-water mark: writable).
/// - Whatever the kernel does not take at once (a full socket buffer, an error) is handed to the
///   channel, which writes it when it can, bounds it and reports the error: the direct path only
///   ever shortens the way of what the kernel takes now.
/// - Never over TLS or HTTP/2 (the bytes on the socket are not the frames).
///
/// The state a hand-over reads per socket (the descriptor, whether a write entered the channel,
/// the frames held) lives in the ``WebSocketSession`` itself: a delivery touches that one object,
/// not this handler, the channel or its contexts (each a cache miss on a cold socket).
final class DirectSocket: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = Any
    typealias OutboundIn = Any

    /// The session told of writes and of the close. Held strongly and let go when the handler
    /// is removed (the pipeline removes every handler when the channel closes): a weak
    /// reference would move the session's reference count to a side table, and every retain
    /// of it (one per delivery) would take the slow path.
    private var session: WebSocketSession?

    init(session: WebSocketSession) { self.session = session }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        session?.channelEntered = true
        context.write(data, promise: promise)
    }

    func channelInactive(context: ChannelHandlerContext) {
        session?.directDescriptor = -1
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        session?.directDescriptor = -1
        session = nil
    }

    /// The descriptor of `channel` when it is a plain TCP connection whose descriptor can be
    /// found and checked; nil otherwise (the channel's own writes are used). A handler must then
    /// be added first in the pipeline (next to the head) before it is used.
    static func descriptor(of channel: any Channel) -> CInt? {
        #if os(Linux)
            findLinux(channel)
        #else
            nil
        #endif
    }
}

#if os(Linux)
    extension DirectSocket {
        private static func findLinux(_ channel: any Channel) -> CInt? {
            // NIO does not hand out a channel's descriptor; its description names it
            // ("SocketChannel { BaseSocket { fd=12 }, ... }"), and the addresses check it.
            let description = String(describing: channel)
            guard description.hasPrefix("SocketChannel {"), let marker = description.firstRange(of: "fd=") else { return nil }
            let digits = description[marker.upperBound...].prefix(while: \.isNumber)
            guard let number = CInt(digits), number >= 0,
                let local = channel.localAddress, let remote = channel.remoteAddress,
                Self.address(of: number, peer: false, matches: local),
                Self.address(of: number, peer: true, matches: remote)
            else { return nil }
            return number
        }

        /// Whether the descriptor's own (or its peer's) address is `expected`, byte for byte.
        private static func address(of descriptor: CInt, peer: Bool, matches expected: SocketAddress) -> Bool {
            var storage = sockaddr_storage()
            var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let result = withUnsafeMutablePointer(to: &storage) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { address in
                    peer ? getpeername(descriptor, address, &length) : getsockname(descriptor, address, &length)
                }
            }
            guard result == 0 else { return false }
            // Compared as bytes (family, port, address), the layout of `sockaddr_in` and `sockaddr_in6`.
            switch expected {
            case .v4(let v4):
                guard Int32(storage.ss_family) == AF_INET else { return false }
                var wanted = v4.address
                return withUnsafeBytes(of: &wanted) { w in withUnsafeBytes(of: &storage) { g in w[0..<8].elementsEqual(g[0..<8]) } }
            case .v6(let v6):
                guard Int32(storage.ss_family) == AF_INET6 else { return false }
                var wanted = v6.address
                return withUnsafeBytes(of: &wanted) { w in
                    withUnsafeBytes(of: &storage) { g in w[2..<4].elementsEqual(g[2..<4]) && w[8..<24].elementsEqual(g[8..<24]) }
                }
            case .unixDomainSocket:
                return false
            }
        }

        /// Sends `first` and then `more` on `descriptor` as far as the kernel takes them now,
        /// without blocking: how many bytes it took (0 when the socket's buffer is full or on an
        /// error, which the channel then meets and reports when it writes the rest).
        static func send(_ first: ByteBuffer, _ more: [ByteBuffer], on descriptor: CInt) -> Int {
            if more.isEmpty {
                return first.withUnsafeReadableBytes { bytes in
                    Self.taken(systemSend(descriptor, bytes.baseAddress, bytes.count, Self.flags))
                }
            }
            // Several frames: one `sendmsg(2)` with a vector of them (at most `vectorLimit` per
            // call, as many calls as the kernel keeps taking everything).
            let frames = [first] + more
            var total = 0
            var start = 0
            while start < frames.count {
                let end = min(frames.count, start + Self.vectorLimit)
                let (sent, wanted) = sendVector(frames[start..<end], on: descriptor)
                total += sent
                guard sent == wanted else { break }
                start = end
            }
            return total
        }

        private static func sendVector(_ frames: ArraySlice<ByteBuffer>, on descriptor: CInt) -> (sent: Int, wanted: Int) {
            var vectors: [iovec] = []
            vectors.reserveCapacity(frames.count)
            var wanted = 0
            // The frames' storage is kept alive by `frames` for the call; their pointers stay valid.
            for frame in frames {
                frame.withUnsafeReadableBytes { bytes in
                    vectors.append(iovec(iov_base: UnsafeMutableRawPointer(mutating: bytes.baseAddress), iov_len: bytes.count))
                }
                wanted += frame.readableBytes
            }
            let sent = withExtendedLifetime(frames) {
                vectors.withUnsafeMutableBufferPointer { vector in
                    var message = msghdr()
                    message.msg_iov = vector.baseAddress
                    message.msg_iovlen = numericCast(vector.count)
                    return Self.taken(sendmsg(descriptor, &message, Self.flags))
                }
            }
            return (sent, wanted)
        }

        private static func taken(_ result: Int) -> Int { result > 0 ? result : 0 }
        private static let flags = CInt(MSG_NOSIGNAL) | CInt(MSG_DONTWAIT)
        static let vectorLimit = 64
    }
#else
    extension DirectSocket {
        static func send(_ first: ByteBuffer, _ more: [ByteBuffer], on descriptor: CInt) -> Int { 0 }
    }
#endif
