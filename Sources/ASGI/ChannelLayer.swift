/// A message taken off a channel, with the full name of the channel it was sent to.
public struct ReceivedMessage: Sendable, Hashable {
    /// The channel the message was received from (the full name for `!` channels).
    public var channel: String
    /// The message.
    public var message: Message

    /// A message received from `channel`.
    public init(channel: String, message: Message) {
        self.channel = channel
        self.message = message
    }
}

/// The member list of a bundled group message: the channels of one process it was stored for,
/// in the order the group send listed them.
///
/// A layer that decoded the same list before (a group's next message to the same members) may
/// hand out the same instance again, so a reader can keep what it worked out for a list (the
/// sockets its names belong to) by the instance's identity, for as long as it holds it.
public final class BundleMemberList: Sendable {
    /// The member channels (full `prefix!suffix` names).
    public let names: [String]

    /// A list of `names`.
    public init(_ names: [String]) { self.names = names }
}

/// What one stored body held when it was taken: a message for one channel, or a group message
/// bundled for several channels of one process (see ``ChannelLayerBundling``).
public struct ReceivedBundle: Sendable {
    /// Whom the message is for.
    public enum Channels: Sendable {
        /// One channel (the full name for `!` channels).
        case one(String)
        /// The members of a bundle, each of which is sent the message.
        case members(BundleMemberList)
    }

    /// The message (one for every member of a bundle).
    public var message: Message
    /// Whom it is for.
    public var channels: Channels

    /// A message for one channel.
    public init(channel: String, message: Message) {
        self.message = message
        self.channels = .one(channel)
    }

    /// A message for every member of `members`.
    public init(members: BundleMemberList, message: Message) {
        self.message = message
        self.channels = .members(members)
    }

    /// How many channels it is for.
    public var count: Int {
        switch channels {
        case .one: 1
        case .members(let list): list.names.count
        }
    }

    /// One received message per channel, in order.
    public var messages: [ReceivedMessage] {
        switch channels {
        case .one(let channel): [ReceivedMessage(channel: channel, message: message)]
        case .members(let list): list.names.map { ReceivedMessage(channel: $0, message: message) }
        }
    }
}

/// Counters for one channel.
public struct ChannelStatistics: Sendable, Hashable, Codable {
    /// Messages sent to the channel (within the counter's lifetime).
    public var messagesCount: Int
    /// Sends refused because the channel was full.
    public var channelFullCount: Int
    /// Messages waiting now.
    public var messagesPending: Int
    /// Age in seconds of the oldest waiting message.
    public var messagesMaxAge: Double

    /// Statistics with every figure given (zero by default).
    public init(messagesCount: Int = 0, channelFullCount: Int = 0, messagesPending: Int = 0, messagesMaxAge: Double = 0) {
        self.messagesCount = messagesCount
        self.channelFullCount = channelFullCount
        self.messagesPending = messagesPending
        self.messagesMaxAge = messagesMaxAge
    }
}

/// Counters for the whole layer.
public struct GlobalStatistics: Sendable, Hashable, Codable {
    /// Messages sent since the layer's statistics began.
    public var messagesCount: Int
    /// Sends refused because a channel was full.
    public var channelFullCount: Int
    /// Bodies that could not be decoded and were skipped by this process's receives.
    public var malformedMessagesDropped: Int

    /// Statistics with every figure given (zero by default).
    public init(messagesCount: Int = 0, channelFullCount: Int = 0, malformedMessagesDropped: Int = 0) {
        self.messagesCount = messagesCount
        self.channelFullCount = channelFullCount
        self.malformedMessagesDropped = malformedMessagesDropped
    }
}

/// An ASGI 1.0 channel layer: named, expiring FIFO queues with groups.
///
/// Delivery is at most once and FIFO per channel for one reader. Every operation validates
/// the names it is given and throws ``ChannelLayerError`` with code `invalidName` for a bad one;
/// every failure is a ``ChannelLayerError`` (typed throws), so a caller can switch over its code
/// without a cast.
///
/// The protocol has no default implementations: a layer states every answer itself. A layer
/// that wraps another (counting, recording, encrypting) adopts ``ForwardingChannelLayer`` and
/// writes only what it changes, so a wrapper cannot silently fall back to a default (a smaller
/// size limit, a one-at-a-time batch) that the layer it wraps does not have.
public protocol ChannelLayer: Sendable {
    /// The extensions this layer supports: `groups`, `flush`, `statistics`.
    var extensions: Set<String> { get }

