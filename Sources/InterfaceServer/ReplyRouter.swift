import ASGI
import CoreMetrics
import Logging
import NIOCore
import OrderedCollections
import ServiceLifecycle
import Synchronization

/// A connection that takes replies (an HTTP request's handler, a WebSocket), called on its
/// event loop.
protocol ReplyReceiver: AnyObject {
    func receiveReply(_ reply: Message)
    /// The layer lost its data: replies this receiver waits for may never come.
    func replyStoreLost()
    /// A reply handed over in a batch: what it writes may wait for ``endReplyBatch()`` (one
    /// flush, so one system call, per connection per batch), and its payload may be shared
    /// with the batch's other receivers through `payloads`.
    func receiveBatchedReply(_ reply: Message, payloads: ReplyPayloads)
    /// The batch was handed over: writes held for it go out.
    func endReplyBatch()
}

extension ReplyReceiver {
    func receiveBatchedReply(_ reply: Message, payloads: ReplyPayloads) { receiveReply(reply) }
    func endReplyBatch() {}
}

/// The frames of one batch, encoded once and shared by every connection sent the same text (a
/// group message bundled for this server's members is one text): one allocation and copy per
/// message instead of one per member. Server frames are not masked, so the bytes are the same
/// for every member. Used on one event loop only.
final class ReplyPayloads {
    private var text: String?
    private var frame: ByteBuffer?
    private var parsed: (reply: Message, send: WebSocketSendMessage?)?

    /// A live publication of a followed group, taken apart once per hand-over.
    struct Publication {
        let group: String
        let offset: UInt64
        let epoch: String
        /// The reply without its `publication` key: what the socket writes.
        let plain: Message
        /// `plain` parsed, when it is a valid plain `websocket.send`.
        let send: WebSocketSendMessage?
    }
    private var publication: (reply: Message, parts: Publication?)?

    /// `reply` as a publication (a `publication` map with group, offset and epoch, and no
    /// `follow` or `presence`), or nil: taken apart once for every member it went to, instead
    /// of a copy of the message and a parse per member.
    func publication(_ reply: Message) -> Publication? {
        if let publication, publication.reply == reply { return publication.parts }
        var parts: Publication?
        if reply["follow"] == nil, reply["presence"] == nil, let control = reply["publication"]?.mapValue,
            let group = control["group"]?.stringValue, let offset = control["offset"]?.intValue, offset > 0,
            let epoch = control["epoch"]?.stringValue
        {
            var plain = reply
            plain.removeValue(forKey: "publication")
            var send: WebSocketSendMessage?
            if plain.keys.allSatisfy({ WebSocketSendMessage.keys.contains($0) }) { send = try? WebSocketSendMessage(plain) }
            parts = Publication(
                group: StringInterner.names.intern(group), offset: UInt64(offset), epoch: StringInterner.names.intern(epoch),
                plain: plain, send: send)
        }
        publication = (reply, parts)
        return parts
    }

    /// `reply` as a plain `websocket.send` (its keys all `websocket.send` keys, and valid), or
    /// nil for anything else. Parsed once for every member sent the same message: a bundle's
    /// members share its storage, so the comparison with the last one is immediate.
    func plainSend(_ reply: Message) -> WebSocketSendMessage? {
        if let parsed, parsed.reply == reply { return parsed.send }
        var send: WebSocketSendMessage?
        if reply.keys.allSatisfy({ WebSocketSendMessage.keys.contains($0) }) { send = try? WebSocketSendMessage(reply) }
        parsed = (reply, send)
        return send
    }

    /// A final text frame (header and payload) holding `text`; the previous call's buffer when
    /// the text is the same (the same string's storage compares at once).
    func textFrame(_ text: String, allocator: ByteBufferAllocator) -> ByteBuffer {
        if let frame, self.text == text { return frame }
        let made = Self.encodeTextFrame(text, allocator: allocator)
        self.text = text
        frame = made
        return made
    }

