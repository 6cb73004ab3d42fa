import ASGI
import CHiredis

@testable import RedisChannelLayer

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// One blocking connection to Redis through hiredis: the tests' raw client, for looking at
/// what the layer stored and for planting data the layer must cope with.
///
/// Safety: the type owns a `redisContext *`, which hiredis does not allow to be used from
/// two threads at once. A connection is only ever used by the one thread that took it out of
/// its ``ConnectionPool`` and is returned (or freed) when that thread is done, so no two
/// threads touch the context concurrently; that is what makes `@unchecked Sendable` hold.
final class HiredisConnection: @unchecked Sendable {
    private var context: UnsafeMutablePointer<redisContext>?
    let endpoint: RedisEndpoint
    /// The timeout for ordinary replies; blocking commands extend it for their own duration.
    let commandTimeout: Duration
    private var currentTimeout: Duration
    /// Script SHA1s known to be loaded on this server connection.
    var loadedScripts: Set<String> = []

    /// Opens, authenticates and selects the database, or throws `connectionLost`.
    init(endpoint: RedisEndpoint, connectTimeout: Duration, commandTimeout: Duration) throws(ChannelLayerError) {
        self.endpoint = endpoint
        self.commandTimeout = commandTimeout
        self.currentTimeout = commandTimeout
        guard let context = redisConnectWithTimeout(endpoint.host, Int32(endpoint.port), Self.timeval(connectTimeout)) else {
            throw ChannelLayerError(.connectionLost, "cannot allocate a Redis context for \(endpoint)")
        }
        if context.pointee.err != 0 {
            let reason = Self.errorString(context)
            redisFree(context)
            throw ChannelLayerError(.connectionLost, "cannot connect to \(endpoint): \(reason)")
        }
        self.context = context
        _ = redisSetTimeout(context, Self.timeval(commandTimeout))
        _ = redisEnableKeepAlive(context)
        if let password = endpoint.password {
            var args: [[UInt8]] = [Array("AUTH".utf8)]
            if let user = endpoint.username { args.append(Array(user.utf8)) }
            args.append(Array(password.utf8))
            if case .error(let e) = try command(args) {
                close()
                throw ChannelLayerError(.connectionLost, "Redis at \(endpoint) refused AUTH: \(e)")
            }
        }
        if endpoint.database != 0 {
            if case .error(let e) = try command(["SELECT", String(endpoint.database)]) {
                close()
                throw ChannelLayerError(.invalidConfiguration, "Redis at \(endpoint) refused SELECT: \(e)")
            }
        }
    }

    deinit { close() }

    var isOpen: Bool { context != nil }

    func close() {
        if let context {
            redisFree(context)
            self.context = nil
        }
    }

    /// True when an idle connection has something to read: the server closed it (a restart)
    /// or sent data nobody asked for. Either way it must not be reused.
    func isStale() -> Bool {
        guard let context else { return true }
        var fds = pollfd(fd: context.pointee.fd, events: Int16(POLLIN), revents: 0)
        let ready = poll(&fds, 1, 0)
        return ready != 0
    }

    func command(_ args: [String]) throws(ChannelLayerError) -> RedisReply {
        try command(args.map { Array($0.utf8) })
    }

    /// Sends one command and reads its reply.
    func command(_ args: [[UInt8]]) throws(ChannelLayerError) -> RedisReply {
        try pipeline([args])[0]
    }

    /// Sends several commands in one write and reads their replies in order: one round trip.
    func pipeline(_ commands: [[[UInt8]]]) throws(ChannelLayerError) -> [RedisReply] {
        guard let context else { throw ChannelLayerError(.connectionLost, "connection to \(endpoint) is closed") }
        for args in commands {
            let status = Self.withArgv(args) { argc, argv, lengths in
                redisAppendCommandArgv(context, argc, argv, lengths)
            }
            if status != REDIS_OK { throw fail("cannot queue a command") }
        }
        var replies: [RedisReply] = []
        replies.reserveCapacity(commands.count)
        for _ in commands {
            var raw: UnsafeMutableRawPointer? = nil
            if redisGetReply(context, &raw) != REDIS_OK || raw == nil {
                throw fail("no reply")
            }
            defer { freeReplyObject(raw) }
            replies.append(RedisReply(raw!.assumingMemoryBound(to: redisReply.self)))
        }
        return replies
    }

    /// Runs a blocking command (BLPOP) whose server-side timeout is `wait`.
    func blockingCommand(_ args: [[UInt8]], wait: Duration) throws(ChannelLayerError) -> RedisReply {
        setTimeout(wait + commandTimeout)
        defer { setTimeout(commandTimeout) }
        return try command(args)
    }

    private func setTimeout(_ timeout: Duration) {
        guard let context, timeout != currentTimeout else { return }
        _ = redisSetTimeout(context, Self.timeval(timeout))
        currentTimeout = timeout
    }

    /// Closes the context (hiredis cannot be used after an I/O error) and makes the error.
    private func fail(_ what: String) -> ChannelLayerError {
        let reason = context.map(Self.errorString) ?? "closed"
        close()
        return ChannelLayerError(.connectionLost, "Redis at \(endpoint): \(what): \(reason)")
    }

    private static func errorString(_ context: UnsafeMutablePointer<redisContext>) -> String {
        withUnsafeBytes(of: context.pointee.errstr) { raw in
            let bytes = raw.prefix { $0 != 0 }
            return String(decoding: bytes, as: UTF8.self)
        }
    }

    private static func timeval(_ duration: Duration) -> Glibc.timeval {
        let (seconds, attoseconds) = duration.components
        return Glibc.timeval(tv_sec: Int(seconds), tv_usec: Int(attoseconds / 1_000_000_000_000))
    }

    /// Lays the arguments out in one buffer and calls `body` with hiredis's argv arrays.
    private static func withArgv<R>(
        _ args: [[UInt8]],
        _ body: (Int32, UnsafeMutablePointer<UnsafePointer<CChar>?>, UnsafePointer<Int>) -> R
    ) -> R {
        let total = args.reduce(0) { $0 + $1.count }
        let storage = UnsafeMutableRawBufferPointer.allocate(byteCount: max(total, 1), alignment: 1)
        defer { storage.deallocate() }
        var pointers: [UnsafePointer<CChar>?] = []
        pointers.reserveCapacity(args.count)
        var lengths: [Int] = []
        lengths.reserveCapacity(args.count)
        var offset = 0
        for arg in args {
            let start = storage.baseAddress! + offset
            arg.withUnsafeBytes { src in
                if let base = src.baseAddress { start.copyMemory(from: base, byteCount: src.count) }
            }
            pointers.append(UnsafePointer(start.assumingMemoryBound(to: CChar.self)))
            lengths.append(arg.count)
            offset += arg.count
        }
        return pointers.withUnsafeMutableBufferPointer { p in
            lengths.withUnsafeBufferPointer { l in body(Int32(args.count), p.baseAddress!, l.baseAddress!) }
        }
    }
}
