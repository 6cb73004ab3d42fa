import ASGI
import Foundation
import Glibc
import TestSupport
import Testing

@testable import RedisChannelLayer

enum LayerKind: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case memory, redis
    var testDescription: String { rawValue }
}

/// A layer with the conformance capacity (5), on keys of its own
/// so tests can run in parallel on one Redis. The expiry tests ask for expiry 1 s and group
/// expiry 2 s; the others keep the defaults so that a slow moment of a loaded machine cannot expire their messages.
func makeLayer(
    _ kind: LayerKind, capacity: Int = 5, expiry: Int = 60, groupExpiry: Int = 86400, channelCapacities: [(String, Int)] = [],
    maxMessageSize: Int? = nil
) throws -> any ChannelLayer {
    switch kind {
    case .memory:
        var configuration = InMemoryChannelLayer.Configuration(
            expiry: .seconds(expiry), groupExpiry: .seconds(groupExpiry), capacity: capacity, channelCapacities: channelCapacities)
        if let maxMessageSize { configuration.maxMessageSize = maxMessageSize }
        return InMemoryChannelLayer(configuration: configuration)
    case .redis:
        var configuration = try RedisChannelLayerConfiguration(urls: [try TestRedis.requireURL()])
        let prefix = TestRedis.uniquePrefix()
        configuration.prefix = prefix
        configuration.statsPrefix = String(prefix.dropLast()) + "-meta:"
        configuration.expiry = .seconds(expiry)
        configuration.groupExpiry = .seconds(groupExpiry)
        configuration.capacity = capacity
        configuration.channelCapacities = channelCapacities
        if let maxMessageSize { configuration.maxMessageSize = maxMessageSize }
        return try RedisChannelLayer(configuration: configuration)
    }
}

func withLayer(
    _ kind: LayerKind, capacity: Int = 5, expiry: Int = 60, groupExpiry: Int = 86400, channelCapacities: [(String, Int)] = [],
    maxMessageSize: Int? = nil,
    _ body: (any ChannelLayer) async throws -> Void
) async throws {
    let layer = try makeLayer(
        kind, capacity: capacity, expiry: expiry, groupExpiry: groupExpiry, channelCapacities: channelCapacities,
        maxMessageSize: maxMessageSize)
    try await flushingAfter(layer) { try await body($0) }
}

/// Runs `body` with `layer`, then flushes and closes it, also when `body` throws.
func flushingAfter<Layer: ChannelLayer>(_ layer: Layer, _ body: (Layer) async throws -> Void) async throws {
    do {
        try await body(layer)
    } catch {
        try? await layer.flush()
        await layer.close()
        throw error
    }
    try? await layer.flush()
    await layer.close()
}

func isChannelFull(_ error: any Error) -> Bool {
    (error as? ChannelLayerError)?.code == .channelFull
}

/// A redis-server of the test's own, on a free port, for restart and sharding tests.
final class RedisServer: @unchecked Sendable {
    let port: Int
    private var pid: pid_t?
    /// More redis-server arguments (TLS ports, a Unix socket, ACL users, `--replicaof`).
    private let extraArguments: [String]
    /// A sentinel runs `redis-sentinel <config file>` instead.
    private let sentinelConfig: String?
    /// The server's working directory, its own: a replica's full sync writes `dump.rdb` there
    /// even with `--save ""`, which must not land in the directory the tests run from.
    private let directory: String

