import ASGI
import CoreMetrics
import Logging
import Synchronization

/// The one reader of this process's reply channel: takes every `<process>!<conn>` message and
/// hands it to the connection that registered that name. Nothing per connection waits on the
/// layer; a message for a name nobody holds (the client left) is dropped and counted.
///
/// It registers the process channel with the layer as one that reads bundled group messages
/// (one message per group send for all of this server's members) and renews that registration
/// every `registrationInterval`; a registration found gone means the layer lost its data, and
/// `onStoreLost` runs (the server closes its sockets with 1012 so clients join again).
final class ReplyRouter: Sendable {
    let processChannel: String
    private let layer: any ChannelLayer
    private let logger: Logger
    private let handlers = Mutex<[String: @Sendable (Message) -> Void]>([:])
    private let unroutable = Atomic<Int>(0)

    private let registrationInterval: Duration
    private let storeLost = Mutex<(@Sendable () -> Void)?>(nil)
    /// Each registered name is a connection waiting for a reply: work in hand.
    let workInHand = WorkInHand()

    init(layer: any ChannelLayer, prefix: String, logger: Logger, registrationInterval: Duration = .seconds(2)) {
        self.layer = layer
        self.logger = logger
        self.processChannel = prefix + "." + ChannelNames.randomLetters(10) + "!"
        self.registrationInterval = registrationInterval
    }

    /// What to do when the layer is found to have lost its data.
    func whenStoreLost(_ action: @escaping @Sendable () -> Void) {
        storeLost.withLock { $0 = action }
    }

    /// A fresh reply channel name under this process's channel.
    func newReplyChannel() -> String { processChannel + ChannelNames.randomLetters(12) }

    func register(_ channel: String, _ handler: @escaping @Sendable (Message) -> Void) {
        if handlers.withLock({ $0.updateValue(handler, forKey: channel) }) == nil { workInHand.begin() }
    }

    func unregister(_ channel: String) {
        if handlers.withLock({ $0.removeValue(forKey: channel) }) != nil { workInHand.finish() }
    }

    /// Hands a reply to the connection that holds `channel`; counts it when none does.
    func deliver(_ message: Message, to channel: String) {
        ServerMetrics.received[.process]?.increment()
        if let handler = handlers.withLock({ $0[channel] }) {
            handler(message)
        } else {
            unroutable.add(1, ordering: .relaxed)
            ServerMetrics.dropped[.unroutableReply]?.increment()
            logger.debug("reply for a connection that is gone (counted in unroutable replies)")
        }
    }

    var activeCount: Int { handlers.withLock { $0.count } }
    var unroutableCount: Int { unroutable.load(ordering: .relaxed) }

    /// Registers the process channel, then reads until cancelled.
    func run() async {
        await withDiscardingTaskGroup { group in
            group.addTask { await self.keepRegistered() }
            group.addTask { await self.read() }
        }
    }

    /// Registers at once, then renews on a timer until cancelled.
    private func keepRegistered() async {
        var failures = 0
        while !Task.isCancelled {
            do {
                if try await layer.registerBundleReader(processChannel) == false {
                    logger.warning(
                        "the channel layer lost its data (groups, sessions): closing sockets with 1012",
                        metadata: ["reply_channel": "\(processChannel)"])
                    storeLost.withLock { $0 }?()
                }
                failures = 0
            } catch {
                if Task.isCancelled { break }
                failures += 1
                if failures == 1 || failures % 30 == 0 {
                    logger.warning("cannot register the reply channel", metadata: ["error": "\(error)"])
                }
            }
            try? await Task.sleep(for: registrationInterval)
        }
    }

    /// Reads until cancelled. A failing layer (Redis down) is retried after a pause, so the
    /// server keeps answering (with 503s) and resumes when the layer is back.
    private func read() async {
        var failures = 0
        while !Task.isCancelled {
            do {
                // Up to 64 replies per round trip under load, dispatched in the order they were sent.
                let batch = try await layer.receiveBatch(channels: [processChannel], max: 64, timeout: .seconds(5))
                failures = 0
                for received in batch { deliver(received.message, to: received.channel) }
            } catch {
                if Task.isCancelled { break }
                failures += 1
                if failures == 1 || failures % 30 == 0 {
                    logger.error("reply channel receive failed", metadata: ["error": "\(error)"])
                }
                // Back off while the layer is down; this waits on a timer, it does not poll a queue.
                try? await Task.sleep(for: Retry.backoff(after: failures))
            }
        }
    }
}
