import ASGI
import Foundation
import Logging
import Synchronization

/// Names and fields of the ordered hand-off.
enum OrderedHandoff {
    static let keyField = "__order_key"
    static let orderField = "__order"
    static let endField = "__order_end"
    static let sentField = "__sent"
    /// In the sender's counter: a random token of the save that wrote it, so a save whose
    /// reply was lost (and whose retry the store answered with a conflict against that very
    /// write) knows its number was taken by itself, not by another sender.
    static let writerField = "__writer"
    /// The sequence's epoch: a random name the sender's counter is born with. A counter that
    /// was lost (evicted under maxmemory, expired) starts again at 0 under a new epoch, and the
    /// receiver follows the new sequence instead of dropping its messages as old.
    static let epochField = "__order_epoch"
    /// In the receiver's state: the epoch it follows, and the last few it left behind.
    static let currentEpochKey = "__epoch"
    static let oldEpochsKey = "__old_epochs"

    /// A session per (channel, key) for the sender's counter ("sent") and the receiver's next
    /// order ("next"): "ord" and an HMAC, a form no HTTP session key has.
    static func sessionKey(_ role: String, channel: String, key: String, secret: DeploymentSecret) -> String {
        "ord" + secret.hex("ordered-handoff", role + ":" + channel + ":" + key, length: 61)
    }
}

/// The stamp an ordered send adds to its message: which sequence (`key`, and the `epoch` its
/// sender's counter was born with), the message's place in it, and whether it ends it. Typed
/// here so the sender and the receiver read and write the same fields.
struct OrderStamp: Equatable {
    var key: String
    var order: Int64
    /// Absent on messages stamped before epochs existed.
    var epoch: String?
    var end = false

    /// The stamp `message` carries; nil for a message sent without one.
    init?(_ message: Message) {
        guard let key = message[OrderedHandoff.keyField]?.stringValue,
            let order = message[OrderedHandoff.orderField]?.intValue
        else { return nil }
        self.init(
            key: key, order: order, epoch: message[OrderedHandoff.epochField]?.stringValue,
            end: message[OrderedHandoff.endField]?.boolValue == true)
    }

    init(key: String, order: Int64, epoch: String?, end: Bool = false) {
        self.key = key
        self.order = order
        self.epoch = epoch
        self.end = end
    }

    /// `message` with this stamp.
    func stamped(_ message: Message) -> Message {
        var stamped = message
        stamped[OrderedHandoff.keyField] = .string(key)
        stamped[OrderedHandoff.orderField] = .int(order)
        if let epoch { stamped[OrderedHandoff.epochField] = .string(epoch) }
        if end { stamped[OrderedHandoff.endField] = .bool(true) }
        return stamped
    }
}

extension ConsumerContext {
    /// Sends `message` to `channel` numbered in the sequence of `key`, so that a consumer
    /// wrapped in ``inSendOrder(_:)`` handles the messages of one key in the order they were
    /// sent here, however many workers run it. Call it from one consumer at a time per key
    /// (for example, under ``enforceOrdering(slight:_:)`` with the socket's reply channel as the key).
    /// Called under a channel session, the sequence ends (its state on both sides is deleted)
    /// when the socket disconnects.
    public func send(_ message: Message, to channel: String, orderedBy key: String, immediately: Bool = false) async throws {
        if let socket = loadedChannelSession {
            let pair: ASGIValue = .array([.string(channel), .string(key)])
            var handoffs = socket[ChannelSessionKey.handoffs]?.arrayValue ?? []
            if !handoffs.contains(pair) {
                handoffs.append(pair)
                socket[ChannelSessionKey.handoffs] = .array(handoffs)
            }
            // The socket's reply channel (the message handed on is another).
            if let reply = self.message.replyChannel {
                let counter = OrderedHandoff.sessionKey("sent", channel: channel, key: key, secret: environment.sessionConfiguration.secret)
                HandoffCounters.remember(Session.storageKey(counter), for: reply)
            }
        }
        try await sendNumbered(message, to: channel, orderedBy: key, immediately: immediately, end: false)
    }

    /// Sends the end of `key`'s sequence on `channel` (the receiver deletes its state when the
    /// end's turn comes) and deletes the sender's counter.
    func endOrderedSequence(to channel: String, orderedBy key: String) async throws {
        try await sendNumbered([:], to: channel, orderedBy: key, immediately: false, end: true)
    }

