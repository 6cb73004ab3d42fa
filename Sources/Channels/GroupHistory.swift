import ASGI
import CoreMetrics
import OrderedCollections
import Synchronization

/// The layer `Channel`, `Group` and `Presence` use outside a consumer (a handler of another
/// HTTP framework, a background job, a script), as Channels' `get_channel_layer()`. The
/// commands (`runserver`, `runworker`, …) set it to the layer they run on; set it yourself in a
/// process that makes its own layer.
public enum ChannelLayers {
    private static let storage = Mutex<(any ChannelLayer)?>(nil)

    /// The process-wide layer; nil until set.
    public static var `default`: (any ChannelLayer)? {
        get { storage.withLock { $0 } }
        set { storage.withLock { $0 = newValue } }
    }

    /// The layer of the consumer running now, else the process-wide one; a clear error when neither.
    static func current(for what: String) throws -> any ChannelLayer {
        if let layer = ConsumerContext.current?.layer ?? Self.default { return layer }
        throw ConsumerContextError(
            .noLayer, "\(what) outside a consumer needs a layer: pass one, or set ChannelLayers.default")
    }
}

/// Which groups keep a history for recovery, by name pattern (opt-in): `GroupHistory.keep("chat-*",
/// size: 1000, ttl: .seconds(300))`. A group that matches gets offsets on ``Group/publish(_:on:)``
/// and can be followed from a position (``ConsumerContext/follow(_:after:)``).
public enum GroupHistory {
    private static let policies = Mutex<[(GlobPattern, HistoryRetention)]>([])

    /// Keeps the last `size` messages, none older than `ttl`, of the groups matching `pattern`
    /// (`*` and `?` as in channel capacities); the first matching rule wins.
    public static func keep(_ pattern: String, size: Int = 1000, ttl: Duration = .seconds(300)) {
        policies.withLock { $0.append((GlobPattern(pattern), HistoryRetention(size: size, ttl: ttl))) }
    }

    /// Forgets every rule (tests).
    public static func reset() { policies.withLock { $0.removeAll() } }

    /// The retention of `group`, nil when it keeps no history.
    public static func retention(for group: String) -> HistoryRetention? {
        policies.withLock { $0.first { $0.0.matches(group) }?.1 }
    }
}

extension Group {
    /// Publishes `data` (a JSON object's text) to every member, with the next offset of the
    /// group's history and its epoch: members receive `data` with `"offset"` and `"epoch"`
    /// added, and a socket that comes back with its last position gets what it missed. The
    /// group must keep a history (``GroupHistory/keep(_:size:ttl:)``). Returns the position.
    @discardableResult
    public func publish(_ data: String, on layer: (any ChannelLayer)? = nil) async throws -> StreamPosition {
        let layer = try layer ?? ChannelLayers.current(for: "Group.publish")
        guard let retention = GroupHistory.retention(for: name) else {
            throw ConsumerContextError(.historyNotKept, "group '\(name)' keeps no history: GroupHistory.keep(\"\(name)\") first")
        }
        guard let history = layer as? any ChannelLayerHistory else {
            throw ConsumerContextError(.layerLacksFeature, "this channel layer keeps no group history")
        }
        // What came before from this consumer goes first.
        await ConsumerContext.current?.flush()
        // One round trip where the layer can (Redis: one script appends and sends).
        if let position = try await history.historyPublish(name, data: data, retention: retention) {
            ChannelsMetrics.groupSends.increment()
            return position
        }
        let position = try await history.historyAppend(name, message: ["data": .string(data)], retention: retention)
        let message = PublicationText.message(group: name, data: data, position: position)
        // Tried again while the layer is away (a Redis restart): a second copy of a publication
        // is dropped by the servers (the same offset), a lost one would be skipped.
        try await retrying(for: ConsumerContext.current?.environment.sendRetry ?? .seconds(10)) {
            try await layer.sendGroup(name, message: message)
        }
        ChannelsMetrics.groupSends.increment()
        return position
    }

    /// Sends to every member on `layer` (or the process-wide layer), outside any consumer.
    public func send(_ message: Message, on layer: any ChannelLayer) async throws {
        try await layer.sendGroup(name, message: message)
    }

    /// Who is present in the group (see ``Presence``).
    public var presence: Presence { Presence(name) }
}

