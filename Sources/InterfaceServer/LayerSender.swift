import ASGI
import CoreMetrics
import DequeModule
import Logging
import NIOCore

/// Sends one connection's messages to the channel layer, in the order they were made, one
/// at a time; lives on the connection's event loop.
///
/// The sends are made by one long-lived loop per sender (``run(on:)``), a child of the
/// connection's task (see ``ConnectionSenders``) that runs on the connection's event loop: a
/// message is appended to a queue and the loop, parked while the queue is empty, takes it. No
/// task per message, and no hop back to the loop to learn how a send went.
///
/// A send that fails is not dropped: it is retried with growing pauses while the client is
/// asked to wait (reading from it stops, so TCP pushes back). A full channel is retried for
/// `channelFullTimeout`; an unreachable layer (Redis down) for `outageTimeout`. Only then does
/// the connection give up (1013 / 1011 / 503, the owner decides), and whatever was still held
/// is counted as dropped. Reading also stops while more than `heldLimit` messages wait.
///
/// A message sent with `outlivesGiveUp` (a socket's disconnect) is not given up with the rest:
/// it stays, on one bound of its own (a second give-up drops it, counted). The application that
/// was told a socket connected hears that it went, even when the socket went because its frames
/// could not be sent (a group would otherwise keep the dead socket as a member until its
/// expiry); one that was never told (the layer took nothing of this sender's) is not told either.
///
/// Messages with an `order` (a WebSocket's) are numbered on past the ones dropped: a message
/// after a drop carries the order that follows the last one the layer took, so an application
/// that orders a socket's messages has no gap to wait out (its disconnect would otherwise expire
/// behind the dropped frames).
///
/// A message for a channel another connection of this server found full waits in line for it
/// (``FullChannels``) instead of trying: one sender probes a full channel, not all of them.
final class LayerSender {
    enum GiveUp {
        /// The channel stayed full for the whole `channelFullTimeout`.
        case full
        /// The layer could not be reached for the whole `outageTimeout`.
        case unavailable
    }

    private let server: ServerContext
    let loop: any EventLoop
    private let outageTimeout: Duration
    /// Messages that may wait before reading pauses (an upload lowers it to 1 while it streams).
    var heldLimit: Int {
        didSet { heldLimit = max(1, heldLimit) }
    }
    private var queue = Deque<(message: Message, channel: String, outlivesGiveUp: Bool)>()
    private var failingSince: NIODeadline?
    private var pause = TimeAmount.milliseconds(25)
    private var readingPaused = false
    private var gaveUp = false
    /// The connection is gone: the loop ends once the queue is empty.
    private var closed = false
    /// Whether a send loop is running for this sender.
    private var running = false
    /// The send loop, parked on an empty queue.
    private var parked: CheckedContinuation<Void, Never>?
    /// Where the send loop runs: the connection's task (nil: a task of the sender's own).
    private let owner: ConnectionSenders?
    /// The full channel this sender probes (its head was refused as full), if any.
    private var probing: String?
    /// Refused as full while another sender probes: back in line, at its head.
    private var backInLine = false
    /// The full channel whose line let this sender go, until its send there is through or refused.
    private var hasTurn: String?
    /// The head's last send failed for want of the layer (not a full channel): retried on the
    /// outage's pauses and bound, never in a full channel's line.
    private var inOutage = false
    /// Ordered messages dropped so far: later ones are numbered down by as many.
    private var orderShift: Int64 = 0
    /// The layer took a message of this sender's (a give-up's survivors follow something).
    private var acceptedAny = false

    /// Called once, on the loop, when the sender gives up; later messages are dropped and counted.
    var onGiveUp: ((GiveUp) -> Void)?
    /// Called on the loop with false to stop reading from the client and true to resume.
    var setReading: ((Bool) -> Void)?
    /// Called on the loop after each message the layer accepted.
    var onSent: ((String) -> Void)?
    /// Called on the loop with the channel of a message the layer refused for good (too large, invalid).
    var onDropped: ((String) -> Void)?

