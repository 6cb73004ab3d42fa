import ASGI
import OrderedCollections

/// `asgi.delay`, Channels 1.x's delay server protocol: send `content` to `channel` after `delay`
/// milliseconds. Python's `DelayServer` reads and writes the same keys.
public struct DelayRequest: ASGIMessage, Hashable {
    /// The longest delay taken: a year and a day, in milliseconds.
    public static let longestDelay: Int64 = 366 * 86_400_000

    /// Where the message goes when it is due (a valid channel name).
    public var channel: String
    /// The message to send.
    public var content: Message
    /// How long to wait, in milliseconds.
    public var delay: Int64

    /// A request to send `content` to `channel` after `delay` milliseconds.
    public init(channel: String, content: Message, delay: Int64) {
        self.channel = channel
        self.content = content
        self.delay = delay
    }

    /// Reads `{channel, content, delay}`; throws `MessageError` naming the key that is missing,
    /// of the wrong type, or out of range (a bad channel name, a delay below zero, past a year
    /// or not finite). A delay written as a float (Python's `delay=1.5 * 1000`) is taken, rounded down.
    public init(_ message: Message) throws(MessageError) {
        channel = try message.string("channel")
        do {
            try ChannelNames.validateChannel(channel)
        } catch {
            throw MessageError(.invalidValue, key: "channel", detail: error.message)
        }
        content = Message(try message.map("content"))
        let millis = try message.double("delay")
        guard millis.isFinite, millis >= 0, millis <= Double(Self.longestDelay) else {
            throw MessageError(.invalidValue, key: "delay", detail: "\(millis) ms is not between 0 and a year")
        }
        delay = Int64(millis)
    }

    /// The message to send to `asgi.delay`.
    public var message: Message {
        ["channel": .string(channel), "content": .map(content.fields), "delay": .int(delay)]
    }
}

/// What the delay server keeps in its store for one request: where, what, and, once a delivery
/// was retried, when it was first due (its lateness counts from then).
struct DelayEntry: Hashable {
    var channel: String
    var content: Message
    var firstDue: Int64?

    init(channel: String, content: Message, firstDue: Int64? = nil) {
        self.channel = channel
        self.content = content
        self.firstDue = firstDue
    }

    /// Decodes a stored entry; nil for bytes that are not one.
    init?(stored: [UInt8]) {
        guard let value = try? MsgPackDecoder().decode(stored), let map = value.mapValue,
            let channel = map["channel"]?.stringValue, let content = map["content"]?.mapValue
        else { return nil }
        self.init(channel: channel, content: Message(content), firstDue: map["due"]?.intValue)
    }

    /// The stored form: `{channel, content}`, and `due` once retried.
    var stored: [UInt8] {
        var map: OrderedDictionary<String, ASGIValue> = ["channel": .string(channel), "content": .map(content.fields)]
        if let firstDue { map["due"] = .int(firstDue) }
        return MsgPackEncoder.encode(.map(map))
    }
}
