import ASGI
import CoreMetrics
import DequeModule
import Logging
import NIOCore

/// Sends one connection's messages to the channel layer, in the order they were made, one
/// at a time; lives on the connection's event loop.
///
/// A send that fails is not dropped: it is retried with growing pauses while the client is
/// asked to wait (reading from it stops, so TCP pushes back). A full channel is retried for
/// `channelFullTimeout`; an unreachable layer (Redis down) for `outageTimeout`. Only then does
/// the connection give up (1013 / 1011 / 503, the owner decides), and whatever was still held
/// is counted as dropped. Reading also stops while more than `heldLimit` messages wait.
final class LayerSender {
    enum GiveUp {
        /// The channel stayed full for the whole `channelFullTimeout`.
        case full
        /// The layer could not be reached for the whole `outageTimeout`.
        case unavailable
    }

    private let server: ServerContext
    private let loop: any EventLoop
    private let outageTimeout: Duration
    /// Messages that may wait before reading pauses (an upload lowers it to 1 while it streams).
    var heldLimit: Int {
        didSet { heldLimit = max(1, heldLimit) }
    }
    private var queue = Deque<(message: Message, channel: String)>()
    private var busy = false
    private var failingSince: NIODeadline?
    private var pause = TimeAmount.milliseconds(25)
    private var readingPaused = false
    private var gaveUp = false

    /// Called once, on the loop, when the sender gives up; later messages are dropped and counted.
    var onGiveUp: ((GiveUp) -> Void)?
    /// Called on the loop with false to stop reading from the client and true to resume.
    var setReading: ((Bool) -> Void)?
    /// Called on the loop after each message the layer accepted.
    var onSent: ((String) -> Void)?

    init(server: ServerContext, loop: any EventLoop, outageTimeout: Duration, heldLimit: Int) {
        self.server = server
        self.loop = loop
        self.outageTimeout = outageTimeout
        self.heldLimit = max(1, heldLimit)
    }

    /// Takes messages again after giving up (an HTTP connection's next request).
    func resume() { gaveUp = false }

    /// Messages accepted by `send` and not yet taken by the layer.
    var held: Int { queue.count }

    func send(_ message: Message, to channel: String) {
        guard !gaveUp else {
            server.counters.count(.heldDropped)
            ServerMetrics.dropped[.retriesExhausted]?.increment()
            return
        }
        queue.append((message, channel))
        server.router.workInHand.begin()
        updateReading()
        pump()
    }

    private func pump() {
        guard !busy, let head = queue.first else { return }
        busy = true
        let layer = server.layer
        let bound = NIOLoopBound(self, eventLoop: loop)
        let loop = self.loop
        Task {
            let result: Result<Void, any Error>
            do {
                try await layer.send(head.message, to: head.channel)
                result = .success(())
            } catch {
                result = .failure(error)
            }
            loop.execute { bound.value.finished(result) }
        }
    }

    private func finished(_ result: Result<Void, any Error>) {
        busy = false
        switch result {
        case .success:
            if failingSince != nil { server.counters.count(.sendRecovered) }
            failingSince = nil
            pause = .milliseconds(25)
            let sent = queue.removeFirst()
            server.router.workInHand.finish()
            ServerMetrics.sent[ChannelKind(channel: sent.channel)]?.increment()
            onSent?(sent.channel)
        case .failure(let error):
            let code = (error as? ChannelLayerError)?.code
            switch code {
            case .channelFull?, .connectionLost?, .backendError?:
                retry(full: code == .channelFull, error: error)
                return
            default:
                // Not worth another try (too large, invalid, the layer closed): this one is lost.
                let dropped = queue.removeFirst()
                server.router.workInHand.finish()
                server.counters.count(.heldDropped)
                ServerMetrics.dropped[code == .messageTooLarge ? .tooLarge : .malformed]?.increment()
                server.logger.warning(
                    "dropped a message the layer refused",
                    metadata: [
                        "channel": "\(dropped.channel)", "error": "\(error)",
                    ])
            }
        }
        updateReading()
        pump()
    }

    private func retry(full: Bool, error: any Error) {
        let now = NIODeadline.now()
        if failingSince == nil {
            failingSince = now
            server.counters.count(full ? .sendFullRetried : .sendHeldForOutage)
            server.logger.warning(
                full ? "channel full; holding and retrying" : "channel layer unavailable; holding and retrying",
                metadata: ["channel": "\(queue.first?.channel ?? "")", "error": "\(error)"])
        }
        let limit = full ? server.configuration.channelFullTimeout : outageTimeout
        if now - failingSince! >= TimeAmount(limit) {
            gaveUp = true
            server.counters.count(.heldDropped, by: queue.count)
            ServerMetrics.dropped[full ? .channelFull : .retriesExhausted]?.increment(by: queue.count)
            server.router.workInHand.finish(queue.count)
            queue.removeAll()
            updateReading()
            onGiveUp?(full ? .full : .unavailable)
            return
        }
        updateReading()
        busy = true
        let wait = pause
        pause = min(pause * 2, .seconds(1))
        let bound = NIOLoopBound(self, eventLoop: loop)
        loop.scheduleTask(in: wait) {
            bound.value.busy = false
            bound.value.pump()
        }
    }

    private func updateReading() {
        let shouldPause = !gaveUp && (queue.count >= heldLimit || failingSince != nil)
        guard shouldPause != readingPaused else { return }
        readingPaused = shouldPause
        setReading?(!shouldPause)
    }
}