    /// RFC 6455 5.2, as a server writes it: FIN and the text opcode, the length in 7, 16 or 64
    /// bits, no mask, the payload.
    static func encodeTextFrame(_ text: String, allocator: ByteBufferAllocator) -> ByteBuffer {
        let length = text.utf8.count
        var buffer = allocator.buffer(capacity: length + 10)
        buffer.writeInteger(UInt8(0x81))
        if length < 126 {
            buffer.writeInteger(UInt8(length))
        } else if length <= Int(UInt16.max) {
            buffer.writeInteger(UInt8(126))
            buffer.writeInteger(UInt16(length))
        } else {
            buffer.writeInteger(UInt8(127))
            buffer.writeInteger(UInt64(length))
        }
        buffer.writeString(text)
        return buffer
    }
}

/// Where the router hands a connection's replies: the connection, on its event loop.
///
/// A class, so that handing it around (500 times for a group message to 500 members) retains
/// one object of its own, not the event loop every connection of that loop shares (whose
/// count its own thread keeps changing: a cache line fought over by two cores).
final class ReplyTarget: Sendable {
    let receiver: NIOLoopBound<any ReplyReceiver>
    /// The receiver unchecked, to be called on `loop` only: a resolved member list keeps its
    /// receivers in an array per event loop, which that loop walks without touching this object.
    nonisolated(unsafe) let uncheckedReceiver: any ReplyReceiver
    /// The event loop's identity, compared without retaining it.
    let loopID: ObjectIdentifier
    var loop: any EventLoop { receiver.eventLoop }

    init(_ receiver: any ReplyReceiver, on loop: any EventLoop) {
        self.receiver = NIOLoopBound(receiver, eventLoop: loop)
        self.uncheckedReceiver = receiver
        self.loopID = ObjectIdentifier(loop)
    }
}

/// The connections a bundle's member list names, every one of them held here: per event loop,
/// that loop's receivers in the list's order (called on that loop only). nil runs: a name of
/// the list is held by no connection here (such a list takes the look-up path, which counts it).
final class ListResolution: Sendable {
    struct Run: @unchecked Sendable {
        let loopID: ObjectIdentifier
        let loop: any EventLoop
        let receivers: [any ReplyReceiver]
    }
    /// Held, so that its identity (the cache's key) is not reused while this is kept.
    let list: BundleMemberList
    /// The router's `moves` when it was resolved: right while no name has moved since.
    let moves: Int
    /// The router's `registrations` then: a list with a name nobody held is looked up again
    /// once a name was registered since.
    let registrations: Int
    let runs: [Run]?

    init(list: BundleMemberList, moves: Int, registrations: Int, runs: [Run]?) {
        self.list = list
        self.moves = moves
        self.registrations = registrations
        self.runs = runs
    }

    /// Whether it still holds, given the router's counters now.
    func holds(moves: Int, registrations: Int) -> Bool {
        self.moves == moves && (runs != nil || self.registrations == registrations)
    }
}

/// The one reader of this process's reply channel: takes every `<process>!<conn>` message and
/// hands it to the connection that registered that name. Nothing per connection waits on the
/// layer; a message for a name nobody holds (the client left) is dropped and counted.
///
/// Replies are read up to 64 at a time and handed over a batch at a time: one look-up under
/// the lock for the batch, and one hop to each event loop with replies in it, where each
/// connection takes its replies in the order they were sent (a group message bundled for 500
/// members on two loops is two hops, not 500).
///
/// It registers the process channel with the layer as one that reads bundled group messages
/// (one message per group send for all of this server's members) and renews that registration
/// every `registrationInterval`; a registration found gone means the layer lost its data, and
/// `onStoreLost` runs (the server closes its sockets with 1012 so clients join again).
final class ReplyRouter: Service, Sendable {
    let processChannel: String
    private let layer: any ChannelLayer
    private let logger: Logger
    /// Keyed by what follows `processChannel` in a connection's name (12 letters: a string
    /// Swift keeps inline, so a look-up hashes and compares no heap memory; a group message
    /// for 500 members here is 500 look-ups).
    private let targets = Mutex<[String: ReplyTarget]>([:])
    /// Bumped (under the `targets` lock) when a name is let go or taken over by another
    /// connection: a member list resolved before (every name held) stays right until then.
    /// A name registered anew does not move any: it was in no complete list.
    private let moves = Atomic<Int>(0)
    /// Bumped (under the `targets` lock) at every registration.
    private let registrations = Atomic<Int>(0)
    /// What recent bundles' member lists resolved to, by list (see `resolution(of:)`).
    private let resolutions = Mutex<[ObjectIdentifier: ListResolution]>([:])
    /// Lists kept at most.
    static let resolutionsKept = 64
    /// Hand-overs that went by a resolved list (for tests and profiles).
    let listHandOvers = Atomic<Int>(0)
    private let unroutable = Atomic<Int>(0)
    /// This server's sockets' groups, from the layer's membership notices.
    let memberships = MembershipView()