    private func sendNumbered(_ message: Message, to channel: String, orderedBy key: String, immediately: Bool, end: Bool)
        async throws
    {
        // A save that loses its race must not write the number it read again (two senders
        // would then share it, and the receiver drop the second as a duplicate): one try per
        // read, and a lost race reads the counter anew.
        var settings = environment.sessionConfiguration
        settings.saveAttempts = 1
        let counterKey = OrderedHandoff.sessionKey("sent", channel: channel, key: key, secret: settings.secret)
        var numbered: (sequence: Int64, epoch: String)?
        // The counter as read after a lost race (to number anew from).
        var reread: Session?
        for _ in 0..<Session.appendSaveAttempts {
            let counter: Session
            if let reread {
                counter = reread
            } else {
                counter = try await Session.load(
                    key: counterKey, store: environment.sessionStore, settings: settings, ttl: settings.channelSessionAge,
                    // The end deletes the counter without a compare: its number is read from the store.
                    log: .consumer(self), handedOn: !end)
            }
            reread = nil
            let sequence = counter[OrderedHandoff.sentField]?.intValue ?? 0
            let epoch = counter[OrderedHandoff.epochField]?.stringValue ?? ChannelNames.randomLetters(12)
            if end {
                // Nothing stored means the sequence never started (or already ended).
                guard counter.isStored else { return }
                try await counter.delete()
                numbered = (sequence, epoch)
                break
            }
            let writer = ChannelNames.randomLetters(12)
            counter[OrderedHandoff.sentField] = .int(sequence + 1)
            counter[OrderedHandoff.epochField] = .string(epoch)
            counter[OrderedHandoff.writerField] = .string(writer)
            do {
                try await counter.save()
            } catch let error as SessionError where error.code == .saveConflict {
                // A save that ran and whose reply died with Redis (SIGKILLed, restarted) is tried
                // again by the store's client, and the store then answers "someone else wrote
                // first": it was this save. Its number is taken: use it (numbering anew skipped
                // it, and the receiver waited out the gap timeout for a message that never came).
                let stored = try await Session.load(
                    key: counterKey, store: environment.sessionStore, settings: settings, ttl: settings.channelSessionAge,
                    log: .consumer(self))
                guard stored[OrderedHandoff.writerField]?.stringValue == writer,
                    stored[OrderedHandoff.sentField]?.intValue == sequence + 1
                else {
                    reread = stored
                    continue
                }
                SessionHandOn.current?.record(stored)
                numbered = (sequence, epoch)
                break
            }
            // The socket's next ordered send, run next in this worker, starts from it.
            SessionHandOn.current?.record(counter)
            numbered = (sequence, epoch)
            break
        }
        guard let (sequence, epoch) = numbered else {
            throw SessionError(.saveConflict, "the ordered hand-off counter of '\(channel)' lost every race to other senders")
        }
        let stamp = OrderStamp(key: key, order: sequence, epoch: epoch, end: end)
        try await send(stamp.stamped(message), to: channel, immediately: immediately)
    }
}

/// The ordered hand-off counters each socket's consumers used in this process (their storage
/// keys, by reply channel): the socket's next message reads them with its channel session, in
/// one round trip (a socket's messages alternate between workers, so the counter a turn saved
/// is rarely handed on to the next in the same worker). A hint only: a counter read ahead is
/// taken like any read (a writer since is caught by the save's compare). Bounded: forgotten
/// whole past 8,192 sockets.
enum HandoffCounters {
    private static let known = Mutex<[String: [String]]>([:])

    static func remember(_ storageKey: String, for reply: String) {
        known.withLock { known in
            if known[reply]?.contains(storageKey) == true { return }
            if known.count >= 8192 { known.removeAll() }
            known[reply, default: []].append(storageKey)
        }
    }

    static func known(for reply: String) -> [String] { known.withLock { $0[reply] ?? [] } }

    /// Forgets a socket's counters (its sequences ended).
    static func forget(_ reply: String) { _ = known.withLock { $0.removeValue(forKey: reply) } }
}

extension Channel {
    /// ``ConsumerContext/send(_:to:orderedBy:immediately:)`` from inside a consumer.
    public func send(_ message: Message, orderedBy key: String, immediately: Bool = false) async throws {
        guard let context = ConsumerContext.current else {
            throw ConsumerContextError(.noConsumer, "an ordered send needs a consumer context")
        }
        try await context.send(message, to: name, orderedBy: key, immediately: immediately)
    }
}
