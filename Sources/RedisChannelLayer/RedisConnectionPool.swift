import ASGI
import CoreMetrics
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization

/// The connections to one Redis server: a shared connection per event loop that every
/// ordinary command and script of that loop goes through (pipelined by ``RedisConnection``),
/// and idle connections for blocking commands (`BLPOP`), which hold a connection for their
/// whole wait.
///
/// A shared connection per loop, not one for the process: a task running on a loop writes to
/// a connection on the same loop and its reply resumes it there, so a command costs no thread
/// hop (with one connection, every caller on another loop paid two wake-ups per command).
/// Callers off the group's loops use the first loop's connection.
///
/// A dead connection (a Redis restart, a timeout) is replaced on the next call, so service
/// resumes by itself when the server is back. For a Sentinel endpoint, "the server" is the
/// service's master: found through the sentinels, remembered while it answers, and looked up
/// again when a connection to it fails or it turns out to be a replica (after a failover).
final class RedisConnectionPool: Sendable {
    let endpoint: RedisEndpoint
    private let group: any EventLoopGroup
    private let connectTimeout: Duration
    private let commandTimeout: Duration
    private let maxIdle: Int
    private let state: Mutex<State>
    private let opened = Atomic<Int>(0)
    private let metrics: RedisMetrics

    /// The group's loops, in order: lane `i` of the state is loop `i`'s shared connection, and
    /// lane `loops.count + i` loop `i`'s bulk connection (see ``shared(bulk:)``).
    private let loops: [any EventLoop]

    private struct Lane {
        var shared: RedisConnection?
        var connecting: EventLoopFuture<RedisConnection>?
        /// Whether this lane's shared connection was ever opened (the next one is a reconnect).
        var everShared = false
    }

    private struct State {
        var lanes: [Lane]
        var idle: [RedisConnection] = []
        var closed = false
        /// The master a Sentinel endpoint resolved to, while it answers.
        var master: RedisEndpoint?
        /// The sentinel that answered last (asked first next time).
        var sentinel = 0
        /// The TLS context, made on first use.
        var tls: NIOSSLContext?
    }

    init(
        endpoint: RedisEndpoint, group: any EventLoopGroup, connectTimeout: Duration, commandTimeout: Duration,
        maxIdle: Int = 64
    ) {
        self.endpoint = endpoint
        self.group = group
        self.connectTimeout = connectTimeout
        self.commandTimeout = commandTimeout
        self.maxIdle = maxIdle
        self.metrics = RedisMetrics(endpoint: endpoint)
        let loops = Array(group.makeIterator())
        self.loops = loops.isEmpty ? [group.next()] : loops
        self.state = Mutex(State(lanes: Array(repeating: Lane(), count: 2 * self.loops.count)))
    }

    /// The lane of the loop the caller runs on (the first one off the group's loops).
    func currentLane() -> Int {
        if loops.count == 1 { return 0 }
        return loops.firstIndex { $0.inEventLoop } ?? 0
    }

    private func tlsContext() throws(ChannelLayerError) -> NIOSSLContext? {
        guard let options = endpoint.tls else { return nil }
        return try state.withLock { state throws(ChannelLayerError) -> NIOSSLContext in
            if let context = state.tls { return context }
            let context = try options.makeContext()
            state.tls = context
            return context
        }
    }

    /// Where to connect: the endpoint itself, or the master its sentinels name.
    private func target() async throws(ChannelLayerError) -> RedisEndpoint {
        guard case .sentinel(let service, let sentinels) = endpoint.address else { return endpoint }
        let (cached, first) = state.withLock { ($0.master, $0.sentinel) }
        if let cached { return cached }
        let (master, answered) = try await RedisSentinel.resolveMaster(
            of: endpoint, service: service, sentinels: sentinels, startingAt: first, on: group.next(),
            connectTimeout: connectTimeout, commandTimeout: commandTimeout)
        state.withLock {
            $0.master = master
            $0.sentinel = answered
        }
        return master
    }

    /// Connections opened so far (for tests that check nothing leaks).
    var connectionsOpened: Int { opened.load(ordering: .relaxed) }

    private func closedError() -> ChannelLayerError { ChannelLayerError(.closed, "the Redis connection set is closed") }

    private func open(on loop: (any EventLoop)? = nil) async throws(ChannelLayerError) -> RedisConnection {
        let target = try await target()
        do throws(ChannelLayerError) {
            let connection = try await RedisConnection.connect(
                to: target, on: loop ?? group.next(), connectTimeout: connectTimeout,
                commandTimeout: commandTimeout, tls: try tlsContext(), metrics: metrics)
            if case .sentinel(let service, _) = endpoint.address {
                do {
                    try await RedisSentinel.checkIsMaster(connection, service: service)
                } catch {
                    connection.close()
                    throw error
                }
            }
            opened.add(1, ordering: .relaxed)
            return connection
        } catch {
            // Ask the sentinels again next time: this master is gone or demoted.
            if case .sentinel = endpoint.address { state.withLock { if $0.master == target { $0.master = nil } } }
            throw error
        }
    }

