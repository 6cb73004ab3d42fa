import ASGI
import Synchronization

/// Idle hiredis connections to one Redis server.
///
/// A connection is taken by one thread for one operation and given back afterwards. A
/// connection that failed is freed, and so is every idle one: after a Redis restart they
/// are all dead, and the next operation should connect afresh rather than find out one by one.
final class ConnectionPool: Sendable {
    let endpoint: RedisEndpoint
    private let connectTimeout: Duration
    private let commandTimeout: Duration
    private let maxIdle: Int
    private let idle = Mutex<[HiredisConnection]>([])
    private let opened = Atomic<Int>(0)

    init(endpoint: RedisEndpoint, connectTimeout: Duration, commandTimeout: Duration, maxIdle: Int = 64) {
        self.endpoint = endpoint
        self.connectTimeout = connectTimeout
        self.commandTimeout = commandTimeout
        self.maxIdle = maxIdle
    }

    /// Connections opened so far (for tests that check nothing leaks).
    var connectionsOpened: Int { opened.load(ordering: .relaxed) }
    var idleCount: Int { idle.withLock { $0.count } }

    /// Runs `body` with a connection. Must be called on a thread that may block.
    func withConnection<T>(_ body: (HiredisConnection) throws -> T) throws -> T {
        let connection = try take()
        do {
            let result = try body(connection)
            give(connection)
            return result
        } catch {
            if connection.isOpen {
                give(connection)
            } else {
                drain()
            }
            throw error
        }
    }

    private func take() throws(ChannelLayerError) -> HiredisConnection {
        while let candidate = idle.withLock({ $0.popLast() }) {
            if !candidate.isStale() { return candidate }
            candidate.close()
        }
        let connection = try HiredisConnection(endpoint: endpoint, connectTimeout: connectTimeout,
                                               commandTimeout: commandTimeout)
        opened.add(1, ordering: .relaxed)
        return connection
    }

    private func give(_ connection: HiredisConnection) {
        guard connection.isOpen else { return }
        let kept = idle.withLock { idle -> Bool in
            guard idle.count < maxIdle else { return false }
            idle.append(connection)
            return true
        }
        if !kept { connection.close() }
    }

    /// Frees every idle connection.
    func drain() {
        let all = idle.withLock { idle -> [HiredisConnection] in
            defer { idle.removeAll() }
            return idle
        }
        for connection in all { connection.close() }
    }
}
