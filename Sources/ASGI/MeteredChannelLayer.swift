import CoreMetrics

/// A layer that counts every error its callers see, by code, as
/// `channels_layer_errors_total{code}` (`channel_full`, `message_too_large`, `invalid_name`,
/// `invalid_message`, `connection_lost`, `backend_error`, `invalid_configuration`, `closed`,
/// `other`), and forwards everything else to the layer it wraps. The commands wrap the layer
/// they make in one, so the worker, the interface server, the consumers and the delay server are
/// all counted at the one place their calls pass. Free when no metrics backend is bootstrapped.
public struct MeteredChannelLayer: ChannelLayerInspection {
    /// The layer that does the work.
    public let base: any ChannelLayer

    /// `base`, counted.
    public init(_ base: any ChannelLayer) {
        // Never wrap twice: a second wrapper would count every error twice.
        self.base = (base as? MeteredChannelLayer)?.base ?? base
    }

    /// The label value of `error`: a bounded set.
    public static func label(of error: any Error) -> String {
        guard let error = error as? ChannelLayerError else { return "other" }
        var label = ""
        for character in error.code.description {
            if character.isUppercase {
                label += "_" + character.lowercased()
            } else {
                label.append(character)
            }
        }
        return known.contains(label) ? label : "other"
    }

    private static let known: Set<String> = [
        "channel_full", "message_too_large", "invalid_name", "invalid_message", "connection_lost", "backend_error", "out_of_memory",
        "invalid_configuration", "closed",
    ]
    private static let counters: [String: Counter] = Dictionary(
        uniqueKeysWithValues: (known.sorted() + ["other"]).map {
            ($0, Counter(label: "channels_layer_errors_total", dimensions: [("code", $0)]))
        })

    // Inlined: every layer call of the process passes here, and a wrapper frame per call is not free.
    @inline(__always)
    private func counted<T>(_ body: () async throws -> T) async throws -> T {
        do {
            return try await body()
        } catch {
            Self.counters[Self.label(of: error)]?.increment()
            throw error
        }
    }

    /// The wrapped layer's extensions.
    public var extensions: Set<String> { base.extensions }
    /// The wrapped layer's limit.
    public var maxMessageSize: Int { base.maxMessageSize }

    /// Sends through the wrapped layer.
    public func send(_ message: Message, to channel: String) async throws {
        try await counted { try await base.send(message, to: channel) }
    }

    /// Receives through the wrapped layer.
    public func receive(channels: [String], timeout: Duration) async throws -> ReceivedMessage? {
        try await counted { try await base.receive(channels: channels, timeout: timeout) }
    }

    /// Receives a batch through the wrapped layer.
    public func receiveBatch(channels: [String], max: Int, timeout: Duration) async throws -> [ReceivedMessage] {
        try await counted { try await base.receiveBatch(channels: channels, max: max, timeout: timeout) }
    }

    /// A fresh channel name from the wrapped layer.
    public func newChannel(_ pattern: String) async throws -> String {
        try await counted { try await base.newChannel(pattern) }
    }

    /// Adds to a group of the wrapped layer.
    public func groupAdd(_ group: String, channel: String) async throws {
        try await counted { try await base.groupAdd(group, channel: channel) }
    }

    /// Removes from a group of the wrapped layer.
    public func groupDiscard(_ group: String, channel: String) async throws {
        try await counted { try await base.groupDiscard(group, channel: channel) }
    }

    /// A group's members in the wrapped layer.
    public func groupChannels(_ group: String) async throws -> [String] {
        try await counted { try await base.groupChannels(group) }
    }

    /// Sends to a group of the wrapped layer.
    public func sendGroup(_ group: String, message: Message) async throws {
        try await counted { try await base.sendGroup(group, message: message) }
    }

    /// Flushes the wrapped layer.
    public func flush() async throws {
        try await counted { try await base.flush() }
    }

    /// The wrapped layer's statistics.
    public func globalStatistics() async throws -> GlobalStatistics {
        try await counted { try await base.globalStatistics() }
    }

    /// A channel's statistics in the wrapped layer.
    public func channelStatistics(_ channel: String) async throws -> ChannelStatistics {
        try await counted { try await base.channelStatistics(channel) }
    }

    /// Closes the wrapped layer.
    public func close() async { await base.close() }

