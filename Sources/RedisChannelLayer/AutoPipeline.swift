import ASGI
import DequeModule
import NIOPosix
import Synchronization

/// Automatic pipelining of concurrent script calls to one Redis server.
///
/// Callers queue a call and suspend. One drain loop at a time (on the layer's command threads)
/// takes everything queued, writes it to one connection in a single write, reads the replies
/// in order and resumes each caller. A lone caller pays one round trip as before; a hundred
/// concurrent callers share a few round trips instead of queueing behind each other.
final class AutoPipeline: Sendable {
    struct Call: Sendable {
        let script: LuaScript
        let keys: [[UInt8]]
        let args: [[UInt8]]
        let continuation: CheckedContinuation<RedisReply, any Error>
    }

    private struct State {
        var queue = Deque<Call>()
        var drainers = 0
    }

    private let pool: ConnectionPool
    private let threads: NIOThreadPool
    private let state = Mutex(State())
    private let maxBatch: Int
    private let maxDrainers: Int

    /// - Parameter maxDrainers: drain loops (each with its own connection) that may run at
    ///   once: while one waits for its replies, the next batch is already on the wire.
    init(pool: ConnectionPool, threads: NIOThreadPool, maxBatch: Int = 256, maxDrainers: Int = 2) {
        self.pool = pool
        self.threads = threads
        self.maxBatch = maxBatch
        self.maxDrainers = max(1, maxDrainers)
    }

    func run(_ script: LuaScript, keys: [[UInt8]], args: [[UInt8]]) async throws -> RedisReply {
        try await withCheckedThrowingContinuation { continuation in
            let startDrain = state.withLock { state -> Bool in
                state.queue.append(Call(script: script, keys: keys, args: args, continuation: continuation))
                guard state.drainers < maxDrainers else { return false }
                state.drainers += 1
                return true
            }
            if startDrain {
                threads.submit { [self] threadState in
                    guard case .active = threadState else {
                        failAll(ChannelLayerError(.closed, "the Redis layer is closed"))
                        return
                    }
                    drain()
                }
            }
        }
    }

    private func takeBatch() -> [Call]? {
        state.withLock { state -> [Call]? in
            guard !state.queue.isEmpty else {
                state.drainers -= 1
                return nil
            }
            let count = min(maxBatch, state.queue.count)
            defer { state.queue.removeFirst(count) }
            return Array(state.queue.prefix(count))
        }
    }

    private func failAll(_ error: any Error) {
        let calls = state.withLock { state -> [Call] in
            defer { state.queue.removeAll(); state.drainers = 0 }
            return Array(state.queue)
        }
        for call in calls { call.continuation.resume(throwing: error) }
    }

    /// Runs on a command thread until the queue is empty.
    private func drain() {
        while let batch = takeBatch() {
            do {
                let replies = try pool.withConnection { connection -> [RedisReply] in
                    for call in batch where call.script.knownSHA == nil { try call.script.load(on: connection) }
                    var replies = try connection.pipeline(batch.map { $0.script.evalshaCommand(keys: $0.keys, args: $0.args) })
                    // A server that forgot a script (restarted, SCRIPT FLUSH) answers NOSCRIPT:
                    // those calls run again with the source.
                    for (index, reply) in replies.enumerated() {
                        if case .error(let message) = reply, message.hasPrefix("NOSCRIPT") {
                            replies[index] = try batch[index].script.run(on: connection, keys: batch[index].keys,
                                                                         args: batch[index].args, forceSource: true)
                        }
                    }
                    return replies
                }
                for (call, reply) in zip(batch, replies) { call.continuation.resume(returning: reply) }
            } catch {
                for call in batch { call.continuation.resume(throwing: error) }
            }
        }
    }
}
