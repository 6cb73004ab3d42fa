import ASGI

/// Puts the publications of the groups a socket follows in offset order, once each: what a
/// recovery read from the history and what arrived live meanwhile are merged without
/// duplicates; a publication that overtook an earlier one (two publishers at once) waits for it
/// a moment, then the gap is filled from the history. Pure: the session does the reads, the
/// timers and the writes.
struct PublicationSequencer {
    enum Action: Equatable {
        /// Write these, in order.
        case deliver([Message])
        /// Write these, in order; a gap is held after them (arm the gap timer).
        case deliverThenHold([Message])
        /// Held: a gap before it. `startTimer` when the session should arm the gap timer.
        case hold(startTimer: Bool)
        /// Already delivered (or older than where the socket started): not written again.
        case duplicate
    }

    private enum Follow {
        /// Waiting for the history read; live publications are kept until it is done.
        case recovering(buffer: [(offset: UInt64, epoch: String, message: Message)])
        /// Delivered up to `next - 1`; `held` came early.
        case following(epoch: String, next: UInt64, held: [UInt64: Message])
    }

    private var groups: [String: Follow] = [:]
    /// The group last stepped in order, held in this struct itself: its `groups` entry is
    /// `.following(epoch, <stale next>, held: [:])` and `next` here is the one due. A hand-over
    /// of a publication to 500 members steps 500 sequencers; each `groups` look-up was a cache
    /// miss on the socket's own dictionary storage (4.7 % of a server's samples in the chat
    /// example's 1,000-member run, nearly all on its first load). Every other change first
    /// puts it back (``settle()``); reads see it through ``state(_:)``.
    private var inOrder: (group: String, epoch: String, next: UInt64)?

    /// Puts ``inOrder`` back into `groups`.
    private mutating func settle() {
        guard let inOrder else { return }
        self.inOrder = nil
        groups[inOrder.group] = .following(epoch: inOrder.epoch, next: inOrder.next, held: [:])
    }

    /// `group`'s state, with ``inOrder`` applied.
    private func state(_ group: String) -> Follow? {
        if let inOrder, inOrder.group == group { return .following(epoch: inOrder.epoch, next: inOrder.next, held: [:]) }
        return groups[group]
    }
    /// Per group, the epochs it followed before the current one (its history was lost and began
    /// again), the last few: their late publications pass through and never switch it back.
    private var leftEpochs: [String: [String]] = [:]
    /// Per group, the last offsets given up on (skipped: not in the history when it was read,
    /// or the history began again), 64 at most: one that comes live after all is written,
    /// late, not dropped as a duplicate.
    private var givenUp: [String: Set<UInt64>] = [:]

    /// Skips (counts) the offsets of `range`, remembering the last of them.
    private mutating func giveUp(_ group: String, _ range: Range<UInt64>) {
        guard !range.isEmpty else { return }
        skipped += range.count
        var offsets = givenUp[group] ?? []
        for offset in max(range.lowerBound, range.upperBound > 64 ? range.upperBound - 64 : 0)..<range.upperBound {
            if offsets.count >= 64, let oldest = offsets.min() { offsets.remove(oldest) }
            offsets.insert(offset)
        }
        givenUp[group] = offsets
    }
    /// Publications written as duplicates were not; gaps skipped after the history could not fill them.
    private(set) var duplicates = 0
    private(set) var skipped = 0

    /// Whether publications of `group` go through the sequencer.
    func follows(_ group: String) -> Bool { groups[group] != nil }

    /// A recovery begins: live publications of `group` wait for it.
    mutating func startRecovery(_ group: String) {
        settle()
        groups[group] = .recovering(buffer: [])
    }

    /// The history read is done: everything up to `top` was delivered from it (or is lost, and
    /// the socket was told). Returns the live publications kept meanwhile that come after it,
    /// in order, and whether a gap is left (arm the timer).
    mutating func recovered(_ group: String, top: StreamPosition) -> (deliver: [Message], gap: Bool) {
        settle()
        guard case .recovering(let buffer)? = groups[group] else { return ([], false) }
        groups[group] = .following(epoch: top.epoch, next: top.offset + 1, held: [:])
        var out: [Message] = []
        var gap = false
        for item in buffer.sorted(by: { $0.offset < $1.offset }) {
            switch live(group, offset: item.offset, epoch: item.epoch, message: item.message) {
            case .deliver(let messages): out += messages
            case .deliverThenHold(let messages):
                out += messages
                gap = true
            case .hold: gap = true
            case .duplicate: break
            }
        }
        return (out, gap)
    }

