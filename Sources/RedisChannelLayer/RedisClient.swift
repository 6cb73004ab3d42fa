import ASGI
import NIOPosix
import Synchronization

/// A small general-purpose Redis client on hiredis, for the parts of the framework that keep
/// their own data in Redis (session stores, the delay server). Like the layer, it runs every
/// command on threads of its own, never on Swift's cooperative pool, and reconnects after a
/// Redis restart on the next command.
public final class RedisClient: Sendable {
    public let endpoint: RedisEndpoint
    private let pool: ConnectionPool
    private let threads: NIOThreadPool
    private let isClosed = Atomic<Bool>(false)

    public init(endpoint: RedisEndpoint, threads: Int = 2, connectTimeout: Duration = .seconds(2),
                commandTimeout: Duration = .seconds(5)) {
        self.endpoint = endpoint
        self.pool = ConnectionPool(endpoint: endpoint, connectTimeout: connectTimeout, commandTimeout: commandTimeout)
        self.threads = NIOThreadPool(numberOfThreads: max(1, threads))
        self.threads.start()
    }

    /// A client for a `redis://[:password@]host:port/db` URL.
    public convenience init(url: String, threads: Int = 2) throws(ChannelLayerError) {
        self.init(endpoint: try RedisEndpoint(url: url), threads: threads)
    }

    deinit {
        if !isClosed.load(ordering: .relaxed) { try? threads.syncShutdownGracefully() }
    }

    private func run<T: Sendable>(_ body: @escaping @Sendable (HiredisConnection) throws -> T) async throws -> T {
        guard !isClosed.load(ordering: .relaxed) else { throw ChannelLayerError(.closed, "the Redis client is closed") }
        do {
            return try await threads.runIfActive { [pool] in try pool.withConnection(body) }
        } catch is NIOThreadPoolError.ThreadPoolInactive {
            throw ChannelLayerError(.closed, "the Redis client is closed")
        }
    }

    /// Runs one command. A Redis error reply is thrown as a `backendError`.
    @discardableResult
    public func command(_ args: [[UInt8]]) async throws -> RedisReply {
        let reply = try await run { try $0.command(args) }
        if case .error(let message) = reply { throw ChannelLayerError(.backendError, "Redis: \(message)") }
        return reply
    }

    @discardableResult
    public func command(_ args: String...) async throws -> RedisReply {
        try await command(args.map { Array($0.utf8) })
    }

    /// Runs a Lua script (EVALSHA, falling back to EVAL) in one round trip.
    public func run(_ script: LuaScript, keys: [[UInt8]], args: [[UInt8]]) async throws -> RedisReply {
        let reply = try await run { try script.run(on: $0, keys: keys, args: args) }
        if case .error(let message) = reply { throw ChannelLayerError(.backendError, "Redis script \(script.name): \(message)") }
        return reply
    }

    public func close() async {
        guard !isClosed.exchange(true, ordering: .relaxed) else { return }
        try? await threads.shutdownGracefully()
        pool.drain()
    }
}
