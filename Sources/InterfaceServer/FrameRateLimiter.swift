import NIOCore

/// A token bucket for one WebSocket's frames to the layer: `rate` frames a second, bursts of
/// up to `burst`. One socket that bursts cannot fill `websocket.receive` for everyone: past its
/// share, its frames wait in the server (those already read) and reading from that client
/// pauses (TCP pushes back on it) until tokens are due; the other sockets' frames keep flowing.
/// Pure: the caller passes the time.
struct FrameRateLimiter: Sendable {
    let rate: Double
    let burst: Double
    private var tokens: Double
    private var updated: NIODeadline

    init(perSecond rate: Int, burst: Int, now: NIODeadline) {
        self.rate = Double(max(1, rate))
        self.burst = Double(max(1, burst))
        self.tokens = self.burst
        self.updated = now
    }

    /// Takes a token for a frame at `now`: nil when there was one (the frame may go), or how
    /// long until the next is due (nothing is taken; the frame waits, and reading pauses).
    mutating func take(now: NIODeadline) -> TimeAmount? {
        let elapsed = Double((now - updated).nanoseconds) / 1e9
        if elapsed > 0 {
            tokens = min(burst, tokens + elapsed * rate)
            updated = now
        }
        guard tokens < 1 else {
            tokens -= 1
            return nil
        }
        return .nanoseconds(Int64(((1 - tokens) / rate) * 1e9) + 1)
    }
}
