import ASGI
import Testing

@testable import InterfaceServer

/// The merge of recovered and live publications, without sockets.
@Suite("publication sequencer")
struct PublicationSequencerTests {
    private func message(_ offset: UInt64) -> Message { ["text": .string("m\(offset)")] }
    private func texts(_ messages: [Message]) -> [String] { messages.compactMap { $0["text"]?.stringValue } }
    private func delivered(_ action: PublicationSequencer.Action) -> [String] {
        if case .deliver(let messages) = action { return texts(messages) }
        return []
    }

    /// The per-member fast path: the one due with nothing held is `.next` (written alone), and
    /// moves the sequence as `live` would; anything else is `live`'s answer. The progress a tail
    /// check compares moves with every publication delivered or held, not with a duplicate.
    @Test("step: the one due alone, the rest as live says; progress moves with each")
    func stepAndProgress() {
        var sequencer = PublicationSequencer()
        #expect(sequencer.step("g", offset: 1, epoch: "e", message: message(1)) == .notFollowed)
        #expect(sequencer.progress("g") == nil)
        sequencer.startRecovery("g")
        #expect(sequencer.step("g", offset: 6, epoch: "e", message: message(6)) == .other(.hold(startTimer: false)))
        #expect(sequencer.progress("g") == nil, "recovering")
        _ = sequencer.recovered("g", top: StreamPosition(offset: 5, epoch: "e"))
        let afterRecovery = sequencer.progress("g")
        #expect(sequencer.step("g", offset: 7, epoch: "e", message: message(7)) == .next)
        #expect(sequencer.progress("g") != afterRecovery)
        let before = sequencer.progress("g")
        #expect(sequencer.step("g", offset: 7, epoch: "e", message: message(7)) == .other(.duplicate))
        #expect(sequencer.progress("g") == before, "a duplicate is not progress")
        #expect(sequencer.step("g", offset: 9, epoch: "e", message: message(9)) == .other(.hold(startTimer: true)))
        #expect(sequencer.progress("g") != before, "a held one is")
        #expect(sequencer.step("g", offset: 8, epoch: "e", message: message(8)) == .other(.deliver([message(8), message(9)])))
        #expect(sequencer.step("g", offset: 10, epoch: "e", message: message(10)) == .next)
        #expect(sequencer.step("g", offset: 1, epoch: "new", message: message(1)) == .other(.deliver([message(1)])), "a new epoch")
        #expect(sequencer.step("g", offset: 2, epoch: "new", message: message(2)) == .next)
    }

    /// `step` keeps the group it last stepped in order in the sequencer itself, beside the
    /// dictionary every other operation reads. Against a twin driven by `live` alone (which never
    /// takes that path), 20,000 random operations on three groups (two followed, recoveries, new
    /// epochs, gaps, fills, stops) give the same answers and the same reads after each: a slot
    /// put back wrong, read stale or left behind by a stop shows as a difference.
    @Test("step's in-order group kept aside answers and reads as live alone does, over 20,000 random operations")
    func stepMatchesLiveAlone() {
        var fast = PublicationSequencer()
        var plain = PublicationSequencer()
        var random = SystemRandomNumberGenerator()
        var seed = UInt64.random(in: 1...UInt64.max, using: &random)
        func next(_ bound: Int) -> Int {
            seed = seed &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return Int((seed >> 33) % UInt64(bound))
        }
        let groups = ["g1", "g2", "g3"]
        let epochs = ["e1", "e2"]
        var fastSteps = 0
        for round in 0..<20_000 {
            let group = groups[next(3)]
            let epoch = epochs[next(300) == 0 ? 1 : 0]
            // Around where the group stands: mostly the one due.
            let base = fast.progress(group)?.next ?? 1
            let offset = max(1, UInt64(Int(base) + [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, -1][next(16)]))
            let what = "round \(round) (seed \(seed)): \(group) \(offset) \(epoch)"
            switch next(60) {
            case 0:
                fast.startRecovery(group)
                plain.startRecovery(group)
            case 1, 2, 3:
                let top = StreamPosition(offset: base + UInt64(next(3)), epoch: epoch)
                let a = fast.recovered(group, top: top)
                let b = plain.recovered(group, top: top)
                #expect(a.deliver == b.deliver && a.gap == b.gap, "\(what)")
            case 4, 5:
                let found = (0..<UInt64(next(4))).map { (base + $0, message(base + $0)) }
                let through: UInt64? = next(2) == 0 ? nil : base + UInt64(next(3))
                let a = fast.fillGap(group, found: found, through: through)
                let b = plain.fillGap(group, found: found, through: through)
                #expect(a.messages == b.messages && a.gapLeft == b.gapLeft, "\(what)")
            case 6:
                let found = (0..<UInt64(next(3))).map { (base + 1 + $0, message(base + 1 + $0)) }
                let start = StreamPosition(offset: base, epoch: epoch)
                #expect(fast.fillTail(group, from: start, found: found) == plain.fillTail(group, from: start, found: found), "\(what)")
            case 7:
                fast.stop(group)
                plain.stop(group)
            default:
                let stepped = fast.step(group, offset: offset, epoch: epoch, message: message(offset))
                let lived = plain.live(group, offset: offset, epoch: epoch, message: message(offset))
                switch stepped {
                case .notFollowed:
                    #expect(!plain.follows(group) && lived == .deliver([message(offset)]), "\(what)")
                case .next:
                    fastSteps += 1
                    #expect(lived == .deliver([message(offset)]), "\(what): \(lived)")
                case .other(let action):
                    #expect(action == lived, "\(what)")
                }
            }
            for other in groups {
                let top = StreamPosition(offset: (plain.progress(other)?.next ?? 1) + 1, epoch: "e1")
                #expect(fast.follows(other) == plain.follows(other), "\(what): follows \(other)")
                #expect(fast.progress(other) == plain.progress(other), "\(what): progress of \(other)")
                #expect(fast.gapStart(other) == plain.gapStart(other), "\(what): gap start of \(other)")
                #expect(fast.behind(other, top: top) == plain.behind(other, top: top), "\(what): behind in \(other)")
            }
            #expect(fast.duplicates == plain.duplicates && fast.skipped == plain.skipped, "\(what)")
        }
        #expect(fastSteps > 1_000, "the in-order path was taken \(fastSteps) times")
    }

