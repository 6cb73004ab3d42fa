import Synchronization

/// Which racers of one ``RedisChannelLayer/blockingPopRace(plan:wait:max:)`` are in `BLPOP`
/// (by shard, with their connection's client id), and whether the race is over. Entering and
/// ending are one lock apart, so a racer either sees the race over and does not wait, or is
/// seen by the waker.
final class BlockingRace: Sendable {
    private struct State {
        var over = false
        var waiting: [Int: Int] = [:]
    }
    private let state = Mutex(State())

    /// Records that the racer on `shard` is about to wait; false when the race is already over.
    func enter(shard: Int, clientID: Int) -> Bool {
        state.withLock { state in
            guard !state.over else { return false }
            state.waiting[shard] = clientID
            return true
        }
    }

    /// The racer on `shard` has its reply.
    func leave(shard: Int) { _ = state.withLock { $0.waiting.removeValue(forKey: shard) } }

    /// Ends the race; returns the racers still waiting.
    func end() -> [(shard: Int, id: Int)] {
        state.withLock { state in
            state.over = true
            return state.waiting.map { (shard: $0.key, id: $0.value) }
        }
    }

    /// Whether the racer on `shard` is still waiting.
    func isWaiting(shard: Int) -> Bool { state.withLock { $0.waiting[shard] != nil } }
}
