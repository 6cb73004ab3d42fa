import ASGI
import Foundation
import Testing

@testable import Channels

/// The framework's own envelopes, read and written by one type each: the delay request, the
/// delay server's stored entry, the parked ordering message and the demultiplexer's frame.
@Suite("typed envelopes")
struct EnvelopeTests {
    /// A map value from a message literal (the test target does not import OrderedCollections).
    static func map(_ fields: Message) -> ASGIValue { .map(fields.fields) }

    @Test func aDelayRequestRoundTripsAndKeepsPythonsKeys() throws {
        let request = DelayRequest(channel: "later", content: ["text": "hi"], delay: 1500)
        #expect(request.message.fieldNames == ["channel", "content", "delay"])
        #expect(try DelayRequest(request.message) == request)
        // Python's DelayServer clients may write the delay as a float.
        let fromPython = try DelayRequest(["channel": "later", "content": Self.map(["a": 1]), "delay": .double(250.7)])
        #expect(fromPython.delay == 250 && fromPython.content == ["a": 1])
    }

    static let malformedDelays: [(Message, String)] = [
        (["content": map([:]), "delay": 1], "channel"),
        (["channel": "bad name", "content": map([:]), "delay": 1], "channel"),
        (["channel": "later", "content": "text", "delay": 1], "content"),
        (["channel": "later", "content": map([:]), "delay": -1], "delay"),
        (["channel": "later", "content": map([:]), "delay": .double(.infinity)], "delay"),
        (["channel": "later", "content": map([:]), "delay": .int(DelayRequest.longestDelay + 1)], "delay"),
    ]

    @Test("a delay request that is not one is refused, naming the key", arguments: malformedDelays)
    func malformedDelayRequests(message: Message, key: String) {
        #expect {
            try DelayRequest(message)
        } throws: { error in
            (error as? MessageError)?.key == key
        }
    }

    @Test func aStoredDelayEntryKeepsWhenItWasFirstDue() throws {
        let entry = DelayEntry(channel: "later", content: ["n": 1])
        #expect(DelayEntry(stored: entry.stored) == entry)
        var retried = entry
        retried.firstDue = 1_700_000_000_000
        #expect(DelayEntry(stored: retried.stored)?.firstDue == 1_700_000_000_000)
        #expect(DelayEntry(stored: [0xc1]) == nil, "bytes that are not an entry")
    }

    @Test func aParkedMessageRoundTripsAndReadsTheOlderForm() throws {
        let parked = ParkedMessage(channel: "websocket.receive", content: ["order": 3, "text": "x"], order: 3)
        #expect(ParkedMessage(parked.message) == parked)
        // Parked before the order had a key of its own: it is read from the content.
        let older: Message = ["channel": "websocket.receive", "content": Self.map(["order": 5, "text": "y"])]
        #expect(ParkedMessage(older)?.order == 5)
        #expect(ParkedMessage(["channel": "websocket.receive", "content": Self.map(["text": "no order"])]) == nil)
        #expect(ParkedMessage(["content": Self.map(["order": 1])]) == nil)
    }

    @Test func aStreamFrameIsSpelledOneWay() throws {
        let frame = StreamFrame(stream: "chat \"room\"", payload: #"{"text":"hi"}"#)
        #expect(frame.text == #"{"stream":"chat \"room\"","payload":{"text":"hi"}}"#)
        #expect(StreamFrame(json: Data(frame.text.utf8)) == frame)
        #expect(StreamFrame(json: Data(#"{"stream":"s","payload":"yo"}"#.utf8))?.payload == #""yo""#)
        #expect(StreamFrame(json: Data(#"{"payload":1}"#.utf8)) == nil)
        #expect(StreamFrame(json: Data(#"{"stream":1,"payload":1}"#.utf8)) == nil)
        #expect(StreamFrame(json: Data("not json".utf8)) == nil)
    }
}