    private let registrationInterval: Duration
    private let storeLost = Mutex<(@Sendable () -> Void)?>(nil)
    /// How long the server may go without reaching the layer before `cutOff` runs (nil: never).
    private let cutOffBound: Duration?
    private let cutOff = Mutex<(@Sendable (Duration) -> Void)?>(nil)
    /// When a registration last succeeded, and whether this outage was told already.
    private let reached = Mutex<(at: ContinuousClock.Instant, told: Bool)>((ContinuousClock.now, false))
    /// Each registered name is a connection waiting for a reply: work in hand.
    let workInHand = WorkInHand()
    /// Where the read loop runs (nil: the global executor).
    private let readExecutor: EventLoopTaskExecutor?

    init(
        layer: any ChannelLayer, prefix: String, logger: Logger, registrationInterval: Duration = .seconds(2),
        cutOffBound: Duration? = nil, readLoop: (any EventLoop)? = nil
    ) {
        self.readExecutor = readLoop.map(EventLoopTaskExecutor.init)
        // Never under three renewals: one slow renewal is not a cut-off.
        self.cutOffBound = cutOffBound.map { max($0, registrationInterval * 3) }
        self.layer = layer
        self.logger = logger
        self.processChannel = prefix + "." + ChannelNames.randomLetters(10) + "!"
        self.registrationInterval = registrationInterval
    }

    /// What to do when the layer is found to have lost its data.
    func whenStoreLost(_ action: @escaping @Sendable () -> Void) {
        storeLost.withLock { $0 = action }
    }

    /// What to do when the layer could not be reached for longer than the cut-off bound (once
    /// per outage): the replies and group messages sent here meanwhile may be lost.
    func whenCutOff(_ action: @escaping @Sendable (Duration) -> Void) {
        cutOff.withLock { $0 = action }
    }

    /// The key `channel` is held under in `targets`: the part after this process's channel, or
    /// (a name from elsewhere, or not ASCII, which no connection holds) the whole name behind a
    /// `!`, which no such part contains.
    func targetKey(_ channel: String) -> String {
        guard ChannelNames.hasBytePrefix(channel, processChannel) else { return "!" + channel }
        let suffix = channel.utf8.dropFirst(processChannel.utf8.count)
        // Only ASCII is ever registered; anything else must not match one by Unicode
        // equivalence (a Kelvin sign for a K: Swift compares strings as characters).
        guard suffix.allSatisfy({ $0 < 0x80 }) else { return "!" + channel }
        return String(decoding: suffix, as: UTF8.self)
    }

    /// A fresh reply channel name under this process's channel.
    func newReplyChannel() -> String { processChannel + ChannelNames.randomLetters(12) }