    /// What ``step(_:offset:epoch:message:)`` found.
    enum Step: Equatable {
        /// The group is not followed: the publication is not the sequencer's.
        case notFollowed
        /// The publication is the one due and nothing waits behind it: write it alone.
        case next
        /// Anything else: what ``live(_:offset:epoch:message:)`` says.
        case other(Action)
    }

    /// A live publication of a group the socket may follow, with the common case (the one
    /// due, nothing held) answered without an array, and for the group last stepped in order
    /// without a look-up (``inOrder``): a hand-over of one publication to 500 members does this
    /// 500 times.
    mutating func step(_ group: String, offset: UInt64, epoch: String, message: Message) -> Step {
        // Interned names: the same storage compares at once.
        if inOrder?.group == group, inOrder?.next == offset, inOrder?.epoch == epoch {
            inOrder!.next += 1
            return .next
        }
        guard inOrder?.group != group else { return .other(live(group, offset: offset, epoch: epoch, message: message)) }
        guard let index = groups.index(forKey: group) else { return .notFollowed }
        if case .following(let current, let next, let held) = groups.values[index], offset == next, held.isEmpty, epoch == current {
            settle()  // another group's
            inOrder = (group, current, next + 1)
            return .next
        }
        return .other(live(group, offset: offset, epoch: epoch, message: message))
    }

    /// Where a followed group's publications stand: it changes with every publication
    /// delivered or held (a tail check compares it with the last one's to tell a quiet group);
    /// nil while recovering or not followed.
    func progress(_ group: String) -> Progress? {
        guard case .following(_, let next, let held)? = state(group) else { return nil }
        return Progress(next: next, held: held.count)
    }

    struct Progress: Equatable {
        var next: UInt64
        var held: Int
    }

    /// A live publication.
    mutating func live(_ group: String, offset: UInt64, epoch: String, message: Message) -> Action {
        settle()
        switch groups[group] {
        case nil:
            return .deliver([message])
        case .recovering(var buffer)?:
            buffer.append((offset, epoch, message))
            groups[group] = .recovering(buffer: buffer)
            return .hold(startTimer: false)
        case .following(let current, var next, var held)?:
            if epoch != current {
                // A late publication of a history this socket already left (published before the
                // loss, overtaken by ones of the new history): written, and nothing switches back
                // (switching on every straggler, the two epochs' offsets took turns as `next`, and
                // the new history's publications below it were dropped as duplicates).
                if leftEpochs[group]?.contains(epoch) == true { return .deliver([message]) }
                // The history was lost and began again, at offset 1: follow the new one from its
                // start (the first of it to come may have overtaken the ones before it, which
                // would otherwise be dropped as duplicates when they come); what was held for a
                // gap of the old one goes out first (that gap is never filled now).
                leftEpochs[group, default: []].append(current)
                if leftEpochs[group]!.count > 4 { leftEpochs[group]!.removeFirst() }
                let before = held.sorted { $0.key < $1.key }.map(\.value)
                if offset <= 1 {
                    groups[group] = .following(epoch: epoch, next: offset + 1, held: [:])
                    return .deliver(before + [message])
                }
                groups[group] = .following(epoch: epoch, next: 1, held: [offset: message])
                return before.isEmpty ? .hold(startTimer: true) : .deliverThenHold(before)
            }
            if offset < next || held[offset] != nil {
                if offset < next, givenUp[group]?.remove(offset) != nil {
                    // Skipped by a gap fill that could not find it (the history lost, say): late, not lost.
                    return .deliver([message])
                }
                duplicates += 1
                return .duplicate
            }
            if offset > next {
                let first = held.isEmpty
                held[offset] = message
                groups[group] = .following(epoch: epoch, next: next, held: held)
                return .hold(startTimer: first)
            }
            var out = [message]
            next += 1
            while let following = held.removeValue(forKey: next) {
                out.append(following)
                next += 1
            }
            groups[group] = .following(epoch: epoch, next: next, held: held)
            return .deliver(out)
        }
    }

