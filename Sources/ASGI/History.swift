import Foundation
import OrderedCollections

/// Where a message sits in a group's history: its offset (1, 2, 3, … per group) and the
/// history's epoch, which changes when the history is lost (a Redis restarted empty, a process
/// holding the in-memory layer restarted), so offsets from before cannot be trusted.
public struct StreamPosition: Sendable, Hashable, Codable {
    /// The offset of the last message seen (0: none yet).
    public var offset: UInt64
    /// The history's epoch (letters and digits).
    public var epoch: String

    /// A position.
    public init(offset: UInt64, epoch: String) {
        self.offset = offset
        self.epoch = epoch
    }
}

/// How much of a group's traffic a layer keeps for recovery: the last `size` messages, none
/// older than `ttl`.
public struct HistoryRetention: Sendable, Hashable {
    /// Messages kept (the newest).
    public var size: Int
    /// How long a message is kept.
    public var ttl: Duration

    /// A retention; `size` at least 1.
    public init(size: Int, ttl: Duration) {
        self.size = max(1, size)
        self.ttl = ttl
    }
}

/// What a history read found.
public struct HistorySlice: Sendable {
    /// The messages after the asked position, oldest first, with their offsets.
    public var entries: [(offset: UInt64, message: Message)]
    /// The history's position now: its last offset and its epoch.
    public var top: StreamPosition
    /// True when `entries` are every message after the asked position: the epoch is the same
    /// and nothing in between was trimmed or expired. False tells the reader to reload.
    public var complete: Bool

    /// A slice.
    public init(entries: [(offset: UInt64, message: Message)], top: StreamPosition, complete: Bool) {
        self.entries = entries
        self.top = top
        self.complete = complete
    }

    /// Decides `complete` for entries read after `after` (nil: the reader asked only for the top).
    public static func isComplete(after: StreamPosition?, top: StreamPosition, firstOffset: UInt64?) -> Bool {
        guard let after else { return true }
        guard after.epoch == top.epoch, after.offset <= top.offset else { return false }
        if after.offset == top.offset { return true }
        return firstOffset == after.offset + 1
    }
}

/// A layer that keeps a bounded history per group, for sockets that come back after a drop:
/// each message appended gets the next offset of its group; a reader asks for everything after
/// the position it last saw.
public protocol ChannelLayerHistory: ChannelLayer {
    /// Appends `message` to `group`'s history (started, with a fresh epoch, on first use) and
    /// trims the history to `retention`; returns the message's position.
    func historyAppend(_ group: String, message: Message, retention: HistoryRetention) async throws(ChannelLayerError) -> StreamPosition

    /// Appends `["data": data]` to `group`'s history and sends the publication
    /// (``PublicationText/message(group:data:position:)``) to every member, as one step; nil when
    /// this layer cannot here (the caller then appends and sends). A layer that answers tries its
    /// step again itself while its backend is unreachable, under one identity: the history holds
    /// the publication once, and the servers drop a second copy of it (the same offset).
    func historyPublish(_ group: String, data: String, retention: HistoryRetention) async throws(ChannelLayerError) -> StreamPosition?

    /// The messages of `group`'s history after `position` (up to `retention.size`, none older
    /// than `retention.ttl`), and its top; with a nil position only the top (a history that did
    /// not exist is started, so the top always has an epoch).
    func historyRead(_ group: String, after position: StreamPosition?, retention: HistoryRetention) async throws(ChannelLayerError)
        -> HistorySlice

    /// Puts back into `group`'s member set those of `channels` (the sockets one server knows
    /// follow the group) that are missing from it: the set was evicted (Redis under
    /// `maxmemory`), deleted, or a member expired while its socket still follows. A socket that
    /// follows a group is a member of it for as long as it follows. Returns the channels added.
    func groupRestore(_ group: String, channels: [String]) async throws(ChannelLayerError) -> [String]

    /// Removes `channels` from `group` (the keeper's undo for a socket that closed while its
    /// restore was on the way).
    func groupRemove(_ group: String, channels: [String]) async throws(ChannelLayerError)

    /// One pass of a server's group keeper, in one call per shard: puts back into their
    /// group's member set every socket in `followers` (group → the server's sockets that follow
    /// it) and every membership the layer journaled for `processChannel`'s sockets (any
    /// `groupAdd` of one of them, by this server or by any worker) whose socket `isOpen` still
    /// says is there, when it is missing or expired; drops the journal entries of sockets gone.
    /// A layer whose group sets cannot vanish keeps no journal and checks the followers only.
    ///
    /// `memberships` is the server's own view of its sockets' groups (group → sockets), from
    /// the membership notices the layer sent it with each add and discard: where the journal
    /// itself vanished (evicted with the sets it records), its memberships are put back from it.
    func groupCheck(
        processChannel: String, followers: [String: [String]], memberships: [String: [String]],
        isOpen: @Sendable (String) -> Bool
    ) async throws(ChannelLayerError) -> GroupCheck

    /// The membership notices sent to `processChannel`'s server (see the default
    /// implementation's description).
    func receiveMembershipNotices(processChannel: String, max: Int, timeout: Duration) async throws(ChannelLayerError)
        -> [Message]
}