    /// Replies to `channel` go to `receiver`, on the event loop this is called on, until
    /// `unregister`.
    func register(_ channel: String, _ receiver: any ReplyReceiver, on loop: any EventLoop) {
        let target = ReplyTarget(receiver, on: loop)
        let key = targetKey(channel)
        let replaced = targets.withLock { targets in
            let old = targets.updateValue(target, forKey: key)
            if old != nil { moves.wrappingAdd(1, ordering: .releasing) }
            registrations.wrappingAdd(1, ordering: .releasing)
            return old != nil
        }
        if replaced { forgetResolutions() } else { workInHand.begin() }
    }

    /// True while a connection holds `channel`.
    func isOpen(_ channel: String) -> Bool {
        let key = targetKey(channel)
        return targets.withLock { $0[key] != nil }
    }

    func unregister(_ channel: String) {
        let key = targetKey(channel)
        let removed = targets.withLock { targets in
            let old = targets.removeValue(forKey: key)
            if old != nil { moves.wrappingAdd(1, ordering: .releasing) }
            return old != nil
        }
        if removed {
            workInHand.finish()
            forgetResolutions()
        }
        memberships.forget(channel)
    }

    /// A membership notice (see ``MembershipView``): one that is not well formed, or not for a
    /// socket of this server, is logged and dropped; one for a socket that is gone is dropped
    /// (its disconnect undoes the membership).
    private func applyNotice(_ message: Message) {
        guard let group = message["group"]?.stringValue, let channel = message["channel"]?.stringValue,
            case .bool(let joined)? = message["joined"], ChannelNames.hasBytePrefix(channel, processChannel)
        else {
            logger.warning("dropped a membership notice that is not one", metadata: ["keys": "\(message.fieldNames)"])
            return
        }
        guard isOpen(channel) else { return }
        memberships.apply(group: group, channel: channel, joined: joined)
        // Closed in between: its unregister may have forgotten it before the apply.
        if !isOpen(channel) { memberships.forget(channel) }
    }

    /// Reads this server's membership notices until cancelled (see ``MembershipView``).
    private func readNotices(_ history: any ChannelLayerHistory) async {
        var failures = FailureStreak()
        while !Task.isCancelled {
            do {
                let batch = try await history.receiveMembershipNotices(processChannel: processChannel, max: 256, timeout: .seconds(5))
                failures.succeeded()
                for notice in batch { applyNotice(notice) }
            } catch {
                if Task.isCancelled { break }
                await failures.failed { count in
                    logger.error("membership notice receive failed", metadata: ["error": "\(error)", "failures": "\(count)"])
                }
            }
        }
    }

    /// A streamed response that starts after its client left (a request abandoned while it
    /// waited for a worker): its consumer waits for credit that no connection will give, up to
    /// its credit timeout (two minutes), and a few of them held a worker's every slot. Its
    /// `disconnect_channel` is told at once that the client left, as a connection that closes
    /// tells it.
    private func tellStreamsTheirClientLeft(_ batch: [ReceivedMessage]) {
        let keys = batch.map { targetKey($0.channel) }
        let gone = targets.withLock { targets in
            zip(batch, keys).compactMap { received, key -> (String, String)? in
                guard targets[key] == nil, let disconnect = received.message["disconnect_channel"]?.stringValue else {
                    return nil
                }
                return (received.channel, disconnect)
            }
        }
        tellClientLeft(gone)
    }

    /// The same for one reply that a connection got after its request ended (the client left
    /// between the lookup above and the connection's turn to take it).
    func tellStreamTheClientLeft(_ reply: Message, replyChannel: String) {
        guard let disconnect = reply["disconnect_channel"]?.stringValue else { return }
        tellClientLeft([(replyChannel, disconnect)])
    }

    private func tellClientLeft(_ gone: [(reply: String, disconnect: String)]) {
        guard !gone.isEmpty else { return }
        let layer = self.layer
        let logger = self.logger
        Task {
            for (reply, disconnect) in gone {
                do {
                    try await layer.send(
                        HTTPDisconnectMessage(replyChannel: ReplyChannelName(trusted: reply), path: "").message, to: disconnect)
                } catch {
                    logger.debug("could not tell a stream whose client left", metadata: ["error": "\(error)"])
                }
            }
        }
    }

