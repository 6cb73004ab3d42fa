/// Runs `body`, retrying it with growing pauses (10 ms doubling to 500 ms) while it throws a
/// ``ChannelLayerError`` that `retryable` accepts, for at most `limit` in all; then the last
/// error is thrown. For waits on a full channel or a Redis that is restarting: a timer between
/// attempts, never a busy loop.
public func retrying<T>(
    for limit: Duration, when retryable: (ChannelLayerError) -> Bool = ChannelLayerError.isTransient,
    _ body: () async throws -> T
) async throws -> T {
    let deadline = ContinuousClock.now + limit
    var pause = Duration.milliseconds(10)
    while true {
        do {
            return try await body()
        } catch let error as ChannelLayerError where retryable(error) && ContinuousClock.now + pause < deadline {
            try? await Task.sleep(for: pause)
            if Task.isCancelled { throw error }
            pause = min(pause * 2, .milliseconds(500))
        }
    }
}

extension ChannelLayerError {
    /// A failure that may pass by itself: a full channel, or a store that cannot be reached.
    public static func isTransient(_ error: ChannelLayerError) -> Bool {
        error.code == .channelFull || error.code == .connectionLost
    }
}