    /// Registers the bundle reader with the wrapped layer.
    public func registerBundleReader(_ processChannel: String) async throws -> Bool {
        try await counted { try await base.registerBundleReader(processChannel) }
    }

    /// The wrapped layer's pending channels (none when it cannot tell).
    public func pendingChannels() async throws -> [String] {
        guard let inspection = base as? any ChannelLayerInspection else { return [] }
        return try await counted { try await inspection.pendingChannels() }
    }

    /// The wrapped layer's groups (none when it cannot tell).
    public func groups() async throws -> [String] {
        guard let inspection = base as? any ChannelLayerInspection else { return [] }
        return try await counted { try await inspection.groups() }
    }

    /// Where the wrapped layer keeps its data.
    public var location: String { (base as? any ChannelLayerInspection)?.location ?? String(describing: type(of: base)) }
}

extension MeteredChannelLayer: ChannelLayerHistory, ChannelLayerPresence {
    private func history() throws -> any ChannelLayerHistory {
        guard let history = base as? any ChannelLayerHistory else {
            throw ChannelLayerError(.invalidConfiguration, "\(type(of: base)) keeps no group history")
        }
        return history
    }

    private func presence() throws -> any ChannelLayerPresence {
        guard let presence = base as? any ChannelLayerPresence else {
            throw ChannelLayerError(.invalidConfiguration, "\(type(of: base)) keeps no presence")
        }
        return presence
    }

    /// Appends to the group's history; see ``ChannelLayerHistory/historyAppend(_:message:retention:)``.
    public func historyAppend(_ group: String, message: Message, retention: HistoryRetention) async throws -> StreamPosition {
        try await history().historyAppend(group, message: message, retention: retention)
    }

    /// Reads the group's history after a position; see ``ChannelLayerHistory/historyRead(_:after:retention:)``.
    public func historyRead(_ group: String, after position: StreamPosition?, retention: HistoryRetention) async throws -> HistorySlice {
        try await history().historyRead(group, after: position, retention: retention)
    }

    /// Puts back missing followers; see ``ChannelLayerHistory/groupRestore(_:channels:)``.
    public func groupRestore(_ group: String, channels: [String]) async throws -> [String] {
        try await history().groupRestore(group, channels: channels)
    }

    /// Removes channels from a group; see ``ChannelLayerHistory/groupRemove(_:channels:)``.
    public func groupRemove(_ group: String, channels: [String]) async throws {
        try await history().groupRemove(group, channels: channels)
    }

    /// One keeper pass; see ``ChannelLayerHistory/groupCheck(processChannel:followers:isOpen:)``.
    public func groupCheck(
        processChannel: String, followers: [String: [String]], isOpen: @Sendable (String) -> Bool
    ) async throws -> GroupCheck {
        try await history().groupCheck(processChannel: processChannel, followers: followers, isOpen: isOpen)
    }

    /// Tracks a connection as present; see ``ChannelLayerPresence/presenceJoin(_:connection:user:meta:ttl:)``.
    public func presenceJoin(_ group: String, connection: String, user: String, meta: String, ttl: Duration) async throws -> PresenceChange
    {
        try await presence().presenceJoin(group, connection: connection, user: user, meta: meta, ttl: ttl)
    }

    /// Stops tracking a connection; see ``ChannelLayerPresence/presenceLeave(_:connection:user:)``.
    public func presenceLeave(_ group: String, connection: String, user: String) async throws -> PresenceChange {
        try await presence().presenceLeave(group, connection: connection, user: user)
    }

    /// Renews connections' presence; see ``ChannelLayerPresence/presenceRefresh(_:connections:ttl:)``.
    public func presenceRefresh(_ group: String, connections: [PresenceConnection], ttl: Duration) async throws -> PresenceRenewal {
        try await presence().presenceRefresh(group, connections: connections, ttl: ttl)
    }

    /// Who is present; see ``ChannelLayerPresence/presenceSnapshot(_:)``.
    public func presenceSnapshot(_ group: String) async throws -> PresenceSnapshot {
        try await presence().presenceSnapshot(group)
    }

    /// Removes expired connections; see ``ChannelLayerPresence/presenceSweep()``.
    public func presenceSweep() async throws -> [PresenceDiff] {
        try await presence().presenceSweep()
    }
}
