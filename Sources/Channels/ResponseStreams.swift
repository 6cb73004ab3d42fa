import ASGI
import CoreMetrics
import Synchronization

/// The multi-message HTTP responses a worker is sending, so a client that leaves stops them.
///
/// Each worker reads one process channel of its own (its inbox, `worker.<letters>!`), in the
/// same receive as its other channels. A response that spans several messages (a stream, or a
/// body larger than one message) names a channel in that inbox as its
/// `disconnect_channel`; the interface server sends `http.disconnect` there when the client
/// goes, and the worker cancels the consumer's task: its `respondChunk` or `Task.sleep` throws
/// `CancellationError` and it ends.
public final class ResponseStreams: Sendable {
    /// The worker's inbox (a process channel).
    public let inbox: String
    private let streams = Mutex<[String: TaskHandle]>([:])
    private let stopped = Atomic<Int>(0)

    static let abandoned = Counter(label: "channels_http_streams_abandoned_total")

    /// A registry whose inbox is `<prefix>.<10 letters>!`.
    public init(prefix: String = "worker") {
        inbox = prefix + "." + ChannelNames.randomLetters(10) + "!"
    }

    /// A disconnect channel for the response `handle`'s task is sending; `finished` forgets it.
    func register(_ handle: TaskHandle) -> String {
        let channel = inbox + ChannelNames.randomLetters(12)
        streams.withLock { $0[channel] = handle }
        return channel
    }

    func finished(_ channel: String) {
        _ = streams.withLock { $0.removeValue(forKey: channel) }
    }

    /// The server said the client of the response at `channel` left: stop its consumer.
    func clientLeft(_ channel: String) {
        guard let handle = streams.withLock({ $0.removeValue(forKey: channel) }) else { return }
        stopped.add(1, ordering: .relaxed)
        Self.abandoned.increment()
        handle.cancel()
    }

    /// Responses stopped because their client left.
    public var abandonedCount: Int { stopped.load(ordering: .relaxed) }
    /// Responses that can be stopped now.
    public var activeCount: Int { streams.withLock { $0.count } }
}