    /// Lets go of every resolved list (a name moved: they may name a connection that is gone,
    /// and they hold it).
    private func forgetResolutions() {
        resolutions.withLock { if !$0.isEmpty { $0.removeAll() } }
    }

    /// What `list` resolves to now: kept from its last bundle when no name moved since, else
    /// looked up (every name at once, under the lock) and kept.
    private func resolution(of list: BundleMemberList) -> ListResolution {
        let key = ObjectIdentifier(list)
        if let known = resolutions.withLock({ $0[key] }),
            known.holds(moves: moves.load(ordering: .acquiring), registrations: registrations.load(ordering: .acquiring))
        {
            return known
        }
        let keys = list.names.map(targetKey)
        // A name listed twice (no group set holds one twice; a crafted body might) would get
        // each message of a run twice in a row, out of order: such a list is looked up per
        // message, which keeps each reply in its place.
        var complete = Set(keys).count == keys.count
        var loops: [ObjectIdentifier] = []
        var runs: [(loopID: ObjectIdentifier, loop: any EventLoop, receivers: [any ReplyReceiver])] = []
        let counters = targets.withLock { targets -> (moves: Int, registrations: Int) in
            for key in keys where complete {
                guard let target = targets[key] else {
                    complete = false
                    runs = []
                    return (moves.load(ordering: .relaxed), registrations.load(ordering: .relaxed))
                }
                if let index = loops.firstIndex(of: target.loopID) {
                    runs[index].receivers.append(target.uncheckedReceiver)
                } else {
                    loops.append(target.loopID)
                    runs.append((target.loopID, target.loop, [target.uncheckedReceiver]))
                }
            }
            return (moves.load(ordering: .relaxed), registrations.load(ordering: .relaxed))
        }
        let resolution = ListResolution(
            list: list, moves: counters.moves, registrations: counters.registrations,
            runs: complete ? runs.map { ListResolution.Run(loopID: $0.loopID, loop: $0.loop, receivers: $0.receivers) } : nil)
        resolutions.withLock { kept in
            // Kept only while nothing moved since the look-up (a name let go meanwhile has
            // already emptied the table, and this must not come back into it).
            guard resolution.moves == moves.load(ordering: .acquiring) else { return }
            if kept.count >= Self.resolutionsKept { kept.removeAll() }
            kept[key] = resolution
        }
        return resolution
    }

    /// Hands what a take brought to the connections it names. A run of bundles that name one
    /// member list (one room's messages) whose names are all held here goes to each event loop
    /// as its receivers in a kept array and the messages: no look-up, no entry per member, and
    /// each connection takes the run's messages in order, then writes once. Everything else
    /// (single replies, lists with a name not held here) is looked up one message per member,
    /// between them in the order taken; each event loop gets its part of the hand-over in one
    /// hop, in that order.
    func deliver(_ taken: [ReceivedBundle]) {
        guard let first = taken.first else { return }
        if case .members(let list) = first.channels,
            taken.allSatisfy({ if case .members(let other) = $0.channels { other === list } else { false } }),
            let runs = resolution(of: list).runs
        {
            ServerMetrics.received[.process]?.increment(by: list.names.count * taken.count)
            listHandOvers.wrappingAdd(1, ordering: .relaxed)
            let messages = taken.map(\.message)
            for run in runs {
                run.loop.execute { Self.handOver(run.receivers, messages) }
            }
            return
        }
        // Runs of one resolved list, and what lies between them.
        var segments: [(range: Range<Int>, runs: [ListResolution.Run]?)] = []
        var index = 0
        while index < taken.count {
            var end = index + 1
            if case .members(let list) = taken[index].channels, let runs = resolution(of: list).runs {
                while end < taken.count, case .members(let other) = taken[end].channels, other === list { end += 1 }
                segments.append((index..<end, runs))
            } else {
                while end < taken.count {
                    if case .members(let list) = taken[end].channels, resolution(of: list).runs != nil { break }
                    end += 1
                }
                segments.append((index..<end, nil))
            }
            index = end
        }
        guard segments.contains(where: { $0.runs != nil }) else {
            deliver(taken.count == 1 ? taken[0].messages : taken.flatMap(\.messages))
            return
        }
        var work: [(loopID: ObjectIdentifier, loop: any EventLoop, items: [LoopWork])] = []
        func add(_ item: LoopWork, loopID: ObjectIdentifier, loop: any EventLoop) {
            if let at = work.firstIndex(where: { $0.loopID == loopID }) {
                work[at].items.append(item)
            } else {
                work.append((loopID, loop, [item]))
            }
        }
        for segment in segments {
            let part = taken[segment.range]
            if let runs = segment.runs {
                let messages = part.map(\.message)
                ServerMetrics.received[.process]?.increment(by: (runs.reduce(0) { $0 + $1.receivers.count }) * messages.count)
                listHandOvers.wrappingAdd(1, ordering: .relaxed)
                for run in runs { add(.list(run.receivers, messages), loopID: run.loopID, loop: run.loop) }
            } else {
                for run in lookUp(part.flatMap(\.messages)) { add(.looked(run.items), loopID: run.loopID, loop: run.loop) }
            }
        }
        for entry in work {
            let items = entry.items
            entry.loop.execute {
                for item in items {
                    switch item {
                    case .list(let receivers, let messages): Self.handOver(receivers, messages)
                    case .looked(let replies): Self.handOver(replies)
                    }
                }
            }
        }
    }

