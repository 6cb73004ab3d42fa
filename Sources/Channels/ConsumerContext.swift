import ASGI
import CoreMetrics
import Logging
import Synchronization

/// Everything a consumer gets for one message: the message, where it came from, the route's
/// arguments, and a way to send. Sends are buffered and go out, in order, when the consumer
/// returns (or throws), unless sent `immediately` (which first sends what was buffered, so
/// order holds either way). A message over the layer's size limit fails at the call, with
/// `messageTooLarge`; a full channel or an unreachable layer is retried for `environment.sendRetry`.
public final class ConsumerContext: Sendable {
    /// The message being consumed.
    public let message: Message
    /// The channel the message arrived on (its full name for `!` channels).
    public let channel: String
    /// Arguments captured by the route's named groups (`(?P<room>…)` gives `parameters["room"]`).
    public let parameters: [String: String]
    /// Django's name for ``parameters``.
    @available(*, deprecated, renamed: "parameters")
    public var kwargs: [String: String] { parameters }
    /// The layer the message came from; sends go back through it.
    public let layer: any ChannelLayer
    /// A logger for this consumer's lines. In a worker every line also says which message it
    /// was handling (`channel`, `socket`, `consumer`): that metadata is attached when the
    /// logger is asked for, so a consumer that does not log pays nothing for it.
    public var logger: Logger {
        guard let consumerName else { return baseLogger }
        var logger = baseLogger
        logger[metadataKey: "channel"] = .string(channel)
        // A keyed tag, not the reply channel: nothing in a log line names a socket's channel.
        if let reply = message.replyChannel {
            logger[metadataKey: "socket"] = .string(environment.sessionConfiguration.secret.socketTag(reply))
        }
        logger[metadataKey: "consumer"] = .string(consumerName)
        return logger
    }
    private let baseLogger: Logger
    /// The route's name when a worker runs the consumer (see ``logger``).
    private let consumerName: String?
    /// Sessions, users and their settings.
    public let environment: ConsumerEnvironment

    /// State the session and auth wrappers attach to the context.
    struct Extras {
        var channelSession: Session?
        var httpSession: Session?
        var user: User?
        var cookies: [(name: String, header: String)] = []
        /// The ordering gate parked this message for later: it has not run yet.
        var parked = false
    }

    let extras = Mutex(Extras())
    /// Where a buffered send goes.
    enum Destination: Sendable {
        case channel(String)
        case group(String)
    }

    private let outbox = Mutex<[(to: Destination, message: Message)]>([])

    /// Runs a message through the worker's routing, in this task (ordering uses it to run
    /// parked messages whose turn has come); nil outside a worker.
    let dispatcher: (@Sendable (ReceivedMessage) async -> Void)?

    /// Set by the worker for an `http.request`: the streams registry and the consumer's task,
    /// so a multi-message response can be stopped when its client leaves.
    let streaming = Mutex<(streams: ResponseStreams, handle: TaskHandle)?>(nil)
    /// The disconnect channel this context's response registered, if any.
    let streamChannel = Mutex<String?>(nil)
    /// The worker's slot this `http.request` runs on, lent out while the consumer waits for its
    /// client (credit, upload chunks); nil outside a worker.
    let slot = Mutex<SlotLease?>(nil)

    /// The `disconnect_channel` for a response of several messages (registered once, with the
    /// request's `response_credit`; the first time, its lease is taken before it returns: see
    /// `ResponseStreamLeases`).
    func disconnectChannelForStream() async -> String? {
        guard let (streams, handle) = streaming.withLock({ $0 }) else { return nil }
        let replyChannel = self.replyChannel?.name
        let (channel, registered) = streamChannel.withLock { current -> (String, Bool) in
            if let current { return (current, false) }
            let window = message["response_credit"]?.intValue.map { Int($0) }.flatMap { $0 > 0 ? $0 : nil }
            let channel = streams.register(handle, window: window, replyChannel: replyChannel)
            current = channel
            return (channel, true)
        }
        if registered { await streams.holdFirstLease(channel, on: layer) }
        return channel
    }

    /// Whether this context's multi-message response waits for the server's credit (the request
    /// offered it and the response registered a disconnect channel).
    var takesResponseCredit: Bool {
        streamChannel.withLock { $0 } != nil && (message["response_credit"]?.intValue ?? 0) > 0
    }

    /// A multi-message response started by the helpers and not ended yet.
    let responseOpen = Atomic<Bool>(false)
    /// Whether anything was sent (or buffered) to the reply channel: an HTTP consumer that fails
    /// before it did gets an error response from the worker (not a client left waiting).
    let replied = Atomic<Bool>(false)

