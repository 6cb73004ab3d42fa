import Testing

@testable import ASGI

/// The embedded layer's histories are bounded: a room nobody used for longer than its ttl (and
/// at least ten minutes) is forgotten, so a socket that comes back to it hears of a new epoch
/// (and recovers "incomplete"), while rooms in use keep their offsets. Driven on a synthetic
/// clock: the forgetting runs every 1,000 operations.
@Suite("in-memory history eviction")
struct InMemoryHistoryEvictionTests {
    let keep = HistoryRetention(size: 100, ttl: .seconds(300))

    func append(_ histories: inout InMemoryHistories, _ group: String, at now: ContinuousClock.Instant) -> StreamPosition {
        histories.with(group, now: now) { history in
            history.offset += 1
            history.entries.append((history.offset, ["data": .string("x")], now))
            history.trim(keep, now: now)
            return StreamPosition(offset: history.offset, epoch: history.epoch)
        }
    }

    @Test func anIdleRoomIsForgottenAndComesBackInANewEpoch() {
        var histories = InMemoryHistories()
        let start = ContinuousClock.now
        let idle = append(&histories, "idle", at: start)
        let busyBefore = append(&histories, "busy", at: start)
        // Eleven minutes later, 1,000 operations on the busy room: the idle one is past its ttl
        // and past ten minutes, so the sweep forgets it; the busy one is used, so it stays.
        let later = start + .seconds(660)
        var busy = busyBefore
        for _ in 0..<1_000 { busy = append(&histories, "busy", at: later) }
        #expect(histories.groups["idle"] == nil, "an idle room stays in memory")
        #expect(busy.epoch == busyBefore.epoch && busy.offset == busyBefore.offset + 1_000)
        // The idle room's socket comes back: a new epoch, nothing to recover, not complete.
        let slice = histories.with("idle", now: later) { $0.slice(after: idle) }
        #expect(slice.top.epoch != idle.epoch && slice.top.offset == 0)
        #expect(slice.entries.isEmpty && !slice.complete)
    }

    @Test func aRoomIdleForLessThanTenMinutesIsKept() {
        var histories = InMemoryHistories()
        let start = ContinuousClock.now
        let idle = append(&histories, "idle", at: start)
        // Idle for 9 minutes: past its 5-minute ttl, but rooms stay at least ten minutes.
        let later = start + .seconds(540)
        for _ in 0..<1_000 { _ = append(&histories, "busy", at: later) }
        let slice = histories.with("idle", now: later) { $0.slice(after: StreamPosition(offset: 0, epoch: idle.epoch)) }
        #expect(slice.top == idle)
    }
}