    /// One part of an event loop's hand-over.
    enum LoopWork: @unchecked Sendable {
        /// A resolved list's receivers (this loop's) and the messages for each of them.
        case list([any ReplyReceiver], [Message])
        /// Replies looked up one by one.
        case looked([(ReplyTarget, Message)])
    }

    /// One event loop's part of a hand-over of a resolved list's messages, on that loop: each
    /// receiver takes every message in order, then writes (one flush per connection).
    static func handOver(_ receivers: [any ReplyReceiver], _ messages: [Message]) {
        if messages.count == 1 {
            let payloads = ReplyPayloads()
            let message = messages[0]
            for receiver in receivers {
                receiver.receiveBatchedReply(message, payloads: payloads)
                receiver.endReplyBatch()
            }
            return
        }
        // One shared encoding per message (each remembers the last message it encoded).
        let payloads = messages.map { _ in ReplyPayloads() }
        for receiver in receivers {
            for index in messages.indices { receiver.receiveBatchedReply(messages[index], payloads: payloads[index]) }
            receiver.endReplyBatch()
        }
    }

    /// Hands one reply to the connection that holds `channel`.
    func deliver(_ message: Message, to channel: String) {
        deliver([ReceivedMessage(channel: channel, message: message)])
    }

    /// Hands each reply of `batch` to the connection that holds its channel; counts those none does.
    func deliver(_ batch: [ReceivedMessage]) {
        let runs = lookUp(batch)
        if runs.count == 1, runs[0].items.count == 1 {
            let (target, message) = runs[0].items[0]
            target.loop.execute { target.receiver.value.receiveReply(message) }
            return
        }
        // One hop per event loop, each taking its replies in the order they came.
        for run in runs {
            let items = run.items
            run.loop.execute { Self.handOver(items) }
        }
    }