    /// The consumer failed with its response half sent: the server is told to cut it (the
    /// client sees an incomplete response, not one that never ends). Best effort.
    func abortOpenResponse() async {
        guard responseOpen.exchange(false, ordering: .relaxed) else { return }
        do {
            try await reply(HTTPResponseChunk(content: [], moreContent: false, abort: true), immediately: true)
        } catch {
            logger.warning("could not tell the server to cut a failed response", metadata: ["error": "\(error)"])
        }
    }

    /// Waits until `bytes` more body bytes of this context's multi-message response may be sent
    /// (the server's credit, when it gives one); at once otherwise.
    func reserveResponseBytes(_ bytes: Int) async throws {
        guard let channel = streamChannel.withLock({ $0 }), let (streams, _) = streaming.withLock({ $0 }) else { return }
        try await streams.reserve(bytes, on: channel, lending: slot.withLock { $0 })
    }

    /// A context for a message outside a worker (tests, tools), with a default environment.
    public convenience init(
        message: Message, channel: String, parameters: [String: String], layer: any ChannelLayer, logger: Logger,
        environment: ConsumerEnvironment = ConsumerEnvironment()
    ) {
        self.init(
            message: message, channel: channel, parameters: parameters, layer: layer, logger: logger,
            environment: environment, consumerName: nil, dispatcher: nil)
    }

    init(
        message: Message, channel: String, parameters: [String: String], layer: any ChannelLayer, logger: Logger,
        environment: ConsumerEnvironment, consumerName: String?, dispatcher: (@Sendable (ReceivedMessage) async -> Void)?
    ) {
        self.message = message
        self.channel = channel
        self.parameters = parameters
        self.layer = layer
        self.baseLogger = logger
        self.consumerName = consumerName
        self.environment = environment
        self.dispatcher = dispatcher
    }

    /// The message's `reply_channel`, if it has one.
    public var replyChannel: Channel? {
        message.replyChannel.map { Channel($0) }
    }

    /// The path of an HTTP or WebSocket message.
    public var path: String { message["path"]?.stringValue ?? "" }

    /// The message read as one of the typed ASGI messages (`context.message(as:
    /// WebSocketReceiveMessage.self)`);
    /// throws `MessageError` naming the key that is missing or wrong.
    public func message<M: ASGIMessage>(as type: M.Type) throws(MessageError) -> M {
        try M(message)
    }

    /// Sends a typed message (a `WebSocketSendMessage`, an `HTTPResponseStart` ...) on the reply channel.
    public func reply(_ message: some ASGIMessage, immediately: Bool = false) async throws {
        try await reply(message.message, immediately: immediately)
    }

    /// Sends on the reply channel; throws if the message has none. An accept carries the
    /// socket's deferred subscriptions (``follow(_:after:)``, ``Presence/track(user:meta:)``
    /// before it), goes out at once, and the socket joins their groups before this returns.
    public func reply(_ message: Message, immediately: Bool = false) async throws {
        guard let reply = replyChannel else {
            throw ConsumerContextError(.noReplyChannel, "a message on '\(channel)' has no reply_channel to answer")
        }
        if message["accept"]?.boolValue == true {
            let (controls, adds) = subscriptions.withLock { state in
                defer { state = Subscriptions(accepted: true) }
                return (state.controls, state.adds)
            }
            if !controls.isEmpty {
                var merged = message
                for (key, value) in controls { merged[key] = value }
                try await send(merged, to: reply.name, immediately: true)
                for group in adds { try await layer.groupAdd(group, channel: reply.name) }
                return
            }
        }
        try await send(message, to: reply.name, immediately: immediately)
    }

    /// A socket's subscription controls made before its accept, sent with it (one message to its
    /// server instead of three).
    struct Subscriptions {
        var controls: [String: ASGIValue] = [:]
        var adds: [String] = []
        var accepted = false
    }

    let subscriptions = Mutex(Subscriptions())

    /// Sends a subscription control (`follow`, `presence`): with the accept when the socket is
    /// being connected and not accepted yet, now otherwise; `add` is a group to join after it.
    func subscriptionControl(_ key: String, _ value: ASGIValue, add group: String? = nil) async throws {
        let deferred =
            channel == ASGIChannel.websocketConnect
            && subscriptions.withLock { state in
                guard !state.accepted else { return false }
                state.controls[key] = value
                if let group { state.adds.append(group) }
                return true
            }
        guard !deferred else { return }
        try await reply([key: value], immediately: true)
        if let group, let channel = replyChannel { try await layer.groupAdd(group, channel: channel.name) }
    }

    /// Sends `message` to `channel`: buffered until the consumer returns, or sent now with `immediately`.
    public func send(_ message: Message, to channel: String, immediately: Bool = false) async throws {
        try ChannelNames.validateChannel(channel)
        if channel == self.message.replyChannel { replied.store(true, ordering: .relaxed) }
        try await deliver(message, to: .channel(channel), immediately: immediately)
    }

