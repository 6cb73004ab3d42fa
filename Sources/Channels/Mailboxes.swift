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