    /// The largest encoded message a send accepts.
    var maxMessageSize: Int { get }

    /// Sends a message; never waits. Throws `channelFull` when the channel is at capacity and
    /// `messageTooLarge` past the size limit.
    func send(_ message: Message, to channel: String) async throws(ChannelLayerError)

    /// Takes the next message from any of `channels`. With a zero timeout it does not wait;
    /// otherwise it waits (without polling) up to `timeout` and returns nil if nothing came
    /// (or the calling task was cancelled). A `prefix!` name receives every `prefix!*` message
    /// under its full name.
    func receive(channels: [String], timeout: Duration) async throws(ChannelLayerError) -> ReceivedMessage?

    /// Waits like `receive`, then takes up to `max` messages in all (FIFO per channel), for
    /// readers that dispatch in order and want fewer round trips under load. Empty when the
    /// timeout passed with nothing.
    func receiveBatch(channels: [String], max: Int, timeout: Duration) async throws(ChannelLayerError) -> [ReceivedMessage]

    /// A fresh single-reader channel name: `pattern` (ending in `?`) plus random letters.
    func newChannel(_ pattern: String) async throws(ChannelLayerError) -> String

    /// Adds `channel` to `group` (or renews its membership).
    func groupAdd(_ group: String, channel: String) async throws(ChannelLayerError)
    /// Removes `channel` from `group`; removing a channel that is not a member is not an error.
    func groupDiscard(_ group: String, channel: String) async throws(ChannelLayerError)
    /// The current members of a group (expired members excluded).
    func groupChannels(_ group: String) async throws(ChannelLayerError) -> [String]
    /// Sends to every member; a full member is skipped, never an error.
    func sendGroup(_ group: String, message: Message) async throws(ChannelLayerError)

    /// Removes every message, group and counter of the layer.
    func flush() async throws(ChannelLayerError)

    /// Counters for the whole layer.
    func globalStatistics() async throws(ChannelLayerError) -> GlobalStatistics
    /// Counters for one channel.
    func channelStatistics(_ channel: String) async throws(ChannelLayerError) -> ChannelStatistics

    /// Releases connections and threads. Calls after `close` throw `closed`.
    func close() async
}

extension ChannelLayer {
    /// A non-blocking receive.
    public func receive(channels: [String]) async throws(ChannelLayerError) -> ReceivedMessage? {
        try await receive(channels: channels, timeout: .zero)
    }
}

/// The ASGI extensions every layer here implements, for their `extensions`.
public let standardLayerExtensions: Set<String> = ["groups", "flush", "statistics"]

/// A layer whose group sends can store one message per process channel for all of that
/// process's members (a "bundle") instead of one per member, for readers that say they
/// understand bundles. The Redis layer does; a reader that never registers (Daphne 1.4 on
/// asgi_redis) keeps getting one message per member. A layer that is not one needs no
/// registration: it cannot lose a registration it never made.
public protocol ChannelLayerBundling: ChannelLayer {
    /// Registers (or renews) this process as the reader of `processChannel` (a `prefix!` name),
    /// one that understands bundled group messages.
    ///
    /// Call it when the reader starts and then periodically. Returns false when a registration
    /// made earlier by this layer is gone: the store lost its data (a Redis restarted empty),
    /// and with it every group membership of this process's channels.
    ///
    /// Once registered, a batch receive on `processChannel` alone gets every bundle a layer
    /// stored (the Redis layer: one per process per group send) whole: its
    /// `max` bounds the bodies a round trip takes, and a batch may hold more messages than that
    /// (a bundle's members, in order), never a bundle cut in two.
    func registerBundleReader(_ processChannel: String) async throws(ChannelLayerError) -> Bool