    /// The shared connection of the caller's loop, opened (once, however many callers ask at
    /// the same time) if there is none or the last one died.
    ///
    /// With `bulk`, a second shared connection of the loop: large messages (a request body's
    /// megabyte chunks) travel there, so a small one sent meanwhile from the same loop (another
    /// client's request, a WebSocket frame) is not queued behind megabytes in one pipeline.
    /// Sends that must stay in order are made one after another (each awaits its reply), so two
    /// pipelines do not reorder them.
    func shared(bulk: Bool = false) async throws(ChannelLayerError) -> RedisConnection {
        try await shared(lane: currentLane() + (bulk ? loops.count : 0))
    }

    /// Lane `lane`'s shared connection (on the group's loop of index `lane` modulo the loops).
    func shared(lane: Int) async throws(ChannelLayerError) -> RedisConnection {
        enum Step { case ready(RedisConnection), wait(EventLoopFuture<RedisConnection>), closed }
        let step = state.withLock { state -> Step in
            if state.closed { return .closed }
            if let connection = state.lanes[lane].shared, connection.isActive { return .ready(connection) }
            if let connecting = state.lanes[lane].connecting { return .wait(connecting) }
            let loop = loops[lane % loops.count]
            let promise = loop.makePromise(of: RedisConnection.self)
            promise.completeWithTask { try await self.open(on: loop) }
            state.lanes[lane].connecting = promise.futureResult
            promise.futureResult.whenComplete { result in
                let stale = self.state.withLock { state -> RedisConnection? in
                    state.lanes[lane].connecting = nil
                    guard case .success(let connection) = result else { return nil }
                    if state.closed { return connection }
                    if state.lanes[lane].everShared { self.metrics.reconnects.increment() }
                    state.lanes[lane].everShared = true
                    state.lanes[lane].shared = connection
                    return nil
                }
                stale?.close()
                if case .success(let connection) = result { self.forgetMasterWhenClosed(connection) }
            }
            return .wait(promise.futureResult)
        }
        switch step {
        case .ready(let connection): return connection
        case .closed: throw closedError()
        case .wait(let future):
            do {
                return try await future.get()
            } catch let error as ChannelLayerError {
                throw error
            } catch {
                throw ChannelLayerError(.connectionLost, "cannot connect to \(endpoint): \(error)")
            }
        }
    }

    /// For a Sentinel endpoint: when the shared connection to the master dies, the master is
    /// looked up again (it may have been replaced) and the idle connections to it are closed.
    private func forgetMasterWhenClosed(_ connection: RedisConnection) {
        guard case .sentinel = endpoint.address else { return }
        connection.closeFuture.whenComplete { _ in
            let idle = self.state.withLock { state -> [RedisConnection] in
                if state.master?.address == connection.endpoint.address { state.master = nil }
                let stale = state.idle.filter { $0.endpoint.address == connection.endpoint.address }
                state.idle.removeAll { $0.endpoint.address == connection.endpoint.address }
                return stale
            }
            for other in idle { other.close() }
        }
    }

    /// Runs `body` with a connection of its own (for blocking commands).
    func withDedicated<T>(_ body: (RedisConnection) async throws -> T) async throws -> T {
        let candidate = try state.withLock { state throws(ChannelLayerError) -> RedisConnection? in
            if state.closed { throw closedError() }
            while let idle = state.idle.popLast() {
                // After a failover, connections to the old master are not reused.
                if idle.isActive, state.master == nil || state.master?.address == idle.endpoint.address { return idle }
                idle.close()
            }
            return nil
        }
        let connection: RedisConnection
        if let candidate { connection = candidate } else { connection = try await open() }
        do {
            let result = try await body(connection)
            give(connection)
            return result
        } catch {
            give(connection)
            throw error
        }
    }

    private func give(_ connection: RedisConnection) {
        guard connection.isActive else { return }
        let kept = state.withLock { state -> Bool in
            guard !state.closed, state.idle.count < maxIdle else { return false }
            state.idle.append(connection)
            return true
        }
        if !kept { connection.close() }
    }

    /// Closes every connection; later calls fail with `closed`.
    func close() {
        let all = state.withLock { state -> [RedisConnection] in
            state.closed = true
            let all = state.idle + state.lanes.compactMap(\.shared)
            state.idle.removeAll()
            for lane in state.lanes.indices { state.lanes[lane].shared = nil }
            return all
        }
        for connection in all { connection.close() }
    }
}
