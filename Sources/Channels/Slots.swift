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
        /// Consumers that lent their slot while they waited for their client, and want one
        /// back: served first, in order, before the receive loop takes new messages.
        var returning: Deque<(id: Int, channel: String, continuation: CheckedContinuation<Void, any Error>)> = []
        var nextReturningID = 0
        /// Slots lent out by consumers waiting for their clients.
        var lent = 0
    }
    private let state: Mutex<State>
    /// Every slot, the reserved ones included.
    let total: Int
    /// Slots kept for channels that hold none.
    private let reserve: Int

    /// The most slots lent out at once: as many as there are consumer slots, so that the
    /// consumers in hand (running, or waiting for a client with their slot lent, each holding
    /// what it read so far) are at most twice the slots.
    let lendable: Int

    init(_ count: Int, reserve: Int = 0) {
        state = Mutex(State(free: count + reserve))
        total = count + reserve
        self.reserve = reserve
        lendable = count
    }

    /// Gives back the slot of a consumer that waits for its client, unless ``lendable`` are lent
    /// out already (then it keeps it, and false).
    func lend(_ channel: String) -> Bool {
        let allowed = state.withLock { state -> Bool in
            guard state.lent < lendable else { return false }
            state.lent += 1
            return true
        }
        if allowed { release(channel) }
        return allowed
    }

    /// A lent slot's lender has one again, or is gone.
    func endLend() {
        state.withLock { $0.lent -= 1 }
    }

    var lentCount: Int { state.withLock { $0.lent } }

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

    /// Gives back a slot taken for a message of `channel`: to the first consumer waiting to
    /// return to work, if one is, else to the receive loop.
    func release(_ channel: String) {
        enum Wake {
            case none
            case receiveLoop(CheckedContinuation<Void, Never>)
            case returning(CheckedContinuation<Void, any Error>)
        }
        let wake = state.withLock { state -> Wake in
            state.free += 1
            if let count = state.held[channel] { state.held[channel] = count > 1 ? count - 1 : nil }
            if state.free > 0, let next = state.returning.popFirst() {
                state.free -= 1
                state.held[next.channel, default: 0] += 1
                return .returning(next.continuation)
            }
            guard let waiter = state.waiter, state.free >= waiter.needed else { return .none }
            state.waiter = nil
            return .receiveLoop(waiter.continuation)
        }
        switch wake {
        case .none: break
        case .receiveLoop(let continuation): continuation.resume()
        case .returning(let continuation): continuation.resume()
        }
    }

    /// Takes a slot for `channel` again, for a consumer that lent its own while it waited for
    /// its client: at once when one is free and nobody returned before it, else when one comes
    /// back (before the receive loop gets it). Throws `CancellationError` when cancelled first.
    func reacquire(_ channel: String) async throws {
        let id = state.withLock { state in
            defer { state.nextReturningID += 1 }
            return state.nextReturningID
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                let now = state.withLock { state -> Result<Void, any Error>? in
                    if state.free > 0, state.returning.isEmpty {
                        state.free -= 1
                        state.held[channel, default: 0] += 1
                        return .success(())
                    }
                    // Checked under the lock: a cancellation after this finds the entry.
                    if Task.isCancelled { return .failure(CancellationError()) }
                    state.returning.append((id, channel, continuation))
                    return nil
                }
                if let now { continuation.resume(with: now) }
            }
        } onCancel: {
            let waiter = state.withLock { state -> CheckedContinuation<Void, any Error>? in
                guard let index = state.returning.firstIndex(where: { $0.id == id }) else { return nil }
                return state.returning.remove(at: index).continuation
            }
            waiter?.resume(throwing: CancellationError())
        }
    }
}

/// A slot held by a running consumer, given back once: by the worker when the consumer
/// returns, or earlier by the consumer-timeout watchdog when the consumer ignores its
/// cancellation. While the consumer waits for its client (credit for a streamed response, the
/// next chunk of an upload) it lends the slot out, so a client that does not read or sends
/// slowly holds no slot: slots are for consumers that run.
final class SlotLease: Sendable {
    private enum State: UInt8 {
        case held, lent, given
    }
    let channel: String
    private let slots: Slots
    private let state = Atomic<UInt8>(State.held.rawValue)

    init(channel: String, slots: Slots) {
        self.channel = channel
        self.slots = slots
    }

    /// Gives the slot back, the first time only (a lent slot is already back).
    func giveBack() {
        switch state.exchange(State.given.rawValue, ordering: .relaxed) {
        case State.held.rawValue: slots.release(channel)
        case State.lent.rawValue: slots.endLend()
        default: break
        }
    }

    /// Keeps the slot for good (it goes on to the socket's next messages, and an abandonment
    /// after this gives nothing back); false when it is not held (given back, or lent).
    func keep() -> Bool {
        let was = state.exchange(State.given.rawValue, ordering: .relaxed)
        if was == State.lent.rawValue { slots.endLend() }
        return was == State.held.rawValue
    }

    /// Lets the receive loop (or a returning consumer) use the slot while this one waits, unless
    /// as many slots as there are are lent out already.
    func lend() {
        guard state.compareExchange(expected: State.held.rawValue, desired: State.lent.rawValue, ordering: .relaxed).exchanged else {
            return
        }
        if slots.lend(channel) { return }
        // Refused: kept. Given back meanwhile (it saw it lent and freed nothing): free it now.
        if !state.compareExchange(expected: State.lent.rawValue, desired: State.held.rawValue, ordering: .relaxed).exchanged {
            slots.release(channel)
        }
    }

    /// Takes a slot again after `lend()`, waiting for one to come free. When the lease was
    /// given back meanwhile (the watchdog abandoned the consumer), the slot taken goes back.
    func reclaim() async throws {
        guard state.load(ordering: .relaxed) == State.lent.rawValue else { return }
        try await slots.reacquire(channel)
        if state.compareExchange(expected: State.lent.rawValue, desired: State.held.rawValue, ordering: .relaxed).exchanged {
            slots.endLend()
        } else {
            slots.release(channel)
        }
    }

    /// `body` with the slot lent out for its duration (taken back when it returns).
    func lent<T>(_ body: () async throws -> T) async throws -> T {
        lend()
        let value = try await body()
        try await reclaim()
        return value
    }
}
