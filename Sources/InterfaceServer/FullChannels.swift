import DequeModule
import NIOCore
import Synchronization

/// The channels this server found full, and the sends waiting in line for them.
///
/// A sender whose message a channel refuses as full retries it after growing pauses: it
/// probes the channel. Before, every other connection with a message for that channel tried
/// too, and went on retrying on pauses of its own: in a reconnect storm of 5,000 sockets the
/// servers made 63,000 refused sends (a Redis script each) for 15,000 connects. Now a sender
/// with a message for a channel held full waits in line here instead of trying:
///
/// - one sender at a time probes the channel (retries it every 10 to 100 ms);
/// - every send to that channel that gets through lets the next two in line go (a channel with
///   room fills again quickly; one without refuses one of them: it probes, if nobody does, or
///   goes back to the head of the line);
/// - when the prober stops (it gave up, or its connection went), the next one in line goes;
/// - a sender in line gives up at the same bound as a prober (`channelFullTimeout`: 1013 or
///   503, the connection decides), and reads nothing from its client meanwhile.
///
/// The line is first come, first served.
final class FullChannels: Sendable {
    private struct Held {
        var probers = 0
        /// Waiting senders' ids in arrival order (an id missing from `turns` left the line).
        var line = Deque<UInt64>()
        var turns: [UInt64: CheckedContinuation<Bool, Never>] = [:]

        var isEmpty: Bool { probers == 0 && turns.isEmpty }

        /// Takes the next `count` waiting senders out of the line.
        mutating func next(_ count: Int) -> [CheckedContinuation<Bool, Never>] {
            var out: [CheckedContinuation<Bool, Never>] = []
            while out.count < count, let id = line.popFirst() {
                if let turn = turns.removeValue(forKey: id) { out.append(turn) }
            }
            return out
        }
    }

    private struct State {
        var held: [String: Held] = [:]
        var nextID: UInt64 = 0
    }

    private let state = Mutex(State())
    /// How many channels are held: a send looks at the table only when some are.
    private let heldCount = Atomic<Int>(0)

    /// Whether a send to `channel` waits in line.
    func isHeld(_ channel: String) -> Bool {
        heldCount.load(ordering: .relaxed) > 0 && state.withLock { $0.held[channel] != nil }
    }

    /// Senders in line for `channel`.
    func waiting(_ channel: String) -> Int { state.withLock { $0.held[channel]?.turns.count ?? 0 } }

    /// A sender found `channel` full: true when it is to probe it (retry on its own pauses)
    /// until its send gets through or it stops, false when another sender does (it waits in
    /// line, at the head). Later senders wait in line.
    func startProbing(_ channel: String) -> Bool {
        state.withLock { state in
            if state.held[channel] == nil {
                state.held[channel] = Held()
                heldCount.add(1, ordering: .relaxed)
            }
            guard state.held[channel]?.probers == 0 else { return false }
            state.held[channel]?.probers = 1
            return true
        }
    }

    /// A prober stopped: its send got through (`accepted`: the next two in line go), or it
    /// gave up, or its connection went (the next one in line goes when no prober is left).
    func stopProbing(_ channel: String, accepted: Bool) {
        let turns = update(channel) { held in
            held.probers = 0
            return held.next(accepted ? 2 : 1)
        }
        for turn in turns { turn.resume(returning: true) }
    }

    /// A sender let go from the line will not send after all (its message was dropped, its
    /// connection went): the next one in line goes, unless a sender probes the channel.
    func passTurn(_ channel: String) {
        let turns = update(channel) { held in held.probers == 0 ? held.next(1) : [] }
        for turn in turns { turn.resume(returning: true) }
    }

    /// A send to `channel` got through (not a prober's: one let go from the line, or one on its
    /// way before the channel was held): the next two in line go.
    func accepted(_ channel: String) {
        guard heldCount.load(ordering: .relaxed) > 0 else { return }
        let turns = update(channel) { $0.next(2) }
        for turn in turns { turn.resume(returning: true) }
    }

    /// Waits in line to send to `channel` (at its head: a sender that had its turn and was
    /// refused): true when it is this sender's turn (or the channel is no longer held), false
    /// at `deadline` or when cancelled.
    func waitTurn(_ channel: String, until deadline: NIODeadline, on loop: any EventLoop, atHead: Bool = false) async -> Bool {
        let id = state.withLock { state in
            state.nextID &+= 1
            return state.nextID
        }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (turn: CheckedContinuation<Bool, Never>) in
                let queued = state.withLock { state -> Bool? in
                    if Task.isCancelled { return nil }
                    guard state.held[channel] != nil else { return false }
                    if atHead { state.held[channel]?.line.prepend(id) } else { state.held[channel]?.line.append(id) }
                    state.held[channel]?.turns[id] = turn
                    return true
                }
                switch queued {
                case nil: turn.resume(returning: false)
                case false?: turn.resume(returning: true)
                case true?:
                    loop.scheduleTask(deadline: deadline) { self.leave(channel, id: id) }
                }
            }
        } onCancel: {
            self.leave(channel, id: id)
        }
    }

    /// Takes a sender out of the line (its deadline came, or it was cancelled), if still in it.
    private func leave(_ channel: String, id: UInt64) {
        let left = update(channel) { held in held.turns.removeValue(forKey: id).map { [$0] } ?? [] }
        for turn in left { turn.resume(returning: false) }
    }

    /// Changes `channel`'s entry (if held) in place, drops it once nobody probes or waits.
    /// In place: a copy of the entry, changed and stored back, copied its line and its turns
    /// (each still shared with the table while changed) at every change: O(line) a change,
    /// O(line²) a storm, and in a 9,500-socket close storm a third of the server's CPU.
    private func update(
        _ channel: String, _ change: (inout Held) -> [CheckedContinuation<Bool, Never>]
    ) -> [CheckedContinuation<Bool, Never>] {
        state.withLock { state in
            guard state.held[channel] != nil else { return [] }
            let out = change(&state.held[channel]!)
            if state.held[channel]!.isEmpty {
                state.held[channel] = nil
                heldCount.add(-1, ordering: .relaxed)
            }
            return out
        }
    }
}