    init(server: ServerContext, loop: any EventLoop, outageTimeout: Duration, heldLimit: Int, owner: ConnectionSenders?) {
        self.server = server
        self.loop = loop
        self.outageTimeout = outageTimeout
        self.heldLimit = max(1, heldLimit)
        self.owner = owner
    }

    /// Takes messages again after giving up (an HTTP connection's next request).
    func resume() { gaveUp = false }

    /// Messages accepted by `send` and not yet taken by the layer.
    var held: Int { queue.count }

    /// `count` ordered messages were dropped before they reached this sender (frames past a
    /// socket's share): later ones are numbered down by as many.
    func skipOrders(_ count: Int) { orderShift += Int64(count) }

    /// `message` with its `order` (if it has one) lowered by `shift`.
    private static func numbered(_ message: Message, down shift: Int64) -> Message {
        guard shift > 0, let order = message["order"]?.intValue else { return message }
        var message = message
        message["order"] = .int(order - shift)
        return message
    }

    func send(_ message: Message, to channel: String, outlivesGiveUp: Bool = false) {
        let message = Self.numbered(message, down: orderShift)
        guard !gaveUp || (outlivesGiveUp && acceptedAny) else {
            server.counters.count(.heldDropped)
            ServerMetrics.dropped[.retriesExhausted]?.increment()
            if message["order"] != nil { orderShift += 1 }
            return
        }
        queue.append((message, channel, outlivesGiveUp))
        server.router.workInHand.begin()
        updateReading()
        if let parked {
            self.parked = nil
            parked.resume()
        } else if !running {
            startLoop()
        }
    }

    /// The connection closed: the send loop ends once what is held went (or was given up).
    func close() {
        closed = true
        if let parked {
            self.parked = nil
            parked.resume()
        }
    }

    /// Starts the send loop: in the connection's task when it has one, otherwise (a sender
    /// used after its connection's task ended, a test's channel) in a task of its own.
    private func startLoop() {
        running = true
        let bound = NIOLoopBound(self, eventLoop: loop)
        if let owner, owner.adopt(bound) { return }
        let actor = EventLoopActor(loop: loop)
        Task { await actor.serve(bound) }
    }

    /// The send loop: takes the queue's head, sends it, and on failure waits and tries again;
    /// parks while the queue is empty; ends when the connection closed and nothing is held, or
    /// when cancelled (what is held is counted as dropped).
    func run(on actor: isolated EventLoopActor) async {
        defer { running = false }
        while !Task.isCancelled {
            guard let head = queue.first else {
                if closed { return }
                await park(on: actor)
                continue
            }
            let atHead = backInLine
            backInLine = false
            if probing == nil, !inOutage, server.fullChannels.isHeld(head.channel) {
                guard await waitInLine(for: head.channel, atHead: atHead, on: actor) else { continue }
                hasTurn = head.channel
            }
            let run = runAtHead()
            do {
                if run > 1 {
                    let receipt = pendingRun?.receipt ?? nextReceipt()
                    pendingRun = (receipt, run)
                    let taken = try await server.layer.send(queue.prefix(run).map(\.message), to: head.channel, receipt: receipt)
                    pendingRun = nil
                    server.fullChannels.accepted(head.channel)
                    for _ in 0..<taken { sent() }
                    continue
                }
                if sendsRuns {
                    // A run of one, under a receipt too: tried again after a lost reply, it is
                    // stored once (marked as sent again instead, a copy could run twice when
                    // its first copy's turn took longer than the ordering gate's grace).
                    let receipt = pendingRun?.receipt ?? nextReceipt()
                    pendingRun = (receipt, 1)
                    _ = try await server.layer.send([head.message], to: head.channel, receipt: receipt)
                    pendingRun = nil
                } else {
                    try await server.layer.send(head.message, to: head.channel)
                }
                hasTurn = nil
                if let channel = probing {
                    probing = nil
                    server.fullChannels.stopProbing(channel, accepted: true)
                } else {
                    server.fullChannels.accepted(head.channel)
                }
                sent()
            } catch {
                // A run (or a run of one) whose script may have run is tried again as it was, under
                // its receipt (the layer then stores it at most once); any other failure stored
                // nothing of it.
                if pendingRun != nil, !(error.code == .connectionLost && error.mayHaveRun) { pendingRun = nil }
                guard let wait = failed(error), wait > .zero else { continue }
                try? await Task.sleep(for: .nanoseconds(wait.nanoseconds))
            }
        }
        dropHeld()
    }