    private init(port: Int, extraArguments: [String] = [], sentinelConfig: String? = nil) throws {
        self.port = port
        self.extraArguments = extraArguments
        self.sentinelConfig = sentinelConfig
        directory = NSTemporaryDirectory() + "channels-redis-\(port)-" + ChannelNames.randomLetters(8)
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    /// Starts a server; the waiting happens on a thread of its own, not the cooperative pool.
    /// `arguments` gets the port the server will listen on, for arguments that name it.
    static func launch(arguments: (Int) -> [String] = { _ in [] }) async throws -> RedisServer {
        try await launch { port in try RedisServer(port: port, extraArguments: arguments(port)) }
    }

    /// Starts a `redis-sentinel` whose config file (written here, in `directory`) is `config`
    /// after the port line.
    static func launchSentinel(directory: String, config: String) async throws -> RedisServer {
        try await launch { port in
            let path = "\(directory)/sentinel-\(port).conf"
            FileManager.default.createFile(
                atPath: path, contents: Data("port \(port)\nbind 127.0.0.1\ndaemonize no\nlogfile \"\"\nloglevel warning\n\(config)\n".utf8)
            )
            return try RedisServer(port: port, sentinelConfig: path)
        }
    }

    private static func launch(_ make: (Int) throws -> RedisServer) async throws -> RedisServer {
        // A free port can be taken by someone else between our check and redis-server's
        // bind; then the server exits at once and another port is tried.
        var lastError: (any Error)?
        for _ in 0..<3 {
            let server = try make(try freePort())
            do {
                try await server.restart()
                return server
            } catch {
                lastError = error
                await server.shutdown()
            }
        }
        throw lastError!
    }

    /// Starts the server again; with `whileLoading`, returns once it answers at all, which may be
    /// `-LOADING` while it reads its data set back.
    func restart(whileLoading: Bool = false) async throws {
        try await offPool { try self.start(whileLoading: whileLoading) }
    }

    func shutdown() async {
        try? await offPool { self.stop() }
    }

    /// SIGKILL, as a crash or a lost machine: no shutdown, no save.
    func kill9() async {
        try? await offPool { self.stop(signal: SIGKILL) }
    }

    private func offPool<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            Thread.detachNewThread { continuation.resume(with: Result { try body() }) }
        }
    }

    var url: String { "redis://127.0.0.1:\(port)/0" }

    private func start(whileLoading: Bool = false) throws {
        // A restart starts empty, as a server without persistence does: no replica's sync file.
        try? FileManager.default.removeItem(atPath: directory + "/dump.rdb")
        var arguments =
            [
                try Self.redisServerPath(), "--port", "\(port)", "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning", "--logfile", "/dev/null",
                "--dir", directory,
            ] + extraArguments
        if let sentinelConfig { arguments = [try Self.redisServerPath(), sentinelConfig, "--sentinel"] }
        var child: pid_t = 0
        let status = spawn(arguments, pid: &child, actions: nil)
        guard status == 0 else {
            throw ChannelLayerError(.invalidConfiguration, "cannot start redis-server: error \(status)")
        }
        pid = child
        try waitUntilReady(whileLoading: whileLoading)
    }

    private func stop(signal: Int32 = SIGTERM) {
        guard let pid else { return }
        kill(pid, signal)
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        self.pid = nil
    }

    deinit {
        stop()
        try? FileManager.default.removeItem(atPath: directory)
    }

    private func waitUntilReady(whileLoading: Bool = false) throws {
        // Waiting for a child process to listen: each try is a connect, not a poll of state.
        for _ in 0..<500 {
            if let pid {
                var status: Int32 = 0
                if waitpid(pid, &status, WNOHANG) == pid {
                    self.pid = nil
                    throw ChannelLayerError(.connectionLost, "redis-server on port \(port) exited at start (status \(status))")
                }
            }
            if let connection = try? HiredisConnection(
                endpoint: RedisEndpoint(port: port),
                connectTimeout: .seconds(1), commandTimeout: .seconds(1)),
                let pong = try? connection.command(["PING"]),
                pong == .status("PONG") || pong.errorMessage?.hasPrefix("NOAUTH") == true  // up, with a password
                    || (whileLoading && pong.errorMessage?.hasPrefix("LOADING") == true)
            {
                return
            }
            usleep(20_000)
        }
        throw ChannelLayerError(.connectionLost, "redis-server on port \(port) did not start")
    }

    static func redisServerPath() throws -> String {
        for candidate in ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
        where FileManager.default.isExecutableFile(atPath: candidate) {
            return candidate
        }
        throw ChannelLayerError(.invalidConfiguration, "redis-server is not installed: run scripts/test.sh")
    }

    static func freePort() throws -> Int {
        let (fd, port) = try boundPort()
        close(fd)
        return port
    }

    /// A port bound but not listening: connections to it are refused, and no other test can
    /// take it while the socket stays open. Close the descriptor when done.
    static func boundPort() throws -> (Int32, Int) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        // A sockaddr_in as bytes (family, port 0, 127.0.0.1), not as the C struct: which
        // module the struct comes from depends on import order, and the build must not.
        var address = [UInt8](repeating: 0, count: 16)
        withUnsafeBytes(of: sa_family_t(AF_INET)) { family in
            for (index, byte) in family.enumerated() { address[index] = byte }
        }
        address[4] = 127
        address[7] = 1
        var length = socklen_t(address.count)
        let bound = address.withUnsafeMutableBytes { raw -> Int32 in
            let pointer = raw.baseAddress!.assumingMemoryBound(to: sockaddr.self)
            guard bind(fd, pointer, length) == 0 else { return -1 }
            return getsockname(fd, pointer, &length)
        }
        guard bound == 0 else {
            close(fd)
            throw ChannelLayerError(.invalidConfiguration, "no free port")
        }
        return (fd, Int(address[2]) << 8 | Int(address[3]))
    }
}