    /// Waits like ``ChannelLayer/receiveBatch(channels:max:timeout:)`` on `processChannel`
    /// alone, and returns what it took one entry per stored body: a bundle is one entry with its
    /// member list, not one message per member, so a reader that sends each bundle to its
    /// members (an interface server) neither builds nor walks 500 entries for it. The default
    /// takes a batch and makes each of its messages an entry of its own.
    func receiveBundles(from processChannel: String, max: Int, timeout: Duration) async throws(ChannelLayerError)
        -> [ReceivedBundle]
}

extension ChannelLayerBundling {
    /// A batch receive, one entry per message.
    public func receiveBundles(from processChannel: String, max: Int, timeout: Duration) async throws(ChannelLayerError)
        -> [ReceivedBundle]
    {
        try await receiveBatch(channels: [processChannel], max: max, timeout: timeout).map {
            ReceivedBundle(channel: $0.channel, message: $0.message)
        }
    }
}

/// A layer that wraps another and forwards every call it does not change to ``base``: counting,
/// recording or encrypting layers write only the calls they change. It is a bundling layer too,
/// so a server behind a wrapper still registers with a bundling layer underneath.
public protocol ForwardingChannelLayer: ChannelLayerBundling {
    /// The layer calls go to.
    var base: any ChannelLayer { get }
}

extension ForwardingChannelLayer {
    /// The wrapped layer's extensions.
    public var extensions: Set<String> { base.extensions }
    /// The wrapped layer's limit.
    public var maxMessageSize: Int { base.maxMessageSize }
    /// Sends on the wrapped layer.
    public func send(_ message: Message, to channel: String) async throws(ChannelLayerError) {
        try await base.send(message, to: channel)
    }
    /// Receives from the wrapped layer.
    public func receive(channels: [String], timeout: Duration) async throws(ChannelLayerError) -> ReceivedMessage? {
        try await base.receive(channels: channels, timeout: timeout)
    }
    /// Receives a batch from the wrapped layer.
    public func receiveBatch(channels: [String], max: Int, timeout: Duration) async throws(ChannelLayerError) -> [ReceivedMessage] {
        try await base.receiveBatch(channels: channels, max: max, timeout: timeout)
    }
    /// A fresh channel name from the wrapped layer.
    public func newChannel(_ pattern: String) async throws(ChannelLayerError) -> String { try await base.newChannel(pattern) }
    /// Adds to a group of the wrapped layer.
    public func groupAdd(_ group: String, channel: String) async throws(ChannelLayerError) {
        try await base.groupAdd(group, channel: channel)
    }
    /// Removes from a group of the wrapped layer.
    public func groupDiscard(_ group: String, channel: String) async throws(ChannelLayerError) {
        try await base.groupDiscard(group, channel: channel)
    }
    /// A group's members in the wrapped layer.
    public func groupChannels(_ group: String) async throws(ChannelLayerError) -> [String] { try await base.groupChannels(group) }
    /// Sends to a group of the wrapped layer.
    public func sendGroup(_ group: String, message: Message) async throws(ChannelLayerError) {
        try await base.sendGroup(group, message: message)
    }
    /// Flushes the wrapped layer.
    public func flush() async throws(ChannelLayerError) { try await base.flush() }
    /// The wrapped layer's statistics.
    public func globalStatistics() async throws(ChannelLayerError) -> GlobalStatistics { try await base.globalStatistics() }
    /// A channel's statistics in the wrapped layer.
    public func channelStatistics(_ channel: String) async throws(ChannelLayerError) -> ChannelStatistics {
        try await base.channelStatistics(channel)
    }
    /// Closes the wrapped layer.
    public func close() async { await base.close() }
    /// Registers with the wrapped layer when it bundles; true (nothing to lose) when it does not.
    public func registerBundleReader(_ processChannel: String) async throws(ChannelLayerError) -> Bool {
        try await base.registeredAsBundleReader(processChannel)
    }
}