    @Test("a group not followed passes through")
    func notFollowed() {
        var sequencer = PublicationSequencer()
        #expect(delivered(sequencer.live("g", offset: 7, epoch: "e", message: message(7))) == ["m7"])
    }

    @Test("live publications during a recovery wait; after it, those past its top go out in order, the rest are duplicates")
    func recoveryMerge() {
        var sequencer = PublicationSequencer()
        sequencer.startRecovery("g")
        for offset: UInt64 in [12, 11, 10, 13] {
            #expect(sequencer.live("g", offset: offset, epoch: "e", message: message(offset)) == .hold(startTimer: false))
        }
        // The history read covered up to 11: 10 and 11 were written from it.
        let (out, gap) = sequencer.recovered("g", top: StreamPosition(offset: 11, epoch: "e"))
        #expect(texts(out) == ["m12", "m13"] && !gap)
        #expect(sequencer.duplicates == 2)
        #expect(sequencer.live("g", offset: 13, epoch: "e", message: message(13)) == .duplicate)
        #expect(delivered(sequencer.live("g", offset: 14, epoch: "e", message: message(14))) == ["m14"])
    }

    @Test("one that overtook another waits for it; the gap filled from the history, or skipped when it is not there")
    func overtaking() {
        var sequencer = PublicationSequencer()
        sequencer.startRecovery("g")
        _ = sequencer.recovered("g", top: StreamPosition(offset: 0, epoch: "e"))
        #expect(delivered(sequencer.live("g", offset: 1, epoch: "e", message: message(1))) == ["m1"])
        #expect(sequencer.live("g", offset: 3, epoch: "e", message: message(3)) == .hold(startTimer: true))
        #expect(sequencer.live("g", offset: 4, epoch: "e", message: message(4)) == .hold(startTimer: false))
        // 2 arrives late: 2, 3, 4 go out together.
        #expect(delivered(sequencer.live("g", offset: 2, epoch: "e", message: message(2))) == ["m2", "m3", "m4"])
        #expect(sequencer.gapStart("g") == nil)
        // 6 and 8 early; 5 and 7 never come live: the history has 5, not 7.
        #expect(sequencer.live("g", offset: 6, epoch: "e", message: message(6)) == .hold(startTimer: true))
        #expect(sequencer.live("g", offset: 8, epoch: "e", message: message(8)) == .hold(startTimer: false))
        #expect(sequencer.gapStart("g") == StreamPosition(offset: 4, epoch: "e"))
        let (out, gapLeft) = sequencer.fillGap("g", found: [(5, message(5)), (6, message(6))], through: 9)
        #expect(texts(out) == ["m5", "m6", "m8"] && !gapLeft)
        #expect(sequencer.skipped == 1)
        #expect(delivered(sequencer.live("g", offset: 9, epoch: "e", message: message(9))) == ["m9"])
    }

