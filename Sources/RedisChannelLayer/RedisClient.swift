import ASGI
import NIOCore
import NIOPosix
import Synchronization

/// A small general-purpose Redis client, for the parts of the framework that keep their own
/// data in Redis (session stores, the delay server). Like the layer, it is non-blocking on
/// SwiftNIO with hiredis parsing replies; concurrent commands share pipelined connections,
/// and after a Redis restart the next command connects afresh. A command that finds Redis
/// unreachable is retried for `outageRetry` (a restart takes a moment), then fails.
public final class RedisClient: Sendable {
    /// The server it talks to.
    public let endpoint: RedisEndpoint
    private let connections: RedisConnectionPool
    private let isClosed = Atomic<Bool>(false)
    private let outageRetry: Duration

    /// A client for `endpoint`; connects on first use and reconnects after a failure.
    public init(
        endpoint: RedisEndpoint, eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        connectTimeout: Duration = .seconds(2), commandTimeout: Duration = .seconds(5),
        outageRetry: Duration = .seconds(10)
    ) {
        self.endpoint = endpoint
        self.outageRetry = outageRetry
        self.connections = RedisConnectionPool(
            endpoint: endpoint, group: eventLoopGroup, connectTimeout: connectTimeout,
            commandTimeout: commandTimeout)
    }

    /// A client for a `redis://[:password@]host:port/db` URL.
    public convenience init(url: String) throws(ChannelLayerError) {
        self.init(endpoint: try RedisEndpoint(url: url))
    }

    deinit { connections.close() }

    private func connection() async throws(ChannelLayerError) -> RedisConnection {
        guard !isClosed.load(ordering: .relaxed) else { throw ChannelLayerError(.closed, "the Redis client is closed") }
        return try await connections.shared()
    }

    /// Runs one command. A Redis error reply is thrown as a `backendError`.
    @discardableResult
    public func command(_ args: [RedisArgument]) async throws -> RedisReply {
        let reply = try await retrying(for: outageRetry, when: { $0.code == .connectionLost }) {
            try Self.failingIfNotReady(try await connection().command(args), "Redis")
        }
        if case .error(let message) = reply { throw ChannelLayerError.redisRefused(message, "Redis") }
        return reply
    }

    /// Runs one command and returns its reply.
    @discardableResult
    public func command(_ args: RedisArgument...) async throws -> RedisReply {
        try await command(args)
    }

    /// Runs a Lua script (EVALSHA, falling back to EVAL) in one round trip.
    public func run(_ script: LuaScript, keys: [RedisArgument], args: [RedisArgument]) async throws -> RedisReply {
        let reply = try await retrying(for: outageRetry, when: { $0.code == .connectionLost }) {
            try Self.failingIfNotReady(try await script.run(on: connection(), keys: keys, args: args), "Redis script \(script.name)")
        }
        if case .error(let message) = reply { throw ChannelLayerError.redisRefused(message, "Redis script \(script.name)") }
        return reply
    }

    /// `reply`, or the error of a Redis that refused it for a moment (loading its data set
    /// after a restart, say), which the retry above waits out like an outage.
    private static func failingIfNotReady(_ reply: RedisReply, _ what: String) throws(ChannelLayerError) -> RedisReply {
        if case .error(let message) = reply {
            let error = ChannelLayerError.redisRefused(message, what)
            if !error.mayHaveRun { throw error }
        }
        return reply
    }

    /// Closes the connection.
    public func close() async {
        guard !isClosed.exchange(true, ordering: .relaxed) else { return }
        connections.close()
    }
}
