import ASGI
import Logging
import Synchronization

/// Pulls messages from the channels the routing names and runs the matching consumers.
/// `concurrency` loops run side by side, each with its own blocking receive.
public final class Worker: Sendable {
    public let router: Router
    public let layer: any ChannelLayer
    public let channels: [String]
    public let environment: ConsumerEnvironment
    private let concurrency: Int
    private let logger: Logger
    private let retriesDropped = Atomic<Int>(0)

    /// How many times a message may be put back with `ConsumerError.consumeLater`.
    public static let maxRetries = 10
    /// The key that carries a re-queued message's retry count.
    public static let retryKey = "__retries__"

    private let stopping = Atomic<Bool>(false)
    private let processed = Atomic<Int>(0)

    /// - Parameters:
    ///   - only: glob patterns; when given, only matching channels are listened on.
    ///   - exclude: glob patterns of channels not to listen on.
    public init(router: Router, layer: any ChannelLayer, concurrency: Int = 4, only: [String] = [],
                exclude: [String] = [], environment: ConsumerEnvironment = ConsumerEnvironment(),
                logger: Logger = Logger(label: "channels.worker")) {
        self.router = router
        self.environment = environment
        self.layer = layer
        self.concurrency = max(1, concurrency)
        self.logger = logger
        // Channels 1.x defaults: connects are accepted and HTTP gets 404 even when unrouted.
        var listen = router.channels.union(["http.request", "websocket.connect"])
        if !only.isEmpty {
            let patterns = only.map(GlobPattern.init)
            listen = listen.filter { name in patterns.contains { $0.matches(name) } }
        }
        let excluded = exclude.map(GlobPattern.init)
        listen = listen.filter { name in !excluded.contains { $0.matches(name) } }
        self.channels = listen.sorted()
    }

    public var messagesProcessed: Int { processed.load(ordering: .relaxed) }

    /// Runs until `stop()`: then each loop finishes the consumer in hand and returns.
    public func run() async {
        logger.info("worker ready", metadata: ["channels": "\(channels.joined(separator: ", "))", "concurrency": "\(concurrency)"])
        guard !channels.isEmpty else {
            logger.warning("no channels to listen on")
            return
        }
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<concurrency {
                group.addTask { await self.loop() }
            }
        }
        logger.info("worker stopped", metadata: ["processed": "\(messagesProcessed)"])
    }

    public func stop() { stopping.store(true, ordering: .relaxed) }

    private func loop() async {
        var failures = 0
        while !stopping.load(ordering: .relaxed) {
            do {
                // A bounded wait, so a stop is noticed within a second; this blocks, it does not poll.
                guard let received = try await layer.receive(channels: channels, timeout: .seconds(1)) else { continue }
                failures = 0
                await dispatch(received)
            } catch {
                failures += 1
                if failures == 1 || failures % 30 == 0 {
                    logger.error("receive failed", metadata: ["error": "\(error)"])
                }
                try? await Task.sleep(for: .milliseconds(min(1000, 50 * failures)))
            }
        }
    }

    /// Runs the consumer for one message (public for test harnesses).
    public func dispatch(_ received: ReceivedMessage) async {
        processed.add(1, ordering: .relaxed)
        let context: ConsumerContext
        guard let (consumer, kwargs, name) = router.match(channel: received.channel, message: received.message) else {
            await unrouted(received)
            return
        }
        context = ConsumerContext(message: received.message, channel: received.channel, kwargs: kwargs, layer: layer,
                                  logger: logger, environment: environment)
        do {
            try await ConsumerContext.$current.withValue(context) {
                try await consumer(context)
            }
        } catch ConsumerError.denyConnection {
            let answer: Message = received.channel == "websocket.connect" ? ["accept": false] : ["close": true]
            try? await context.reply(answer)
        } catch ConsumerError.close(let code) {
            try? await context.reply(["close": .int(Int64(code))])
        } catch ConsumerError.consumeLater {
            await requeue(received, consumer: name)
        } catch {
            logger.error("consumer failed", metadata: ["consumer": "\(name)", "channel": "\(received.channel)", "error": "\(error)"])
        }
        await context.flush()
    }

    /// Messages dropped after `maxRetries` re-queues.
    public var messagesDroppedAfterRetries: Int { retriesDropped.load(ordering: .relaxed) }

    /// Puts a message back on its channel for later, counting the retries.
    private func requeue(_ received: ReceivedMessage, consumer: String) async {
        let retries = (received.message[Self.retryKey]?.intValue ?? 0) + 1
        guard retries <= Self.maxRetries else {
            retriesDropped.add(1, ordering: .relaxed)
            logger.warning("dropped a message after \(Self.maxRetries) consume-later retries",
                           metadata: ["consumer": "\(consumer)", "channel": "\(received.channel)"])
            return
        }
        var message = received.message
        message.fields[Self.retryKey] = .int(retries)
        do {
            try await layer.send(message, to: received.channel)
        } catch {
            logger.error("could not re-queue a consume-later message",
                         metadata: ["consumer": "\(consumer)", "channel": "\(received.channel)", "error": "\(error)"])
        }
    }

    private func unrouted(_ received: ReceivedMessage) async {
        let reply = received.message["reply_channel"]?.stringValue
        switch received.channel {
        case "websocket.connect":
            if let reply { try? await layer.send(["accept": true], to: reply) }
        case "http.request":
            if let reply {
                try? await layer.send([
                    "status": 404, "headers": [[.utf8Bytes("content-type"), .utf8Bytes("text/plain; charset=utf-8")]],
                    "content": .utf8Bytes("Not found\n"), "more_content": false,
                ], to: reply)
            }
        case "websocket.disconnect", "http.disconnect":
            logger.debug("unrouted disconnect", metadata: ["channel": "\(received.channel)"])
        default:
            logger.info("dropped an unrouted message", metadata: ["channel": "\(received.channel)"])
        }
    }
}