    /// The red team's churn through two workers: a fill's history read ran before the gap it is
    /// applied to (held publications came while it was in flight); the offsets past the read's
    /// top were not in the history yet, and were skipped as missing from it (2 of 640 texts
    /// lost, both in the history).
    @Test("a gap past what the history read could see waits for the next fill, not skipped")
    func aFillOlderThanTheGap() {
        var sequencer = PublicationSequencer()
        sequencer.startRecovery("g")
        _ = sequencer.recovered("g", top: StreamPosition(offset: 0, epoch: "e"))
        for offset in UInt64(1)...3 { _ = sequencer.live("g", offset: offset, epoch: "e", message: message(offset)) }
        // 4 and 5 are late; 6 came: held. The read that fills this gap ran when the top was 3.
        #expect(sequencer.live("g", offset: 6, epoch: "e", message: message(6)) == .hold(startTimer: true))
        let (out, gapLeft) = sequencer.fillGap("g", found: [], through: 3)
        #expect(out.isEmpty && gapLeft, "nothing skipped, the gap waits")
        #expect(sequencer.skipped == 0)
        // The next read sees them.
        let (later, left) = sequencer.fillGap("g", found: [(4, message(4)), (5, message(5))], through: 6)
        #expect(texts(later) == ["m4", "m5", "m6"] && !left)
        #expect(sequencer.skipped == 0)
        // Truly missing from a history that saw past them: skipped, counted.
        #expect(sequencer.live("g", offset: 9, epoch: "e", message: message(9)) == .hold(startTimer: true))
        let (last, _) = sequencer.fillGap("g", found: [(8, message(8))], through: 9)
        #expect(texts(last) == ["m8", "m9"] && sequencer.skipped == 1)
        // 7 comes live after all (its group send was slow, the history lost it): late, not lost.
        #expect(delivered(sequencer.live("g", offset: 7, epoch: "e", message: message(7))) == ["m7"])
        #expect(sequencer.live("g", offset: 7, epoch: "e", message: message(7)) == .duplicate)
    }

    @Test("a publication of a new epoch (the history was lost) is followed from there")
    func newEpoch() {
        var sequencer = PublicationSequencer()
        sequencer.startRecovery("g")
        _ = sequencer.recovered("g", top: StreamPosition(offset: 50, epoch: "old"))
        #expect(delivered(sequencer.live("g", offset: 1, epoch: "new", message: message(1))) == ["m1"])
        #expect(delivered(sequencer.live("g", offset: 2, epoch: "new", message: message(2))) == ["m2"])
        #expect(sequencer.live("g", offset: 2, epoch: "new", message: message(2)) == .duplicate)
    }

    /// The red team deleted a room's history in the middle of a churn: publications of the old
    /// history and the new one came interleaved, the socket switched epochs at each, and the new
    /// history's publications that came after a later one were dropped as duplicates (8-10
    /// texts lost a run, counted nowhere).
    @Test("a late publication of a history left behind passes through; the new one is not switched away from")
    func stragglersOfALostHistory() {
        var sequencer = PublicationSequencer()
        sequencer.startRecovery("g")
        _ = sequencer.recovered("g", top: StreamPosition(offset: 4, epoch: "old"))
        #expect(delivered(sequencer.live("g", offset: 5, epoch: "old", message: message(5))) == ["m5"])
        // 7 came before 6: held when the history is lost.
        #expect(sequencer.live("g", offset: 7, epoch: "old", message: message(7)) == .hold(startTimer: true))
        // The new history's first: what was held goes out first.
        #expect(delivered(sequencer.live("g", offset: 1, epoch: "new", message: message(1))) == ["m7", "m1"])
        // (A new history whose first to come is not its first: held for the gap before it.)
        var other = PublicationSequencer()
        other.startRecovery("h")
        _ = other.recovered("h", top: StreamPosition(offset: 4, epoch: "old"))
        #expect(other.live("h", offset: 3, epoch: "new", message: message(3)) == .hold(startTimer: true))
        #expect(delivered(other.live("h", offset: 1, epoch: "new", message: message(1))) == ["m1"])
        #expect(delivered(other.live("h", offset: 2, epoch: "new", message: message(2))) == ["m2", "m3"])
        // 6, late, of the old one: written, no switch back.
        #expect(delivered(sequencer.live("g", offset: 6, epoch: "old", message: message(6))) == ["m6"])
        // The new one goes on: 3 overtakes 2, which is not taken for a duplicate.
        #expect(sequencer.live("g", offset: 3, epoch: "new", message: message(3)) == .hold(startTimer: true))
        #expect(delivered(sequencer.live("g", offset: 2, epoch: "new", message: message(2))) == ["m2", "m3"])
        #expect(sequencer.live("g", offset: 3, epoch: "new", message: message(3)) == .duplicate)
        #expect(sequencer.duplicates == 1 && sequencer.skipped == 0)
    }

    @Test("a gap left after a recovery asks for the timer")
    func gapAfterRecovery() {
        var sequencer = PublicationSequencer()
        sequencer.startRecovery("g")
        _ = sequencer.live("g", offset: 9, epoch: "e", message: message(9))
        let (out, gap) = sequencer.recovered("g", top: StreamPosition(offset: 7, epoch: "e"))
        #expect(out.isEmpty && gap)
        #expect(sequencer.gapStart("g") == StreamPosition(offset: 7, epoch: "e"))
    }

