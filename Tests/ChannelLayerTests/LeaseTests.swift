import ASGI
import Testing

/// Leases (``ChannelLayerLeases``): what the ordering sweeper finds when every worker watching
/// a socket died. A lease lapses only when its holder stops renewing it, is claimed by one
/// claimer at a time, and is gone once released.
@Suite struct LeaseTests {
    /// Durations far apart (a minute held, a millisecond lapsed), so a slow machine cannot
    /// turn one into the other.
    @Test(arguments: LayerKind.allCases)
    func aLeaseLapsesOnlyWhenItsHolderStopsRenewingIt(_ kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            let leases = try #require(layer.leases, "the layer keeps leases")
            try await leases.holdLease("__wait__.held", in: "ordering", note: "1", for: .seconds(60))
            // Renewed after it lapsed, before anyone claimed it: held again.
            try await leases.holdLease("__wait__.renewed", in: "ordering", note: "2", for: .milliseconds(1))
            try await Task.sleep(for: .milliseconds(20))
            try await leases.holdLease("__wait__.renewed", in: "ordering", note: "3", for: .seconds(60))
            #expect(try await leases.claimLapsedLeases(in: "ordering", max: 10, for: .seconds(10)).isEmpty, "both held")
            // Its holder's last renewal was short and was the last: lapsed, with that renewal's note.
            try await leases.holdLease("__wait__.renewed", in: "ordering", note: "7", for: .milliseconds(1))
            try await Task.sleep(for: .milliseconds(20))
            #expect(
                try await leases.claimLapsedLeases(in: "ordering", max: 10, for: .seconds(60))
                    == [ChannelLayerLease(name: "__wait__.renewed", note: "7")])
            // Claimed once: a second claim does not get it.
            #expect(try await leases.claimLapsedLeases(in: "ordering", max: 10, for: .seconds(10)).isEmpty, "claimed already")
        }
    }

    @Test(arguments: LayerKind.allCases)
    func claimsTakeAtMostTheirCountFromTheirPoolAndReleasedLeasesAreGone(_ kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            let leases = try #require(layer.leases)
            for name in ["x", "y", "z"] { try await leases.holdLease(name, in: "ordering", note: name, for: .milliseconds(1)) }
            try await leases.holdLease("other", in: "elsewhere", note: "", for: .milliseconds(1))
            try await leases.releaseLease("z", in: "ordering")
            // Released only while the note is the releaser's: "y" was taken by another holder.
            try await leases.releaseLease("y", in: "ordering", ifNote: "not y's")
            try await leases.releaseLease("zz", in: "ordering", ifNote: "gone")
            try await Task.sleep(for: .milliseconds(50))
            let first = try await leases.claimLapsedLeases(in: "ordering", max: 1, for: .milliseconds(1))
            #expect(first.count == 1)
            try await Task.sleep(for: .milliseconds(50))
            // The first claim lapsed too (1 ms): both left are handed out, never the released one
            // nor another pool's.
            let all = try await leases.claimLapsedLeases(in: "ordering", max: 10, for: .seconds(10))
            #expect(Set(all.map(\.name)) == ["x", "y"])
            #expect(all.allSatisfy { $0.note == $0.name }, "each with its note")
            #expect(try await leases.claimLapsedLeases(in: "elsewhere", max: 10, for: .seconds(10)).map(\.name) == ["other"])
        }
    }

    /// A free lease is taken only where there is none: a held one and a lapsed one not yet
    /// claimed are left as they are (note and expiry); once released, it can be taken.
    @Test(arguments: LayerKind.allCases)
    func aFreeLeaseIsTakenOnlyWhereThereIsNone(_ kind: LayerKind) async throws {
        try await withLayer(kind) { layer in
            let leases = try #require(layer.leases)
            try await leases.holdLease("held", in: "ordering", note: "watch", for: .seconds(60))
            try await leases.holdLease("lapsed", in: "ordering", note: "dead watch", for: .milliseconds(1))
            try await Task.sleep(for: .milliseconds(20))
            #expect(try await !leases.takeFreeLease("held", in: "ordering", note: "park", for: .milliseconds(1)))
            #expect(try await !leases.takeFreeLease("lapsed", in: "ordering", note: "park", for: .seconds(60)))
            #expect(try await leases.takeFreeLease("free", in: "ordering", note: "park", for: .milliseconds(1)))
            #expect(try await !leases.takeFreeLease("free", in: "ordering", note: "another park", for: .seconds(60)))
            try await Task.sleep(for: .milliseconds(20))
            // "held" kept its minute; "lapsed" and "free" lapsed with their first holders' notes.
            let lapsed = try await leases.claimLapsedLeases(in: "ordering", max: 10, for: .seconds(60))
            #expect(Set(lapsed) == [ChannelLayerLease(name: "lapsed", note: "dead watch"), ChannelLayerLease(name: "free", note: "park")])
            try await leases.releaseLease("free", in: "ordering", ifNote: "park")
            #expect(try await leases.takeFreeLease("free", in: "ordering", note: "next park", for: .seconds(60)))
        }
    }

    /// A wrapper (the metered layer every command wraps its layer in) hands its layer's leases on.
    @Test func leasesAreReachedThroughAWrapper() async throws {
        let layer = MeteredChannelLayer(InMemoryChannelLayer())
        #expect(layer.leases != nil)
    }
}