    /// How many messages from the head go to the layer in one send: the head's run of messages
    /// for its channel (a socket's burst of frames, up to 64) while sends go through, so a burst
    /// takes a round trip per 64 frames, not one per frame, however busy this connection's
    /// event loop is between round trips (a loop writing a group message to its members had a
    /// socket's burst go out a frame per pass, and everything after it wait). 1 while the
    /// channel is full, the layer fails, or for a message that outlives a give-up; the same run
    /// again after a failure that may have stored it (``pendingRun``).
    private func runAtHead() -> Int {
        if let pendingRun { return pendingRun.count }
        guard queue.count > 1, sendsRuns, probing == nil, hasTurn == nil, !inOutage, failingSince == nil, let head = queue.first,
            !head.outlivesGiveUp
        else { return 1 }
        var run = 1
        for entry in queue.dropFirst() {
            guard run < Self.largestRun, entry.channel == head.channel, !entry.outlivesGiveUp else { break }
            run += 1
        }
        return run
    }

    /// The most messages one send takes.
    static let largestRun = 64
    /// A run whose send failed with its connection after it may have been stored: the next try
    /// sends the same messages under the same receipt (not marked as sent again: the layer
    /// stores them once).
    private var pendingRun: (receipt: RunReceipt, count: Int)?
    /// This sender's name for its runs' receipts (one key in the layer per sender) and the
    /// number of its last run.
    private lazy var receiptHolder = ChannelNames.randomLetters(20)
    private var runsSent = 0

    private func nextReceipt() -> RunReceipt {
        runsSent += 1
        return RunReceipt(holder: receiptHolder, number: runsSent)
    }
    /// Whether the layer stores a run in one step (one at a time, a run would only cost more:
    /// and a lost connection would leave it unknown which of them were stored).
    private lazy var sendsRuns = (server.layer as? any ChannelLayerSendMany)?.sendsManyAtOnce ?? false

    /// Waits in line for a channel another sender found full (held, as a failed send is: the
    /// client's reading paused, the same bound); false when it gave up or was cancelled.
    private func waitInLine(for channel: String, atHead: Bool, on actor: isolated EventLoopActor) async -> Bool {
        if failingSince == nil {
            failingSince = .now()
            server.counters.count(.sendFullRetried)
            updateReading()
        }
        let deadline = failingSince! + TimeAmount(server.configuration.channelFullTimeout)
        if await server.fullChannels.waitTurn(channel, until: deadline, on: loop, atHead: atHead) { return true }
        if !Task.isCancelled, NIODeadline.now() >= deadline { giveUp(full: true) }
        return false
    }