    @Test("the publication text: offset and epoch first, the object's members after")
    func publicationText() {
        let position = StreamPosition(offset: 3, epoch: "abc")
        #expect(
            PublicationText.make(data: "{\"type\":\"message\"}", position: position)
                == "{\"offset\":3,\"epoch\":\"abc\",\"type\":\"message\"}")
        #expect(PublicationText.make(data: " { } ", position: position) == "{\"offset\":3,\"epoch\":\"abc\"}")
        #expect(PublicationText.make(data: "[1]", position: position) == "{\"offset\":3,\"epoch\":\"abc\",\"data\":[1]}")
    }
    @Test("a tail check: behind only when the top is past what was delivered (same epoch); the tail read fills it, with what was held")
    func tailCheck() {
        var sequencer = PublicationSequencer()
        sequencer.startRecovery("g")
        _ = sequencer.recovered("g", top: StreamPosition(offset: 4, epoch: "e"))
        #expect(sequencer.behind("g", top: StreamPosition(offset: 4, epoch: "e")) == nil, "nothing missing")
        #expect(sequencer.behind("g", top: StreamPosition(offset: 0, epoch: "other")) == nil, "a new history with nothing in it")
        #expect(sequencer.behind("h", top: StreamPosition(offset: 9, epoch: "e")) == nil, "not followed")
        #expect(sequencer.behind("g", top: StreamPosition(offset: 7, epoch: "e")) == StreamPosition(offset: 4, epoch: "e"))
        // 7 came live meanwhile (held behind the gap); the tail read has 5 and 6 (and 7 again).
        #expect(sequencer.live("g", offset: 7, epoch: "e", message: message(7)) == .hold(startTimer: true))
        let start = StreamPosition(offset: 4, epoch: "e")
        #expect(
            texts(sequencer.fillTail("g", from: start, found: [(5, message(5)), (6, message(6)), (7, message(7))])) == ["m5", "m6", "m7"])
        #expect(sequencer.live("g", offset: 7, epoch: "e", message: message(7)) == .duplicate)
        #expect(delivered(sequencer.live("g", offset: 8, epoch: "e", message: message(8))) == ["m8"])
        // A history trimmed past what the socket has: the lost ones are skipped and counted.
        #expect(texts(sequencer.fillTail("g", from: start, found: [(12, message(12)), (13, message(13))])) == ["m12", "m13"])
        #expect(sequencer.skipped == 3)
        #expect(sequencer.behind("g", top: StreamPosition(offset: 13, epoch: "e")) == nil)
    }

    /// The history began again (another epoch) and none of the new one reached the socket: in a
    /// quiet group no live publication shows it, so the tail check reads the new epoch from its
    /// start (it waited for a live one before, for ever in a quiet group: found by a red team).
    @Test("a tail check of a new epoch reads it from its start and switches to it; an old epoch's top or read is ignored")
    func tailCheckOfANewEpoch() {
        var sequencer = PublicationSequencer()
        sequencer.startRecovery("g")
        _ = sequencer.recovered("g", top: StreamPosition(offset: 4, epoch: "e"))
        #expect(sequencer.step("g", offset: 5, epoch: "e", message: message(5)) == .next)
        // 7 of the old epoch came (6 lost), then the history began again.
        #expect(sequencer.live("g", offset: 7, epoch: "e", message: message(7)) == .hold(startTimer: true))
        let start = sequencer.behind("g", top: StreamPosition(offset: 3, epoch: "new"))
        #expect(start == StreamPosition(offset: 0, epoch: "new"))
        let found: [(offset: UInt64, message: Message)] = [(1, message(101)), (2, message(102)), (3, message(103))]
        #expect(texts(sequencer.fillTail("g", from: start!, found: found)) == ["m7", "m101", "m102", "m103"], "the old one held first")
        #expect(sequencer.progress("g") == .init(next: 4, held: 0))
        #expect(sequencer.behind("g", top: StreamPosition(offset: 3, epoch: "new")) == nil, "caught up")
        // A top read before the switch, or a read of the old epoch finishing late: ignored.
        #expect(sequencer.behind("g", top: StreamPosition(offset: 9, epoch: "e")) == nil)
        #expect(sequencer.fillTail("g", from: StreamPosition(offset: 5, epoch: "e"), found: [(6, message(6))]).isEmpty)
        #expect(sequencer.progress("g") == .init(next: 4, held: 0))
        // The new epoch goes on live.
        #expect(sequencer.step("g", offset: 4, epoch: "new", message: message(104)) == .next)
    }
}