/// Runs a program to completion and returns its exit status and standard output.
func runProgram(_ arguments: [String]) async throws -> (status: Int32, output: String) {
    try await onOwnThread {
        var pipe: [Int32] = [0, 0]
        guard Glibc.pipe(&pipe) == 0 else { throw ChannelLayerError(.invalidConfiguration, "pipe failed") }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, pipe[1], 1)
        posix_spawn_file_actions_addclose(&actions, pipe[0])
        var child: pid_t = 0
        let spawned = spawn(arguments, pid: &child, actions: &actions)
        close(pipe[1])
        defer { close(pipe[0]) }
        guard spawned == 0 else {
            throw ChannelLayerError(.invalidConfiguration, "cannot run \(arguments[0]): error \(spawned)")
        }
        var output: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(pipe[0], &buffer, buffer.count)
            if n <= 0 { break }
            output += buffer[0..<n]
        }
        var status: Int32 = 0
        waitpid(child, &status, 0)
        return ((status >> 8) & 0xff, String(decoding: output, as: UTF8.self))
    }
}

/// Starts a program with posix_spawn (Foundation's Process.waitUntilExit hangs off the main
/// thread on Linux). The child gets an empty signal mask: it must not inherit the signals this
/// thread blocks, or SIGTERM never reaches it. Returns posix_spawn's status.
///
/// The child keeps only its standard descriptors (and what `actions` puts there): NIO accepts
/// connections without close-on-exec, so a Redis started while another test's server held a
/// connection kept that connection open in the Redis process after the server closed it (the
/// client saw no end until that Redis stopped: a front-door test waited 30 s for a close in CI).
func spawn(_ arguments: [String], pid: inout pid_t, actions: UnsafeMutablePointer<posix_spawn_file_actions_t>?) -> Int32 {
    var ownActions = posix_spawn_file_actions_t()
    if actions == nil { posix_spawn_file_actions_init(&ownActions) }
    defer { if actions == nil { posix_spawn_file_actions_destroy(&ownActions) } }
    var attributes = posix_spawnattr_t()
    posix_spawnattr_init(&attributes)
    defer { posix_spawnattr_destroy(&attributes) }
    var emptyMask = sigset_t()
    sigemptyset(&emptyMask)
    posix_spawnattr_setsigmask(&attributes, &emptyMask)
    posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK))
    var argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
    defer { for pointer in argv { free(pointer) } }
    return withUnsafeMutablePointer(to: &ownActions) { own in
        let chosen = actions ?? own
        closeFromThree(chosen)
        return posix_spawn(&pid, arguments[0], chosen, &attributes, &argv, environ)
    }
}

/// `posix_spawn_file_actions_addclosefrom_np(actions, 3)` (glibc 2.34; not in Swift's Glibc
/// module, so found at run time). Without it no test can trust a close it waits for.
private func closeFromThree(_ actions: UnsafeMutablePointer<posix_spawn_file_actions_t>) {
    typealias AddCloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, CInt) -> CInt
    // nil: RTLD_DEFAULT on glibc.
    guard let symbol = dlsym(nil, "posix_spawn_file_actions_addclosefrom_np") else {
        fatalError("posix_spawn_file_actions_addclosefrom_np is missing (glibc older than 2.34)")
    }
    let status = unsafeBitCast(symbol, to: AddCloseFrom.self)(actions, 3)
    precondition(status == 0, "posix_spawn_file_actions_addclosefrom_np failed: \(status)")
}
