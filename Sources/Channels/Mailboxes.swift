import ASGI
import DequeModule
import Synchronization

/// Messages waiting for a socket whose earlier message is running in this process.
final class Mailboxes: Sendable {
    /// Messages that may wait behind one socket's running consumer without a slot.
    static let freeWaiting = 64

    enum Posted: Equatable {
        /// None of the socket's messages runs: the caller runs this one, then asks `next(for:)`.
        case run
        /// Queued behind the running one; `holdsSlot` when past `freeWaiting`.
        case queued(holdsSlot: Bool)
    }

    private let boxes = Mutex<[String: Deque<(message: ReceivedMessage, holdsSlot: Bool)>]>([:])

    /// Queues `received` behind the socket's running message, if one runs.
    func post(_ received: ReceivedMessage, to socket: String) -> Posted {
        boxes.withLock { boxes in
            guard boxes[socket] != nil else {
                boxes[socket] = []
                return .run
            }
            let holdsSlot = boxes[socket]!.count >= Self.freeWaiting
            boxes[socket]!.append((received, holdsSlot))
            return .queued(holdsSlot: holdsSlot)
        }
    }

    /// The socket's next waiting message, left where it is.
    func peek(for socket: String) -> ReceivedMessage? { boxes.withLock { $0[socket]?.first?.message } }

    /// The socket's next waiting message (and whether it holds a slot), or nil (and the socket
    /// is idle again).
    func next(for socket: String) -> (message: ReceivedMessage, holdsSlot: Bool)? {
        boxes.withLock { boxes in
            if let message = boxes[socket]?.popFirst() { return message }
            boxes[socket] = nil
            return nil
        }
    }
}

/// The socket whose messages the current task runs one after another (``Worker``'s run of a
/// mailbox), and a look at the message it runs next.
struct RunningSocket: Sendable {
    /// ``Worker/socketKey(_:)`` of its messages.
    let key: String
    let mailboxes: Mailboxes

    /// The task's run of a socket's messages, if it is one.
    @TaskLocal static var current: RunningSocket?

    /// Whether the message this task runs next belongs to the same ordered sequence as
    /// `message` (on `channel`) and has order `order`: then a turn that ends need not look for
    /// that order among the parked messages (it is not there; it runs next, and drains after
    /// itself).
    static func runsNext(order: Int64, after message: Message, on channel: String) -> Bool {
        guard let running = current,
            Worker.socketKey(ReceivedMessage(channel: channel, message: message)) == running.key,
            let queued = running.mailboxes.peek(for: running.key)
        else { return false }
        let epoch = message[OrderedHandoff.epochField]?.stringValue
        guard queued.message[OrderedHandoff.epochField]?.stringValue == epoch else { return false }
        let queuedOrder: Int64? =
            if let stamp = OrderStamp(queued.message) {
                stamp.order
            } else if let value = queued.message["order"]?.intValue {
                value
            } else {
                queued.channel == ASGIChannel.websocketConnect ? 0 : nil
            }
        return queuedOrder == order
    }
}