    private func park(on actor: isolated EventLoopActor) async {
        let bound = NIOLoopBound(self, eventLoop: loop)
        let loop = self.loop
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                if Task.isCancelled || closed || !queue.isEmpty {
                    continuation.resume()
                } else {
                    parked = continuation
                }
            }
        } onCancel: {
            loop.execute { bound.value.close() }
        }
    }

    private func sent() {
        if failingSince != nil { server.counters.count(.sendRecovered) }
        failingSince = nil
        inOutage = false
        pause = .milliseconds(25)
        acceptedAny = true
        let sent = queue.removeFirst()
        server.router.workInHand.finish()
        ServerMetrics.sent[ChannelKind(channel: sent.channel)]?.increment()
        updateReading()
        onSent?(sent.channel)
    }

    /// Handles a failed send of the queue's head; returns the pause before the next try, or
    /// nil to go on at once (the message was dropped, or everything held was given up).
    private func failed(_ error: any Error) -> TimeAmount? {
        let code = (error as? ChannelLayerError)?.code
        switch code {
        case .channelFull?, .connectionLost?, .backendError?, .outOfMemory?:
            // A lost connection may have taken the reply of a send that was stored: the next try
            // is marked, so an ordering gate that meets both copies runs the message once.
            if code == .connectionLost, (error as? ChannelLayerError)?.mayHaveRun == true, pendingRun == nil, let head = queue.first,
                !head.message.isResent
            {
                queue[queue.startIndex].message = head.message.markedResent()
            }
            return retry(full: code == .channelFull, error: error)
        default:
            // Not worth another try (too large, invalid, the layer closed): this one is lost.
            // The next one has not failed yet (it may have waited in a full channel's line: its
            // wait is over), so reading resumes unless it fails in turn.
            stopProbing()
            inOutage = false
            failingSince = nil
            pause = .milliseconds(25)
            let dropped = queue.removeFirst()
            var lost = 1
            if dropped.message["order"] != nil {
                orderShift += 1
                for index in queue.indices { queue[index].message = Self.numbered(queue[index].message, down: 1) }
            }
            if !acceptedAny {
                // Nothing of this sender's reached the application (a connect too large): what
                // would follow it there (a disconnect) has nothing to follow.
                let before = queue.count
                queue.removeAll { $0.outlivesGiveUp }
                lost += before - queue.count
            }
            onDropped?(dropped.channel)
            server.router.workInHand.finish(lost)
            server.counters.count(.heldDropped, by: lost)
            ServerMetrics.dropped[code == .messageTooLarge ? .tooLarge : .malformed]?.increment()
            server.logger.warning(
                "dropped a message the layer refused",
                metadata: [
                    "channel": "\(dropped.channel)", "error": "\(error)",
                ])
            updateReading()
            return nil
        }
    }

    private func retry(full: Bool, error: any Error) -> TimeAmount? {
        let now = NIODeadline.now()
        if failingSince == nil {
            failingSince = now
            server.counters.count(full ? .sendFullRetried : .sendHeldForOutage)
        }
        if !full {
            // The layer failed this sender's send: a turn the line gave it, or the probing it did,
            // goes to the next one in line (held for an outage, it is not held for a full channel).
            stopProbing()
        } else if inOutage {
            // Full now, after an outage: the full channel's bound counts from here.
            failingSince = now
        }
        if !full, !inOutage {
            server.logger.warning(
                "channel layer unavailable; holding and retrying",
                metadata: ["channel": "\(queue.first?.channel ?? "")", "error": "\(error)"])
        }
        inOutage = !full
        let limit = full ? server.configuration.channelFullTimeout : outageTimeout
        if now - failingSince! >= TimeAmount(limit) {
            giveUp(full: full)
            return nil
        }
        if full, probing == nil, let channel = queue.first?.channel {
            hasTurn = nil
            guard server.fullChannels.startProbing(channel) else {
                // Another sender of this server probes the channel: back in line, at its head.
                backInLine = true
                updateReading()
                return .zero
            }
            // This sender probes the channel, often (one prober per channel and server); the
            // server's other senders for it wait in line.
            probing = channel
            pause = .milliseconds(10)
            server.logger.warning(
                "channel full; holding and retrying (other connections' messages for it wait in line)",
                metadata: ["channel": "\(channel)", "error": "\(error)"])
        }
        updateReading()
        let wait = pause
        pause = min(pause * 2, probing != nil ? .milliseconds(100) : .seconds(1))
        return wait
    }

    /// Gives up on what is held (a full channel or an unreachable layer for its whole bound),
    /// but for the messages that outlive a give-up: they are tried next, on one bound of their
    /// own, when the layer took something of this sender's before. One that is itself what the
    /// layer refused for the whole bound (at the head), or already had its bound, is dropped.
    private func giveUp(full: Bool) {
        let keep = !gaveUp && acceptedAny && queue.first?.outlivesGiveUp == false
        gaveUp = true
        let dropped = dropHeld(keepingSurvivors: keep)
        ServerMetrics.dropped[full ? .channelFull : .retriesExhausted]?.increment(by: dropped)
        onGiveUp?(full ? .full : .unavailable)
    }

    /// Stops probing a full channel without a send through it (or gives up a turn the line
    /// gave this sender): the next sender in line goes.
    private func stopProbing() {
        if let channel = hasTurn {
            hasTurn = nil
            server.fullChannels.passTurn(channel)
        }
        guard let channel = probing else { return }
        probing = nil
        server.fullChannels.stopProbing(channel, accepted: false)
    }

    /// Counts what is held as dropped and lets it go (all of it, or all but the messages that
    /// outlive a give-up); returns how many were dropped.
    @discardableResult
    private func dropHeld(keepingSurvivors: Bool = false) -> Int {
        pendingRun = nil
        stopProbing()
        inOutage = false
        backInLine = false
        failingSince = nil
        pause = .milliseconds(25)
        let before = queue.count
        if keepingSurvivors {
            // A survivor is numbered down by the ordered messages dropped before it.
            var kept = Deque<(message: Message, channel: String, outlivesGiveUp: Bool)>()
            var shift: Int64 = 0
            for entry in queue {
                if entry.outlivesGiveUp {
                    kept.append((Self.numbered(entry.message, down: shift), entry.channel, true))
                } else if entry.message["order"] != nil {
                    shift += 1
                }
            }
            orderShift += shift
            queue = kept
        } else {
            queue.removeAll()
        }
        let dropped = before - queue.count
        if dropped > 0 {
            server.counters.count(.heldDropped, by: dropped)
            server.router.workInHand.finish(dropped)
        }
        updateReading()
        return dropped
    }

    private func updateReading() {
        let shouldPause = !gaveUp && (queue.count >= heldLimit || failingSince != nil)
        guard shouldPause != readingPaused else { return }
        readingPaused = shouldPause
        setReading?(!shouldPause)
    }
}

