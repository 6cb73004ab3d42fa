import ASGI
import CoreMetrics
import Logging
import Synchronization

/// The groups this server's sockets follow (with history), and which sockets: the server added
/// them to those groups itself (``WebSocketSession`` joins a followed group before reading its
/// history), so it knows the members a vanished group set must get back.
final class FollowerRegistry: Sendable {
    private let followers = Mutex<[String: Set<String>]>([:])

    func add(_ channel: String, to group: String) {
        followers.withLock { _ = $0[group, default: []].insert(channel) }
    }

    func remove(_ channel: String, from group: String) {
        followers.withLock { all in
            all[group]?.remove(channel)
            if all[group]?.isEmpty == true { all[group] = nil }
        }
    }

    func contains(_ channel: String, in group: String) -> Bool {
        followers.withLock { $0[group]?.contains(channel) ?? false }
    }

    var snapshot: [String: [String]] { followers.withLock { $0.mapValues { $0.sorted() } } }
}

/// The groups this server's sockets were put in by anyone (a consumer on any worker, this
/// server): the layer tells the server of every add and discard of one of its sockets (a
/// membership notice in its process channel, in the order the group set changed), so the
/// server knows a membership the moment it is made, in its own memory, where no eviction
/// reaches. The group keeper puts these back when Redis lost a group's set together with the
/// journal (which only holds what the keeper's last pass saw otherwise).
final class MembershipView: Sendable {
    private let groups = Mutex<[String: Set<String>]>([:])

    /// A notice: `channel` joined (or left) `group`.
    func apply(group: String, channel: String, joined: Bool) {
        groups.withLock { all in
            if joined {
                all[channel, default: []].insert(group)
            } else {
                all[channel]?.remove(group)
                if all[channel]?.isEmpty == true { all[channel] = nil }
            }
        }
    }

    /// The socket closed: its memberships are its disconnect's to undo.
    func forget(_ channel: String) {
        _ = groups.withLock { $0.removeValue(forKey: channel) }
    }

    func contains(_ channel: String, in group: String) -> Bool {
        groups.withLock { $0[channel]?.contains(group) ?? false }
    }

    /// Group → sockets.
    var snapshot: [String: [String]] {
        groups.withLock { all in
            var out: [String: [String]] = [:]
            for (channel, joined) in all {
                for group in joined { out[group, default: []].append(channel) }
            }
            return out
        }
    }

    /// Memberships held.
    var count: Int { groups.withLock { $0.values.reduce(0) { $0 + $1.count } } }
}

/// Keeps this server's sockets in the groups they were put in: Redis under `maxmemory` with an
/// eviction policy can evict a group's sorted set, and then nobody in it gets the group's
/// messages, with no error anywhere; a member can also expire (`group_expiry`) while its
/// socket is open. Every `--group-check-interval` the keeper asks the layer
/// (``ChannelLayerHistory/groupCheck(processChannel:followers:memberships:isOpen:)``, one `SMEMBERS` and
/// one script per shard, nothing written when all are there) to add back the sockets that
/// follow a group (the server knows them) and every other membership of its open sockets that
/// the layer's group journal recorded (a worker's plain `Group.add`, say). A socket that closed
/// while that call was on its way is taken out again (its disconnect may already have discarded
/// it: re-added, it would be a dead member for a day). Messages sent while followers were
/// missing are in the group's history: each follower put back is told to check its tail at
/// once (a group that went quiet meanwhile shows it nothing else), and writes them.
struct GroupKeeper {
    let server: ServerContext

    static let restored = Counter(label: "channels_group_members_restored_total")
    static let journalRewritten = Counter(label: "channels_group_journal_rewritten_total")
    static let journalLost = Counter(label: "channels_group_journal_lost_total")
    /// Sockets closed with 1012 because a membership of theirs was lost with the journal.
    static let lostSocketsClosed = Counter(label: "channels_group_lost_sockets_closed_total")

    func run() async {
        let interval = server.configuration.groupCheckInterval
        guard interval > .zero, let history = server.layer as? any ChannelLayerHistory else { return }
        let router = server.router
        var failures = 0
        while !Task.isCancelled {
            do {
                try await Task.sleep(for: interval)
            } catch {
                return
            }
            var failed: String?
            do {
                let check = try await history.groupCheck(
                    processChannel: router.processChannel, followers: server.followers.snapshot,
                    memberships: router.memberships.snapshot, isOpen: { router.isOpen($0) })
                failed = check.failures.first
                try await settle(check, history: history)
            } catch {
                failed = "\(error)"
            }
            if let failed {
                failures += 1
                if failures == 1 || failures % 30 == 0 {
                    server.logger.warning("the group check failed", metadata: ["error": "\(failed)", "failures": "\(failures)"])
                }
            } else {
                failures = 0
            }
        }
    }

    /// Takes out again what was put back for a socket that closed (or, for a follower, stopped
    /// following) while the check was on its way; counts and logs the rest.
    private func settle(_ check: GroupCheck, history: any ChannelLayerHistory) async throws {
        if check.journalRewritten > 0 {
            Self.journalRewritten.increment(by: check.journalRewritten)
            server.logger.warning(
                "this server's group journal had vanished (evicted under maxmemory?): written again from the last check",
                metadata: ["entries": "\(check.journalRewritten)"])
        }
        if check.journalLost > 0 {
            Self.journalLost.increment(by: check.journalLost)
            // Evicted with the journal, or discarded since the last check: the two cannot be told
            // apart, so the sockets are told (1012: reconnect, join again, recover) rather than
            // left out of a group in silence; a discarded one costs a reconnect.
            let sockets = Set(check.lost.map(\.channel)).filter { server.router.isOpen($0) }
            for channel in sockets.sorted() { server.router.deliver(["close": .int(1012)], to: channel) }
            Self.lostSocketsClosed.increment(by: sockets.count)
            server.logger.warning(
                "this server's group journal had vanished, and some entries of its last view are no longer in their group sets (discarded since, or evicted with the journal): their sockets are closed with 1012 to join again",
                metadata: [
                    "entries": "\(check.journalLost)", "sockets_closed": "\(sockets.count)",
                    "group": "\(Set(check.lost.map(\.group)).sorted().prefix(5).joined(separator: ", "))",
                ])
        }
        guard !check.restored.isEmpty else { return }
        var gone: [String: [String]] = [:]
        var back: [String: Int] = [:]
        var lookAgain: [(channel: String, group: String)] = []
        for member in check.restored {
            let stays =
                member.followed
                ? server.followers.contains(member.channel, in: member.group)
                : member.fromServerView
                    ? server.router.memberships.contains(member.channel, in: member.group) && server.router.isOpen(member.channel)
                    : server.router.isOpen(member.channel)
            if stays {
                back[member.group, default: 0] += 1
                if member.followed { lookAgain.append((member.channel, member.group)) }
            } else {
                gone[member.group, default: []].append(member.channel)
            }
        }
        for (group, channels) in gone { try await history.groupRemove(group, channels: channels) }
        for (channel, group) in lookAgain {
            server.router.deliver([WebSocketSession.tailCheckControl: .string(group)], to: channel)
        }
        let added = back.values.reduce(0, +)
        guard added > 0 else { return }
        Self.restored.increment(by: added)
        let groups = back.keys.sorted()
        server.logger.warning(
            "sockets were missing from their groups' member sets (evicted under maxmemory, expired or deleted); added back",
            metadata: [
                "added": "\(added)", "groups": "\(groups.count)",
                "group": "\(groups.prefix(5).joined(separator: ", "))\(groups.count > 5 ? ", …" : "")",
            ])
    }
}