    /// The connections of `batch`'s replies, by event loop (each loop's in the order they
    /// came); the replies for connections that are gone are counted as unroutable.
    private func lookUp(_ batch: [ReceivedMessage]) -> [(loopID: ObjectIdentifier, loop: any EventLoop, items: [(ReplyTarget, Message)])] {
        ServerMetrics.received[.process]?.increment(by: batch.count)
        var found: [(target: ReplyTarget, message: Message)] = []
        found.reserveCapacity(batch.count)
        // The keys are made outside the lock; the look-ups under it.
        let keys = batch.map { targetKey($0.channel) }
        targets.withLock { targets in
            for (received, key) in zip(batch, keys) {
                if let target = targets[key] { found.append((target, received.message)) }
            }
        }
        if found.count < batch.count {
            let lost = batch.count - found.count
            unroutable.add(lost, ordering: .relaxed)
            ServerMetrics.dropped[.unroutableReply]?.increment(by: lost)
            logger.debug("reply for a connection that is gone (counted in unroutable replies)")
            tellStreamsTheirClientLeft(batch)
        }
        var runs: [(loopID: ObjectIdentifier, loop: any EventLoop, items: [(ReplyTarget, Message)])] = []
        for (target, message) in found {
            if let index = runs.firstIndex(where: { $0.loopID == target.loopID }) {
                runs[index].items.append((target, message))
            } else {
                runs.append((target.loopID, target.loop, [(target, message)]))
            }
        }
        return runs
    }

    /// One event loop's part of a hand-over, on that loop: each connection takes its replies in
    /// the order they came, and its writes go out right after its last reply of the hand-over
    /// (one flush per connection). Flushing there, not in a second pass over every connection,
    /// lets the first members' bytes leave while the loop still writes to the others: a group
    /// message to 500 members here no longer waits for all 500 frames to be queued first.
    static func handOver(_ items: [(ReplyTarget, Message)]) {
        let payloads = ReplyPayloads()
        var lastTurn: [ObjectIdentifier: Int] = [:]
        lastTurn.reserveCapacity(items.count)
        for (turn, item) in items.enumerated() { lastTurn[ObjectIdentifier(item.0)] = turn }
        for (turn, (target, message)) in items.enumerated() {
            let receiver = target.receiver.value
            receiver.receiveBatchedReply(message, payloads: payloads)
            if lastTurn[ObjectIdentifier(target)] == turn { receiver.endReplyBatch() }
        }
    }

    var activeCount: Int { targets.withLock { $0.count } }
    /// Member lists kept resolved (for tests).
    var keptListCount: Int { resolutions.withLock { $0.count } }

    /// The most replies handed over at once (a few messages to each member of a room of thousands).
    static let largestHandOver = 16_384
    /// The longest a hand-over waits for more replies to collect before it is delivered.
    static let longestCollection = Duration.milliseconds(5)

    /// Tells every receiver, on its event loop, that the layer lost its data.
    private func tellStoreLost() {
        for target in targets.withLock({ Array($0.values) }) {
            target.loop.execute { target.receiver.value.replyStoreLost() }
        }
    }
    var unroutableCount: Int { unroutable.load(ordering: .relaxed) }

    /// Registers the process channel, then reads until cancelled (the interface server's task
    /// group runs it beside the connections).
    func run() async {
        await withDiscardingTaskGroup { group in
            group.addTask { await self.keepRegistered() }
            // On an event loop: a batch read resumes there and the hand-over to that loop's
            // sockets starts without waking another thread.
            group.addTask(executorPreference: readExecutor) { await self.read() }
            if let history = layer as? any ChannelLayerHistory { group.addTask { await self.readNotices(history) } }
            if let bound = cutOffBound { group.addTask { await self.watchCutOff(bound) } }
        }
    }

    /// Registers at once, then renews on a timer until cancelled.
    private func keepRegistered() async {
        var failures = 0
        while !Task.isCancelled {
            do {
                if try await layer.registeredAsBundleReader(processChannel) == false {
                    logger.warning(
                        "the channel layer lost its data (groups, sessions): closing sockets with 1012",
                        metadata: ["reply_channel": "\(processChannel)"])
                    storeLost.withLock { $0 }?()
                    tellStoreLost()
                }
                failures = 0
                reached.withLock { $0 = (ContinuousClock.now, false) }
            } catch {
                if Task.isCancelled { break }
                // A refusal (out of memory, say) is an answer: the layer is reachable.
                if error.code != .connectionLost, error.code != .closed, error.code != .cancelled {
                    reached.withLock { $0 = (ContinuousClock.now, false) }
                }
                failures += 1
                if failures == 1 || failures % 30 == 0 {
                    logger.warning("cannot register the reply channel", metadata: ["error": "\(error)"])
                }
            }
            try? await Task.sleep(for: registrationInterval)
        }
    }

