import ASGI
import DequeModule
import Synchronization

/// Free consumer slots, and how many each channel's messages hold; the receive loop waits
/// (suspended, not polling) while there are none.
final class Slots: Sendable {
    private struct State {
        var free: Int
        /// Slots held per channel (of the message that took them).
        var held: [String: Int] = [:]
        var waiter: (needed: Int, continuation: CheckedContinuation<Void, Never>)?
        var interrupted = false
    }
    private let state: Mutex<State>
    /// Every slot, the reserved ones included.
    let total: Int
    /// Slots kept for channels that hold none.
    private let reserve: Int

    init(_ count: Int, reserve: Int = 0) {
        state = Mutex(State(free: count + reserve))
        total = count + reserve
        self.reserve = reserve
    }

    /// Waits until at least `needed` slots are free and returns how many are, or returns at once
    /// (with what is free, possibly 0) after an `interrupt()`. One caller at a time.
    func waitForFree(atLeast needed: Int = 1) async -> Int {
        while true {
            let (free, interrupted) = state.withLock { state in
                defer { state.interrupted = false }
                return (state.free, state.interrupted)
            }
            if free >= needed || interrupted { return free }
            await withCheckedContinuation { continuation in
                let resumeNow = state.withLock { state -> Bool in
                    if state.free >= needed || state.interrupted { return true }
                    state.waiter = (needed, continuation)
                    return false
                }
                if resumeNow { continuation.resume() }
            }
        }
    }

    /// Ends the current (or next) wait at once.
    func interrupt() {
        let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
            state.interrupted = true
            defer { state.waiter = nil }
            return state.waiter?.continuation
        }
        waiter?.resume()
    }

    /// What the receive loop may take now. The reserved slots are kept for channels that hold
    /// none (one each): from any channel, as many as leave those free; when only those are
    /// left, one, from a channel that holds none. So a channel always gets a slot however busy
    /// the others are (while there are as many reserved slots as channels that could be idle).
    func share(of channels: [String]) -> (channels: [String], max: Int, reservedOnly: Bool) {
        state.withLock { state in
            let idle = channels.filter { state.held[$0] == nil }
            let kept = min(idle.count, reserve)
            if state.free > kept { return (channels, state.free - kept, false) }
            return (idle, 1, true)
        }
    }

    /// Holds a slot for each message of `batch`.
    func take(_ batch: [ReceivedMessage]) {
        state.withLock { state in
            state.free -= batch.count
            for received in batch { state.held[received.channel, default: 0] += 1 }
        }
    }

    var freeCount: Int { state.withLock { $0.free } }

    /// Takes a slot for `channel` without waiting (a chain whose slot was given back while its
    /// consumer ignored its cancellation, and that goes on): free may fall below zero until a
    /// slot comes back.
    func retake(_ channel: String) {
        state.withLock { state in
            state.free -= 1
            state.held[channel, default: 0] += 1
        }
    }

    /// Gives back a slot taken for a message of `channel`.
    func release(_ channel: String) {
        let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
            state.free += 1
            if let count = state.held[channel] { state.held[channel] = count > 1 ? count - 1 : nil }
            guard let waiter = state.waiter, state.free >= waiter.needed else { return nil }
            state.waiter = nil
            return waiter.continuation
        }
        waiter?.resume()
    }
}

/// A slot held by a running consumer, given back once: by the worker when the consumer
/// returns, or earlier by the consumer-timeout watchdog when the consumer ignores its
/// cancellation.
final class SlotLease: Sendable {
    let channel: String
    private let slots: Slots
    private let given = Atomic<Bool>(false)

    init(channel: String, slots: Slots) {
        self.channel = channel
        self.slots = slots
    }

    /// Gives the slot back, the first time only.
    func giveBack() {
        guard given.compareExchange(expected: false, desired: true, ordering: .relaxed).exchanged else { return }
        slots.release(channel)
    }

    /// Keeps the slot for good (it goes on to the socket's next messages, and an abandonment
    /// after this gives nothing back); false when it was given back already.
    func keep() -> Bool {
        given.compareExchange(expected: false, desired: true, ordering: .relaxed).exchanged
    }
}