extension ForwardingChannelLayer where Self: ChannelLayerHistory {
    private func baseHistory() throws(ChannelLayerError) -> any ChannelLayerHistory {
        guard let history = base as? any ChannelLayerHistory else {
            throw ChannelLayerError(.invalidConfiguration, "\(type(of: base)) keeps no group history")
        }
        return history
    }

    /// Appends to the wrapped layer's history of `group`.
    public func historyAppend(_ group: String, message: Message, retention: HistoryRetention) async throws(ChannelLayerError)
        -> StreamPosition
    {
        try await baseHistory().historyAppend(group, message: message, retention: retention)
    }
    /// Reads the wrapped layer's history of `group`.
    public func historyRead(_ group: String, after position: StreamPosition?, retention: HistoryRetention) async throws(ChannelLayerError)
        -> HistorySlice
    {
        try await baseHistory().historyRead(group, after: position, retention: retention)
    }
    /// Puts back missing followers in the wrapped layer.
    public func groupRestore(_ group: String, channels: [String]) async throws(ChannelLayerError) -> [String] {
        try await baseHistory().groupRestore(group, channels: channels)
    }
    /// Removes channels from a group of the wrapped layer.
    public func groupRemove(_ group: String, channels: [String]) async throws(ChannelLayerError) {
        try await baseHistory().groupRemove(group, channels: channels)
    }
    /// The wrapped layer's membership notices.
    public func receiveMembershipNotices(processChannel: String, max: Int, timeout: Duration) async throws(ChannelLayerError)
        -> [Message]
    {
        try await baseHistory().receiveMembershipNotices(processChannel: processChannel, max: max, timeout: timeout)
    }
    /// One keeper pass on the wrapped layer.
    public func groupCheck(
        processChannel: String, followers: [String: [String]], memberships: [String: [String]],
        isOpen: @Sendable (String) -> Bool
    ) async throws(ChannelLayerError) -> GroupCheck {
        try await baseHistory().groupCheck(
            processChannel: processChannel, followers: followers, memberships: memberships, isOpen: isOpen)
    }
}

extension ForwardingChannelLayer where Self: ChannelLayerPresence {
    private func basePresence() throws(ChannelLayerError) -> any ChannelLayerPresence {
        guard let presence = base as? any ChannelLayerPresence else {
            throw ChannelLayerError(.invalidConfiguration, "\(type(of: base)) keeps no presence")
        }
        return presence
    }

    /// Tracks a connection in the wrapped layer.
    public func presenceJoin(_ group: String, connection: String, user: String, meta: String, ttl: Duration) async throws(ChannelLayerError)
        -> PresenceChange
    {
        try await basePresence().presenceJoin(group, connection: connection, user: user, meta: meta, ttl: ttl)
    }
    /// Stops tracking a connection in the wrapped layer.
    public func presenceLeave(_ group: String, connection: String, user: String) async throws(ChannelLayerError) -> PresenceChange {
        try await basePresence().presenceLeave(group, connection: connection, user: user)
    }
    /// Renews connections' presence in the wrapped layer.
    public func presenceRefresh(_ group: String, connections: [PresenceConnection], ttl: Duration) async throws(ChannelLayerError)
        -> PresenceRenewal
    {
        try await basePresence().presenceRefresh(group, connections: connections, ttl: ttl)
    }
    /// Who is present, in the wrapped layer.
    public func presenceSnapshot(_ group: String) async throws(ChannelLayerError) -> PresenceSnapshot {
        try await basePresence().presenceSnapshot(group)
    }
    /// Removes expired connections in the wrapped layer.
    public func presenceSweep() async throws(ChannelLayerError) -> [PresenceDiff] { try await basePresence().presenceSweep() }
}

extension ChannelLayer {
    /// Registers `processChannel` as a bundle reader when this layer bundles group sends;
    /// true when it does not (there is no registration to lose).
    public func registeredAsBundleReader(_ processChannel: String) async throws(ChannelLayerError) -> Bool {
        guard let bundling = self as? any ChannelLayerBundling else { return true }
        return try await bundling.registerBundleReader(processChannel)
    }
}

