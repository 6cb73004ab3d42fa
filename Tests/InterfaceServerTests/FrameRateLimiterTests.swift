import NIOCore
import Testing

@testable import InterfaceServer

@Suite("WebSocket frame rate limiter")
struct FrameRateLimiterTests {
    @Test func aBurstPassesThenReadingPausesUntilATokenIsDue() {
        let start = NIODeadline.uptimeNanoseconds(1_000_000_000)
        var limiter = FrameRateLimiter(perSecond: 100, burst: 10, now: start)
        for _ in 0..<10 { #expect(limiter.take(now: start) == nil) }
        // The 11th frame in the same instant waits one token's time (10 ms); nothing is taken.
        let wait = limiter.take(now: start)
        #expect(wait != nil)
        #expect(wait!.nanoseconds > 9_000_000 && wait!.nanoseconds <= 10_000_001)
        #expect(limiter.take(now: start) == wait, "asking again takes nothing either")
        // 50 ms later five tokens are back.
        let later = start + .milliseconds(50)
        for _ in 0..<5 { #expect(limiter.take(now: later) == nil) }
        #expect(limiter.take(now: later) != nil)
    }

    @Test func aSteadySenderWithinItsRateNeverPauses() {
        var now = NIODeadline.uptimeNanoseconds(0)
        var limiter = FrameRateLimiter(perSecond: 1000, burst: 1000, now: now)
        for _ in 0..<5000 {
            now = now + .microseconds(1100)
            #expect(limiter.take(now: now) == nil)
        }
    }

    @Test func tokensDoNotPileUpPastTheBurst() {
        let start = NIODeadline.uptimeNanoseconds(0)
        var limiter = FrameRateLimiter(perSecond: 10, burst: 5, now: start)
        let much = start + .seconds(60)
        for _ in 0..<5 { #expect(limiter.take(now: much) == nil) }
        #expect(limiter.take(now: much) != nil)
    }
}
