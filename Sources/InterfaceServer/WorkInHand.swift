import ASGI
import NIOCore
import Synchronization

/// What a server still owes: connections waiting for a reply (HTTP requests in flight,
/// WebSockets not yet accepted) and messages its connections have not yet handed to the
/// layer (a `websocket.disconnect` written at shutdown among them). A shutdown waits for it to
/// reach zero, woken by the last `finish`, not by polling.
final class WorkInHand: Sendable {
    private let count = Atomic<Int>(0)
    private let waiters = Mutex<[UInt64: @Sendable (Bool) -> Void]>([:])
    private let nextWaiter = Atomic<UInt64>(0)

    /// Work in hand now.
    var current: Int { count.load(ordering: .relaxed) }

    func begin(_ n: Int = 1) {
        count.add(n, ordering: .relaxed)
    }

    func finish(_ n: Int = 1) {
        guard n > 0 else { return }
        if count.subtract(n, ordering: .acquiringAndReleasing).newValue == 0 { wakeAll() }
    }

    private func wakeAll() {
        let woken = waiters.withLock { waiting -> [@Sendable (Bool) -> Void] in
            // Checked under the lock: a waiter that registers now sees the count itself.
            guard count.load(ordering: .acquiring) == 0 else { return [] }
            defer { waiting.removeAll() }
            return Array(waiting.values)
        }
        for wake in woken { wake(true) }
    }

    /// Returns true once nothing is in hand, or false when `timeout` (a timer on `loop`) ends first.
    func drained(within timeout: Duration, on loop: any EventLoop) async -> Bool {
        let id = nextWaiter.add(1, ordering: .relaxed).newValue
        return await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
            let once = ResumeOnce(continuation)
            let resume: @Sendable (Bool) -> Void = { _ = once.resume($0) }
            let idle = waiters.withLock { waiting -> Bool in
                if count.load(ordering: .acquiring) == 0 { return true }
                waiting[id] = resume
                return false
            }
            if idle {
                resume(true)
                return
            }
            loop.scheduleTask(in: TimeAmount(timeout)) { [weak self] in
                _ = self?.waiters.withLock { $0.removeValue(forKey: id) }
                resume(false)
            }
        }
    }
}