    /// Looks once a second at when the layer was last reached (a call that hangs in a partition
    /// counts as not reaching it): past `bound`, the server is cut off, and says so once.
    private func watchCutOff(_ bound: Duration) async {
        while !Task.isCancelled {
            try? await Task.sleep(for: .seconds(1))
            let now = ContinuousClock.now
            let silent = reached.withLock { reached -> Duration? in
                guard !reached.told, now - reached.at > bound else { return nil }
                reached.told = true
                return now - reached.at
            }
            guard let silent else { continue }
            logger.error(
                "cut off from the channel layer: closing sockets with 1012 (what was sent to them meanwhile may be lost; clients reconnect and recover)",
                metadata: ["unreachable_s": "\(Int(silent.seconds))", "reply_channel": "\(processChannel)"])
            cutOff.withLock { $0 }?(silent)
        }
    }

    /// Up to 64 bodies from the process channel: bundles whole when the layer bundles.
    private func take(timeout: Duration) async throws(ChannelLayerError) -> [ReceivedBundle] {
        if let bundling = layer as? any ChannelLayerBundling {
            return try await bundling.receiveBundles(from: processChannel, max: 64, timeout: timeout)
        }
        return try await layer.receiveBatch(channels: [processChannel], max: 64, timeout: timeout).map {
            ReceivedBundle(channel: $0.channel, message: $0.message)
        }
    }

    /// Reads until cancelled. A failing layer (Redis down) is retried after a pause, so the
    /// server keeps answering (with 503s) and resumes when the layer is back.
    private func read() async {
        var failures = FailureStreak()
        while !Task.isCancelled {
            do {
                // Up to 64 bodies per round trip under load (a bundle is one, with its member
                // list), dispatched in the order they were sent.
                var batch = try await take(timeout: .seconds(5))
                // Under load, what else is already here (more bundles) goes in the same
                // hand-over, so a connection sent several messages gets them in one write: up to
                // `largestHandOver` replies, for at most `longestCollection`. What was taken is
                // delivered even when a later take fails.
                var last = batch.count
                var replies = batch.reduce(0) { $0 + $1.count }
                let collectedBy = ContinuousClock.now + Self.longestCollection
                var failed: (any Error)?
                while last == 64, replies < Self.largestHandOver, ContinuousClock.now < collectedBy {
                    do {
                        let more = try await take(timeout: .zero)
                        batch += more
                        last = more.count
                        replies += more.reduce(0) { $0 + $1.count }
                    } catch {
                        failed = error
                        break
                    }
                }
                deliver(batch)
                if let failed { throw failed }
                failures.succeeded()
            } catch {
                if Task.isCancelled { break }
                // Back off while the layer is down; this waits on a timer, it does not poll a queue.
                await failures.failed { count in
                    logger.error("reply channel receive failed", metadata: ["error": "\(error)", "failures": "\(count)"])
                }
            }
        }
    }
}

/// One `String` instance per group name and history epoch in this process. Every socket that
/// follows a group keeps its name (a dictionary key) and epoch, and compares them with each
/// publication's: with one shared instance (the publication's taken apart once per hand-over
/// and interned) the comparison is an identity check, where a copy of its own per socket cost a
/// cache miss and a `memcmp` per member. Bounded: past 10,000 names it starts again (a name
/// kept from before only compares by its bytes again).
final class StringInterner: Sendable {
    static let names = StringInterner()
    private let table = Mutex<[String: String]>([:])

    func intern(_ string: String) -> String {
        table.withLock { table in
            if let found = table[string] { return found }
            if table.count >= 10_000 { table.removeAll(keepingCapacity: true) }
            table[string] = string
            return string
        }
    }
}