/// A layer that can say how many messages a channel may hold (its capacity table).
public protocol ChannelLayerCapacities: ChannelLayer {
    /// The capacity a send to `channel` is held to.
    func capacity(for channel: String) -> Int
}

extension ChannelLayer {
    /// The capacity of `channel` in this layer (or the layer it wraps); nil when it cannot say.
    public func configuredCapacity(for channel: String) -> Int? {
        if let layer = self as? any ChannelLayerCapacities { return layer.capacity(for: channel) }
        if let wrapper = self as? any ForwardingChannelLayer { return wrapper.base.configuredCapacity(for: channel) }
        return nil
    }
}

/// The receipt of a run of messages sent in one step: which sender (`holder`, a name of its
/// own) and which of its runs (`number`, counting up). A layer keeps one receipt per holder,
/// its last run's: a sender whose runs go one at a time (a connection's) never needs an
/// older one, and a busy server leaves one small key per sender, not one per run.
public struct RunReceipt: Sendable, Hashable {
    /// The sender's name (unique to it: random).
    public var holder: String
    /// The run's number in the sender's sequence.
    public var number: Int

    /// The receipt of run `number` of `holder`.
    public init(holder: String, number: Int) {
        self.holder = holder
        self.number = number
    }
}

/// A layer that can send several messages to one channel in one step (for Redis, one round
/// trip): a connection that sends faster than a round trip per message (a burst of frames)
/// is not held to one message per round trip.
public protocol ChannelLayerSendMany: ChannelLayer {
    /// Sends `messages` to `channel` in their order, in one step, and returns how many were
    /// sent, as the `send` of an array of messages describes (callers use that one).
    func sendMany(_ messages: [Message], to channel: String, receipt: RunReceipt?) async throws(ChannelLayerError) -> Int
    /// Whether ``sendMany(_:to:receipt:)`` really sends them in one step and keeps its receipts
    /// (a wrapper says what the layer it wraps does).
    var sendsManyAtOnce: Bool { get }
}

extension ChannelLayer {
    /// Sends `messages` to `channel` in their order and returns how many were sent: always the
    /// first ones, all of them unless the channel filled up (or the layer refused one, too large
    /// or invalid, or failed) after the first. Whatever stopped the first message is thrown, as
    /// a send of that message alone throws it. In one step when this layer can
    /// (``ChannelLayerSendMany``), one message at a time otherwise (a wrapper that does not say
    /// it can is never bypassed).
    ///
    /// A `receipt` makes a second call for the same run (its first call's reply lost with a
    /// connection, so whether it was stored is unknown) store nothing again and return what the
    /// first one stored: a run tried again is never stored twice. Its holder's runs must go
    /// one at a time (the layer keeps the last run's receipt of each holder, for ten minutes,
    /// on layers that send in one step: ``ChannelLayerSendMany/sendsManyAtOnce``); ignored one
    /// message at a time.
    public func send(_ messages: [Message], to channel: String, receipt: RunReceipt? = nil) async throws(ChannelLayerError) -> Int {
        if let layer = self as? any ChannelLayerSendMany { return try await layer.sendMany(messages, to: channel, receipt: receipt) }
        var sent = 0
        for message in messages {
            do {
                try await send(message, to: channel)
            } catch {
                if sent == 0 { throw error }
                return sent
            }
            sent += 1
        }
        return sent
    }
}

/// A layer that can count the messages waiting on many channels in one look, without taking them.
public protocol ChannelLayerPendingCounts: ChannelLayer {
    /// How many messages wait on each of `channels` (in their order).
    func pendingCounts(_ channels: [String]) async throws(ChannelLayerError) -> [Int]
}

extension ChannelLayer {
    /// How many messages wait on each of `channels`, without taking any: in one look when this
    /// layer (or the layer it wraps) can count many at once, one channel at a time otherwise.
    public func messagesPending(in channels: [String]) async throws(ChannelLayerError) -> [Int] {
        if let layer = self as? any ChannelLayerPendingCounts { return try await layer.pendingCounts(channels) }
        if let wrapper = self as? any ForwardingChannelLayer { return try await wrapper.base.messagesPending(in: channels) }
        var counts: [Int] = []
        for channel in channels { counts.append(try await channelStatistics(channel).messagesPending) }
        return counts
    }
}