    /// Sends `message` to every member of `group`: buffered until the consumer returns, or sent now
    /// with `immediately`.
    public func sendGroup(_ group: String, _ message: Message, immediately: Bool = false) async throws {
        try ChannelNames.validateGroup(group)
        try await deliver(message, to: .group(group), immediately: immediately)
    }

    private func deliver(_ message: Message, to destination: Destination, immediately: Bool) async throws {
        // Room for the name the layer adds to a process channel's message.
        let size = MsgPackEncoder.encodedSize(message) + 128
        if size > layer.maxMessageSize {
            let name =
                switch destination {
                case .channel(let name): name;
                case .group(let name): "group:" + name
                }
            throw ChannelLayerError.messageTooLarge(name, size: size, limit: layer.maxMessageSize)
        }
        if immediately {
            await flush()
            try await send(message, to: destination)
        } else {
            outbox.withLock { $0.append((destination, message)) }
        }
    }

    /// One send; a full channel or an unreachable layer is retried for `environment.sendRetry`.
    /// A channel send tried again after a lost connection is marked (`Message.resentField`):
    /// the try before may have been stored.
    private func send(_ message: Message, to destination: Destination) async throws {
        var outgoing = message
        try await retrying(for: environment.sendRetry) {
            switch destination {
            case .channel(let name):
                do {
                    try await layer.send(outgoing, to: name)
                } catch let error as ChannelLayerError where error.code == .connectionLost && error.mayHaveRun && !outgoing.isResent {
                    outgoing = outgoing.markedResent()
                    throw error
                }
                ChannelsMetrics.sent[ChannelKind(channel: name)]?.increment()
            case .group(let name):
                try await layer.sendGroup(name, message: message)
                ChannelsMetrics.groupSends.increment()
            }
        }
    }

    /// Sends what the consumer buffered, in order. A send that still fails is logged and
    /// counted (`droppedSends`), not fatal: the other sends still go out.
    func flush() async {
        let pending = outbox.withLock { outbox -> [(to: Destination, message: Message)] in
            defer { outbox.removeAll() }
            return outbox
        }
        for item in pending {
            do {
                try await send(item.message, to: item.to)
            } catch {
                droppedSends.add(1, ordering: .relaxed)
                logger.warning("a buffered send failed; the message is dropped", metadata: ["to": "\(item.to)", "error": "\(error)"])
            }
        }
    }

    /// Buffered sends that failed after their retries (the worker adds them to its count).
    let droppedSends = Atomic<Int>(0)

    @TaskLocal static var current: ConsumerContext?
}

/// A channel by name, as in Channels: `Channel("chat-messages").send([...])`. Inside a consumer
/// the send is buffered with the consumer's other sends.
public struct Channel: Sendable, Hashable {
    /// The channel's name.
    public let name: String

    /// A channel by name.
    public init(_ name: String) { self.name = name }

    /// Sends from inside a consumer, buffered with its other sends (or now, with `immediately`);
    /// outside one, now, on ``ChannelLayers/default``.
    public func send(_ message: Message, immediately: Bool = false) async throws {
        guard let context = ConsumerContext.current else {
            return try await ChannelLayers.current(for: "Channel.send").send(message, to: name)
        }
        try await context.send(message, to: name, immediately: immediately)
    }

    /// Sends directly on a layer, outside any consumer.
    public func send(_ message: Message, on layer: any ChannelLayer) async throws {
        try await layer.send(message, to: name)
    }
}

/// A group by name: `Group("chat-lobby").add(context.replyChannel!)`.
public struct Group: Sendable, Hashable {
    /// The group's name.
    public let name: String

    /// A group by name.
    public init(_ name: String) { self.name = name }

    /// Adds a channel (a socket's reply channel) to the group, on the running consumer's layer
    /// (outside a consumer: ``ChannelLayers/default``).
    public func add(_ channel: Channel) async throws {
        try await ChannelLayers.current(for: "Group.add").groupAdd(name, channel: channel.name)
    }

    /// Removes a channel from the group.
    public func discard(_ channel: Channel) async throws {
        try await ChannelLayers.current(for: "Group.discard").groupDiscard(name, channel: channel.name)
    }

    /// Sends to every member: inside a consumer buffered with its other sends (or now, with
    /// `immediately`); outside one, now, on ``ChannelLayers/default``.
    public func send(_ message: Message, immediately: Bool = false) async throws {
        guard let context = ConsumerContext.current else {
            return try await ChannelLayers.current(for: "Group.send").sendGroup(name, message: message)
        }
        try await context.sendGroup(name, message, immediately: immediately)
    }

    /// Sends a typed message (a `WebSocketSendMessage`, say) to every member.
    public func send(_ message: some ASGIMessage, immediately: Bool = false) async throws {
        try await send(message.message, immediately: immediately)
    }
}
