import ASGI
import Logging

/// `enforce_ordering`: the messages of one WebSocket are handled strictly in their `order`
/// (connect = 0 first), whatever worker picks them up and whenever they arrive.
///
/// A message that comes early is parked on the socket's wait channel and re-queued on its
/// original channel when its turn comes. The next expected order lives in the channel
/// session. With `slight: true` only the connect must come first; later messages are handled
/// as they come. A wait channel that is full closes the socket with 1013 (try again later):
/// a wedged socket is worse than a closed one.
///
/// The wrapper includes `channelSession`.
public func enforceOrdering(slight: Bool = false, _ consumer: @escaping Consumer) -> Consumer {
    channelSession { context in
        try await OrderingGate(context: context, slight: slight).run(consumer)
    }
}

struct OrderingGate {
    static let nextOrderKey = "__channels_next_order"
    let context: ConsumerContext
    let slight: Bool

    func run(_ consumer: Consumer) async throws {
        let session = try context.channelSession
        let order: Int64
        if let value = context.message["order"]?.intValue {
            order = value
        } else if context.channel == "websocket.connect" {
            order = 0
        } else {
            throw SessionError("enforceOrdering needs an 'order' key; a message on '\(context.channel)' has none")
        }
        let next = session[Self.nextOrderKey]?.intValue ?? 0
        let due = slight ? (order == 0 || next >= 1) : order == next
        if !due {
            if order < next && !slight {
                context.logger.warning("dropped a message older than the socket's next order",
                                       metadata: ["channel": "\(context.channel)", "order": "\(order)", "next": "\(next)"])
                return
            }
            try await park(order: order, waitingFor: slight ? 1 : order)
            return
        }
        do {
            try await consumer(context)
        } catch {
            await context.flush()
            try await advance(session, past: order)
            throw error
        }
        // The replies of this message go out before the next message may run, so the client
        // sees them in order too.
        await context.flush()
        try await advance(session, past: order)
    }

    /// Records that `order` was handled, saves, and re-queues whatever was parked.
    private func advance(_ session: Session, past order: Int64) async throws {
        let next = session[Self.nextOrderKey]?.intValue ?? 0
        if order + 1 > next { session[Self.nextOrderKey] = .int(order + 1) }
        // Saved before the wait channel is drained, so re-queued messages see the new order.
        try await session.save()
        await requeueParked()
    }

    private var waitChannel: String { "__wait__." + Session.channelSessionKey(replyChannel: context.replyChannel?.name ?? "") }

    private func park(order: Int64, waitingFor needed: Int64) async throws {
        let parked: Message = ["channel": .string(context.channel), "content": .map(context.message.fields)]
        do {
            try await context.layer.send(parked, to: waitChannel)
        } catch let error as ChannelLayerError where error.code == .channelFull {
            context.logger.warning("wait channel full; closing the socket with 1013",
                                   metadata: ["wait_channel": "\(waitChannel)", "order": "\(order)"])
            try await context.reply(["close": 1013], immediately: true)
            return
        }
        // The message that was due may have finished between our read of the session and our
        // park; it then drained the wait channel before our message was on it. Re-read, and
        // drain ourselves if the turn has come: each parked message is received once, so two
        // drains cannot duplicate anything.
        let raw = try await context.environment.sessionStore.load(try context.channelSession.key ?? "")
        let stored = raw.flatMap { try? Session.decode($0) }
        let next = stored?[Self.nextOrderKey]?.intValue ?? 0
        if next >= needed { await requeueParked() }
    }

    private func requeueParked() async {
        while true {
            let received: ReceivedMessage?
            do {
                received = try await context.layer.receive(channels: [waitChannel], timeout: .zero)
            } catch {
                context.logger.error("could not read the wait channel", metadata: ["error": "\(error)"])
                return
            }
            guard let received else { return }
            guard let channel = received.message["channel"]?.stringValue,
                  let content = received.message["content"]?.mapValue else {
                context.logger.warning("dropped a malformed parked message", metadata: ["wait_channel": "\(waitChannel)"])
                continue
            }
            do {
                try await context.layer.send(Message(content), to: channel)
            } catch {
                context.logger.error("could not re-queue a parked message",
                                     metadata: ["channel": "\(channel)", "error": "\(error)"])
            }
        }
    }
}