/// A lease: a named claim on some work, with a note for whoever takes the work over.
public struct ChannelLayerLease: Sendable, Hashable {
    /// What the lease is on (unique in its pool).
    public var name: String
    /// What its holder left for a successor (free text, short).
    public var note: String

    /// A lease on `name` with `note`.
    public init(name: String, note: String) {
        self.name = name
        self.note = note
    }
}

/// A layer that keeps leases every process on it sees: claims on work that lapse unless their
/// holder renews them, so that when a process dies (SIGKILL, OOM, a lost host) another one
/// finds what it was looking after and takes it over. Whether a lease lapsed is judged on one
/// clock, the layer's (Redis `TIME`), never by comparing two hosts' clocks.
public protocol ChannelLayerLeases: ChannelLayer {
    /// Takes or renews the lease on `name` in `pool` for `duration`, with `note`.
    func holdLease(_ name: String, in pool: String, note: String, for duration: Duration) async throws(ChannelLayerError)
    /// Takes the lease on `name` in `pool` for `duration`, with `note`, only when there is none
    /// (a lease held, or lapsed and not yet claimed, is left as it is); returns whether it took it.
    func takeFreeLease(_ name: String, in pool: String, note: String, for duration: Duration) async throws(ChannelLayerError) -> Bool
    /// Leases of `pool` that lapsed (their holder stopped renewing them), at most `max`, each
    /// claimed for `duration` as it is handed out: a concurrent claim never gets the same one.
    func claimLapsedLeases(in pool: String, max: Int, for duration: Duration) async throws(ChannelLayerError) -> [ChannelLayerLease]
    /// Gives up the lease on `name` in `pool` (the work is done); with `note`, only if its note
    /// is still that one (nobody else took it since: every holder writes a note of its own).
    func releaseLease(_ name: String, in pool: String, ifNote note: String?) async throws(ChannelLayerError)
}

extension ChannelLayerLeases {
    /// Gives up the lease on `name` in `pool`, whoever holds it.
    public func releaseLease(_ name: String, in pool: String) async throws(ChannelLayerError) {
        try await releaseLease(name, in: pool, ifNote: nil)
    }
}

extension ChannelLayer {
    /// This layer's leases, or those of the layer it wraps; nil when neither keeps any.
    public var leases: (any ChannelLayerLeases)? {
        if let layer = self as? any ChannelLayerLeases { return layer }
        if let wrapper = self as? any ForwardingChannelLayer { return wrapper.base.leases }
        return nil
    }
}

/// What an operator's tools (`stats`, the operations page) may ask a layer beyond ASGI: which
/// channels hold messages and which groups exist. Layers that can answer adopt it; tools ask
/// with `layer as? any ChannelLayerInspection` and show less when a layer cannot.
public protocol ChannelLayerInspection: ChannelLayer {
    /// Names of the channels that hold messages now (the non-local `prefix!` form for process channels).
    func pendingChannels() async throws(ChannelLayerError) -> [String]
    /// Names of the groups that have members now.
    func groups() async throws(ChannelLayerError) -> [String]
    /// A short description of where the layer keeps its data, for logs and pages (no passwords).
    var location: String { get }
}

/// The reserved key that carries the full name of a `!` channel inside a stored message.
public let asgiChannelKey = "__asgi_channel__"

extension Duration {
    /// The duration in seconds as a Double.
    public var seconds: Double {
        let (s, atto) = components
        return Double(s) + Double(atto) / 1e18
    }

    /// The duration in whole nanoseconds (saturating at `Int64`'s bounds).
    public var nanoseconds: Int64 {
        let (s, atto) = components
        let (whole, overflow) = s.multipliedReportingOverflow(by: 1_000_000_000)
        if overflow { return s < 0 ? .min : .max }
        return whole.addingReportingOverflow(atto / 1_000_000_000).overflow ? .max : whole + atto / 1_000_000_000
    }
}
