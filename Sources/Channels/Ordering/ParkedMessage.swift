import ASGI
import OrderedCollections

/// A message that came before its turn, parked on its socket's wait channel: the channel it
/// came on, the message, and its order. What `OrderingGate` writes when it parks and reads
/// when it drains.
struct ParkedMessage: Hashable {
    /// The channel the message came on (it runs through that channel's route on its turn).
    var channel: String
    /// The message as it came.
    var content: Message
    /// Its place in the socket's sequence.
    var order: Int64

    init(channel: String, content: Message, order: Int64) {
        self.channel = channel
        self.content = content
        self.order = order
    }

    /// Reads a parked message; nil for one that is not. A message parked before the order had
    /// a key of its own carries it inside the content.
    init?(_ message: Message) {
        guard let channel = message["channel"]?.stringValue, let content = message["content"]?.mapValue,
            let order = message["order"]?.intValue ?? content["order"]?.intValue
        else { return nil }
        self.init(channel: channel, content: Message(content), order: order)
    }

    /// `{channel, content, order}`, sent to the wait channel.
    var message: Message {
        ["channel": .string(channel), "content": .map(content.fields), "order": .int(order)]
    }
}
