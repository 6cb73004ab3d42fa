import NIOCore

/// A token bucket for one WebSocket's frames to the layer: `rate` frames a second, bursts of
/// up to `burst`. One socket that bursts cannot fill `websocket.receive` for everyone: past its
/// share, reading from that client pauses (TCP pushes back on it) until a token is due, and the
/// other sockets' frames keep flowing. Pure: the caller passes the time.
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

    /// Takes a token for a frame that arrived at `now` (the frame always goes: it was read).
    /// Returns nil while the socket is within its rate, or how long reading should pause
    /// until the next token is due.
    mutating func take(now: NIODeadline) -> TimeAmount? {
        let elapsed = Double((now - updated).nanoseconds) / 1e9
        if elapsed > 0 {
            tokens = min(burst, tokens + elapsed * rate)
            updated = now
        }
        tokens -= 1
        guard tokens < 0 else { return nil }
        return .nanoseconds(Int64((-tokens / rate) * 1e9) + 1)
    }
}