/// Who is in a group, Phoenix-style: sockets tracked under a user (a user with three sockets is
/// one member with three connections), with join and leave diffs sent to the group's members
/// (`{"type":"presence_diff","joins":[…],"leaves":[…],"versions":{…}}`: a user's change is newer
/// than another of that user when its version is higher, whichever server sent it and whenever it
/// arrives). A socket's presence is kept by its
/// interface server while it is open and ends when it closes; when a server dies, its sockets
/// leave within the presence TTL (`--presence-ttl`, 15 s) and a third of it.
public struct Presence: Sendable, Hashable {
    /// The group.
    public let group: String

    /// The presence of a group.
    public init(_ group: String) { self.group = group }

    /// Tracks the socket of the running consumer as `user` (with `meta`, a JSON object's text):
    /// the socket receives `{"type":"presence","users":[…],"version":N}`, and the group a diff when the user
    /// is new there. Call it from a WebSocket consumer.
    public func track(user: String, meta: String = "{}") async throws {
        guard let context = ConsumerContext.current else {
            throw ConsumerContextError(.noConsumer, "Presence.track needs the consumer of the socket to track")
        }
        try await context.subscriptionControl(
            "presence", .map(["group": .string(group), "user": .string(user), "meta": .string(meta)]))
    }

    /// Stops tracking the running consumer's socket (closing it does the same).
    public func untrack() async throws {
        guard let context = ConsumerContext.current else {
            throw ConsumerContextError(.noConsumer, "Presence.untrack needs the consumer of the socket")
        }
        try await context.reply(["presence": .map(["group": .string(group), "leave": .bool(true)])], immediately: true)
    }

    /// Who is present now, sorted by user.
    public func list(on layer: (any ChannelLayer)? = nil) async throws -> [PresenceMember] {
        let layer = try layer ?? ChannelLayers.current(for: "Presence.list")
        guard let presence = layer as? any ChannelLayerPresence else {
            throw ConsumerContextError(.layerLacksFeature, "this channel layer keeps no presence")
        }
        return try await presence.presenceList(group)
    }
}

extension ConsumerContext {
    /// Makes the running consumer's socket follow `group` (which must keep a history): it is a
    /// member of the group once accepted (when this returns, if already accepted), and its
    /// interface server, with `after` (the position the socket last
    /// saw, from `?offset=&epoch=`), first writes every message it missed, in order, then
    /// `{"type":"recovered","complete":…,"offset":…,"epoch":"…"}` (false: a gap too old or a new
    /// epoch, reload); without, `{"type":"position",…}`. Live messages follow, each once, in
    /// offset order.
    public func follow(_ group: Group, after: StreamPosition? = nil) async throws {
        guard let retention = GroupHistory.retention(for: group.name) else {
            throw ConsumerContextError(.historyNotKept, "group '\(group.name)' keeps no history: GroupHistory.keep(…) first")
        }
        var control: Message = [
            "group": .string(group.name), "size": .int(Int64(retention.size)), "ttl": .int(retention.ttl.components.seconds),
        ]
        // Without a position, the socket starts at the history's top as it is now, before it
        // joins: what is published from here on reaches it, live or from the history.
        var start = after
        if start == nil {
            guard let history = layer as? any ChannelLayerHistory else {
                throw ConsumerContextError(.layerLacksFeature, "this channel layer keeps no group history")
            }
            start = try await history.historyRead(group.name, after: nil, retention: retention).top
            control["fresh"] = .bool(true)
        }
        if let start {
            control["offset"] = .int(Int64(start.offset))
            control["epoch"] = .string(start.epoch)
        }
        // Before the accept it rides on it (the socket is a member when the accept returns);
        // after, it is sent now and the socket is a member when this returns. Either way the
        // server hears of it before any publication of the group can reach the socket.
        try await subscriptionControl("follow", .map(control.fields), add: group.name)
    }

    /// The position a reconnecting socket gives in its query (`?offset=<n>&epoch=<e>`), if any
    /// (nil for one that is not a position: an offset past 2^63 - 1, an epoch not of ASCII
    /// letters and digits or longer than 64).
    public var streamPosition: StreamPosition? {
        guard let request = try? WebSocketConnectMessage(message),
            let offset = request.query("offset").flatMap({ UInt64($0) }), offset < UInt64(Int64.max),
            let epoch = request.query("epoch"), !epoch.isEmpty, epoch.count <= 64,
            epoch.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber) })
        else { return nil }
        return StreamPosition(offset: offset, epoch: epoch)
    }
}