    /// Where a gap fill should read from: the last offset delivered, when publications are held.
    func gapStart(_ group: String) -> StreamPosition? {
        guard case .following(let epoch, let next, let held)? = state(group), !held.isEmpty else { return nil }
        return StreamPosition(offset: next - 1, epoch: epoch)
    }

    /// The gap timer fired and the history was read: `found` fills what it can; what it cannot
    /// is skipped (counted), up to `through`, the history's last offset when it was read (nil:
    /// any, the history began again). An offset past `through` was not in the history yet when
    /// the read ran (the read may be older than the gap: held publications came meanwhile) and
    /// is not skipped: it stays a gap, and `gapLeft` asks for the timer again. Returns
    /// everything now deliverable, in order.
    mutating func fillGap(
        _ group: String, found: [(offset: UInt64, message: Message)], through top: UInt64? = nil
    ) -> (messages: [Message], gapLeft: Bool) {
        settle()
        guard case .following(let epoch, var next, var held)? = groups[group], let last = held.keys.max() else { return ([], false) }
        for entry in found where entry.offset >= next && entry.offset <= last && held[entry.offset] == nil {
            held[entry.offset] = entry.message
        }
        var out: [Message] = []
        while next <= last {
            if let message = held.removeValue(forKey: next) {
                out.append(message)
            } else if let top, next > top {
                break
            } else {
                giveUp(group, next..<(next + 1))
            }
            next += 1
        }
        groups[group] = .following(epoch: epoch, next: next, held: held)
        return (out, !held.isEmpty)
    }

    /// Where a tail read should start when the history's `top` is past what was delivered
    /// (publications sent to the group that never reached this socket), else nil. A top of
    /// another epoch (the history began again, and none of the new one reached this socket: a
    /// quiet group would never show it) is read from its start; one of an epoch this socket
    /// already left is an old top, not a new history.
    func behind(_ group: String, top: StreamPosition) -> StreamPosition? {
        guard case .following(let epoch, let next, _)? = state(group) else { return nil }
        if top.epoch != epoch {
            guard leftEpochs[group]?.contains(top.epoch) != true, top.offset > 0 else { return nil }
            return StreamPosition(offset: 0, epoch: top.epoch)
        }
        guard top.offset >= next else { return nil }
        return StreamPosition(offset: next - 1, epoch: epoch)
    }

    /// A tail read from `start` (``behind(_:top:)``) found `found` (history entries after it):
    /// returns them, with what was held behind them, in order. Entries the history no longer
    /// has are skipped (counted). A read of a new epoch switches to it, as a live publication of
    /// it would (what was held of the old one goes out first).
    mutating func fillTail(_ group: String, from start: StreamPosition, found: [(offset: UInt64, message: Message)]) -> [Message] {
        settle()
        guard case .following(var epoch, var next, var held)? = groups[group] else { return [] }
        var out: [Message] = []
        if start.epoch != epoch {
            guard leftEpochs[group]?.contains(start.epoch) != true else { return [] }
            leftEpochs[group, default: []].append(epoch)
            if leftEpochs[group]!.count > 4 { leftEpochs[group]!.removeFirst() }
            out = held.sorted { $0.key < $1.key }.map(\.value)
            (epoch, next, held) = (start.epoch, 1, [:])
        }
        for entry in found where entry.offset >= next && held[entry.offset] == nil {
            held[entry.offset] = entry.message
        }
        if let first = found.map(\.offset).min(), first > next {
            giveUp(group, next..<first)
            next = first
        }
        while let message = held.removeValue(forKey: next) {
            out.append(message)
            next += 1
        }
        groups[group] = .following(epoch: epoch, next: next, held: held)
        return out
    }

    /// Stops following `group` (what was held is dropped).
    mutating func stop(_ group: String) {
        settle()
        groups.removeValue(forKey: group)
        leftEpochs.removeValue(forKey: group)
        givenUp.removeValue(forKey: group)
    }
}