extension ChannelLayerHistory {
    /// Not in one step: the caller appends, then sends.
    public func historyPublish(_ group: String, data: String, retention: HistoryRetention) async throws(ChannelLayerError)
        -> StreamPosition?
    { nil }

    /// The membership notices sent to `processChannel`'s server (a group add or discard of one
    /// of its sockets, made through a layer that tells servers: ``ChannelNames/membershipNoticeList(forProcess:)``),
    /// each `{group, channel, joined}`: up to `max`, waiting up to `timeout` for the first. A
    /// layer that sends none waits out `timeout` (or its cancellation) and returns nothing.
    public func receiveMembershipNotices(processChannel: String, max: Int, timeout: Duration) async throws(ChannelLayerError)
        -> [Message]
    {
        try? await Task.sleep(for: timeout)
        return []
    }

    /// One keeper pass without a view of the server's own
    /// (``groupCheck(processChannel:followers:memberships:isOpen:)``).
    public func groupCheck(
        processChannel: String, followers: [String: [String]], isOpen: @Sendable (String) -> Bool
    ) async throws(ChannelLayerError) -> GroupCheck {
        try await groupCheck(processChannel: processChannel, followers: followers, memberships: [:], isOpen: isOpen)
    }
}

/// A channel's membership of a group.
public struct GroupMembership: Hashable, Sendable {
    /// The group's name.
    public var group: String
    /// The member channel (a socket's reply channel, for a journaled one).
    public var channel: String

    /// A membership of `channel` in `group`.
    public init(group: String, channel: String) {
        self.group = group
        self.channel = channel
    }
}

/// What one pass of a group keeper found and did
/// (``ChannelLayerHistory/groupCheck(processChannel:followers:memberships:isOpen:)``).
public struct GroupCheck: Sendable {
    /// A member put back into its group's set.
    public struct Restored: Hashable, Sendable {
        /// The group it was put back into.
        public var group: String
        /// The member channel put back.
        public var channel: String
        /// Put back as a follower of the group (else from the journal).
        public var followed: Bool
        /// Put back from the server's own view of its sockets' groups (its journal had vanished).
        public var fromServerView: Bool

        /// A member of `group` put back (as a follower when `followed`; from the server's view
        /// when `fromServerView`).
        public init(group: String, channel: String, followed: Bool, fromServerView: Bool = false) {
            self.group = group
            self.channel = channel
            self.followed = followed
            self.fromServerView = fromServerView
        }
    }

    /// Members put back.
    public var restored: [Restored] = []
    /// Journal entries dropped because their socket is gone.
    public var forgotten = 0
    /// Journal entries written again because the journal itself had vanished.
    public var journalRewritten = 0
    /// Entries of a vanished journal that their group sets no longer held either: discarded
    /// since the last check, or evicted with the journal (the two cannot be told apart); not
    /// put back.
    public var journalLost = 0
    /// The memberships behind ``journalLost``: the server tells their sockets (closes them with
    /// 1012, so clients reconnect and join again) rather than leave them out of a group in silence.
    public var lost: [GroupMembership] = []
    /// What failed (one line per shard that could not be checked); the rest was checked.
    public var failures: [String] = []

    /// A pass that found nothing to do (yet).
    public init() {}
}

/// The frame a client receives for a published message: the publication's JSON object with
/// `offset` and `epoch` added, built the same way live and when recovered.
public enum PublicationText {
    /// `data` (a JSON object's text) with `"offset":…,"epoch":"…"` as its first members;
    /// data that is not an object is wrapped as `{"offset":…,"epoch":"…","data":<data>}`.
    public static func make(data: String, position: StreamPosition) -> String {
        "{\"offset\":\(position.offset),\"epoch\":\"\(position.epoch)\"" + tail(data: data)
    }

    /// What follows `"epoch":"…"` in the text of a publication of `data`: the same for every
    /// position, so a layer that numbers the publication itself (one round trip for the append
    /// and the send) only puts the head in front of it.
    public static func tail(data: String) -> String {
        var rest = data[...]
        while let first = rest.first, first.isWhitespace { rest = rest.dropFirst() }
        guard rest.first == "{" else { return ",\"data\":" + data + "}" }
        rest = rest.dropFirst()
        while let first = rest.first, first.isWhitespace { rest = rest.dropFirst() }
        return rest.first == "}" ? "}" : "," + rest
    }

    /// The message a publication of `data` at `position` sends to `group`'s members: the text
    /// they write, and the `publication` the servers order and deduplicate by.
    public static func message(group: String, data: String, position: StreamPosition) -> Message {
        [
            "text": .string(make(data: data, position: position)),
            "publication": .map(["group": .string(group), "offset": .int(Int64(position.offset)), "epoch": .string(position.epoch)]),
        ]
    }

    /// A fresh epoch: 16 random letters and digits.
    public static func newEpoch() -> String {
        let alphabet = Array("abcdefghijklmnopqrstuvwxyz0123456789")
        return String((0..<16).map { _ in alphabet.randomElement()! })
    }
}
