import CoreMetrics
import Synchronization

/// Groups in memory: members with the time they were added (or refreshed), expired after
/// `groupExpiry`; a group send skips (and counts) a member whose channel is full.
extension InMemoryChannelLayer {
    /// Adds `channel` to `group` (or refreshes its time); members expire after `groupExpiry`.
    public func groupAdd(_ group: String, channel: String) async throws(ChannelLayerError) {
        try ChannelNames.validateGroup(group)
        try ChannelNames.validateChannel(channel)
        let now = ContinuousClock.now
        let closed = state.withLock { state in
            if state.closed { return true }
            state.groups[group, default: [:]][channel] = now
            return false
        }
        if closed { throw Self.closedError }
    }

    /// Puts back missing followers; see ``ChannelLayerHistory/groupRestore(_:channels:)``.
    public func groupRestore(_ group: String, channels: [String]) async throws(ChannelLayerError) -> [String] {
        try ChannelNames.validateGroup(group)
        let now = ContinuousClock.now
        let cutoff = now - configuration.groupExpiry
        return state.withLock { state in
            guard !state.closed else { return [] }
            var added: [String] = []
            for channel in channels where (state.groups[group]?[channel]).map({ $0 <= cutoff }) ?? true {
                state.groups[group, default: [:]][channel] = now
                added.append(channel)
            }
            return added
        }
    }

    /// One keeper pass; see ``ChannelLayerHistory/groupCheck(processChannel:followers:memberships:isOpen:)``.
    /// Sets in memory never vanish (only members expire), so no journal is kept and
    /// `memberships` is not needed: followers missing or expired are put back.
    public func groupCheck(
        processChannel: String, followers: [String: [String]], memberships: [String: [String]],
        isOpen: @Sendable (String) -> Bool
    ) async throws(ChannelLayerError) -> GroupCheck {
        var check = GroupCheck()
        for (group, channels) in followers {
            for channel in try await groupRestore(group, channels: channels) {
                check.restored.append(GroupCheck.Restored(group: group, channel: channel, followed: true))
            }
        }
        return check
    }

    /// Removes channels from a group; see ``ChannelLayerHistory/groupRemove(_:channels:)``.
    public func groupRemove(_ group: String, channels: [String]) async throws(ChannelLayerError) {
        try ChannelNames.validateGroup(group)
        state.withLock { state in
            for channel in channels { state.groups[group]?[channel] = nil }
            if state.groups[group]?.isEmpty == true { state.groups[group] = nil }
        }
    }

    /// Removes `channel` from `group`.
    public func groupDiscard(_ group: String, channel: String) async throws(ChannelLayerError) {
        try ChannelNames.validateGroup(group)
        try ChannelNames.validateChannel(channel)
        state.withLock { state in
            state.groups[group]?[channel] = nil
            if state.groups[group]?.isEmpty == true { state.groups[group] = nil }
        }
    }

    /// The unexpired members of `group`.
    public func groupChannels(_ group: String) async throws(ChannelLayerError) -> [String] {
        try ChannelNames.validateGroup(group)
        return liveMembers(group)
    }

    private func liveMembers(_ group: String) -> [String] {
        let cutoff = ContinuousClock.now - configuration.groupExpiry
        return state.withLock { state in
            guard var members = state.groups[group] else { return [] }
            members = members.filter { $0.value > cutoff }
            state.groups[group] = members.isEmpty ? nil : members
            return members.sorted { $0.value < $1.value }.map(\.key)
        }
    }

    /// One entry per process channel, carrying all of its members (see `Entry.more`), and one
    /// per other member: a room of any size costs one slot of each server's capacity.
    public func sendGroup(_ group: String, message: Message) async throws(ChannelLayerError) {
        try ChannelNames.validateGroup(group)
        var byProcess: [String: [String]] = [:]
        var order: [String] = []
        for member in liveMembers(group) {
            let key = ChannelNames.isProcessSpecific(member) ? ChannelNames.nonLocalName(member) : member
            if byProcess[key] == nil { order.append(key) }
            byProcess[key, default: []].append(member)
        }
        for key in order {
            let members = byProcess[key]!
            let processChannel = ChannelNames.isProcessSpecific(members[0])
            let clock = ContinuousClock()
            let deadline = clock.now + configuration.groupFullWait
            var backoff = Backoff(first: .milliseconds(2), cap: .milliseconds(50))
            while true {
                do {
                    try sendValidated(message, to: members[0], more: members[1...])
                    LayerMetrics.groupMembersReached.increment(by: members.count)
                    break
                } catch  where error.code == .channelFull {
                    // A server's share is held back (its reader is behind) rather than dropped
                    // for all its sockets: offered again with growing pauses, up to the wait.
                    let now = clock.now
                    let stalled = stalledProcessChannels.withLock { $0[key].map { $0 > now } ?? false }
                    guard processChannel, !stalled, now < deadline, !Task.isCancelled else {
                        if processChannel, !stalled {
                            stalledProcessChannels.withLock { $0[key] = now + .seconds(10) }
                        }
                        membersMissed.add(members.count, ordering: .relaxed)
                        LayerMetrics.groupMembersMissed.increment(by: members.count)
                        break
                    }
                    groupSendsHeld.add(1, ordering: .relaxed)
                    try? await Task.sleep(for: min(backoff.next(), deadline - now))
                }
            }
        }
    }
}
