import ASGI
import Foundation

/// The demultiplexer's envelope, Channels 1.x's `{"stream": name, "payload": …}`: how one
/// socket's frames name the stream they belong to. Read and written here only (the
/// demultiplexer, a stream consumer's sends, data binding), so every frame is spelled the same
/// way: `stream` first, then `payload`.
public struct StreamFrame: Sendable, Hashable {
    /// The stream's name.
    public var stream: String
    /// The payload as JSON text (any JSON value).
    public var payload: String

    /// A frame for `stream` carrying `payload` (JSON text, written as it is).
    public init(stream: String, payload: String) {
        self.stream = stream
        self.payload = payload
    }

    /// Reads a frame: nil unless `data` is a JSON object with a string `stream` and a `payload`.
    public init?(json data: Data) {
        guard let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
            let stream = object["stream"] as? String, let payload = object["payload"],
            let payloadData = try? JSONSerialization.data(withJSONObject: payload, options: [.fragmentsAllowed, .sortedKeys])
        else { return nil }
        self.init(stream: stream, payload: String(decoding: payloadData, as: UTF8.self))
    }

    /// The frame as JSON text.
    public var text: String { "{\"stream\":" + JSONText.quote(stream) + ",\"payload\":" + payload + "}" }
}