/// An actor whose code runs on one event loop: what it awaits resumes on that loop, so a send
/// loop can touch its connection's loop-bound state between sends.
actor EventLoopActor {
    nonisolated let loop: any EventLoop

    init(loop: any EventLoop) { self.loop = loop }

    nonisolated var unownedExecutor: UnownedSerialExecutor { loop.executor.asUnownedSerialExecutor() }

    /// Runs a sender's loop on this actor (on the loop).
    func serve(_ sender: NIOLoopBound<LayerSender>) async {
        await sender.value.run(on: self)
    }
}

/// The send loops of one connection's senders (the connection's, its WebSocket's, its HTTP/2
/// streams'), run as children of the connection's task: the task ends when the connection has
/// closed and every sender has sent (or given up) what it held; cancelled, they all stop.
final class ConnectionSenders: Sendable {
    private let loop: any EventLoop
    private let stream: AsyncStream<NIOLoopBound<LayerSender>>
    private let continuation: AsyncStream<NIOLoopBound<LayerSender>>.Continuation

    init(loop: any EventLoop) {
        self.loop = loop
        (stream, continuation) = AsyncStream.makeStream(bufferingPolicy: .unbounded)
    }

    /// Hands a sender's loop to the connection's task; false once that task has ended.
    func adopt(_ sender: NIOLoopBound<LayerSender>) -> Bool {
        if case .enqueued = continuation.yield(sender) { return true }
        return false
    }

    /// No more senders: the connection closed.
    func finish() { continuation.finish() }

    /// Runs every adopted sender's loop until the connection closed and all of them ended.
    func run() async {
        let actor = EventLoopActor(loop: loop)
        await withDiscardingTaskGroup { group in
            for await sender in stream {
                group.addTask { await actor.serve(sender) }
            }
        }
    }
}
