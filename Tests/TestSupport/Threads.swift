import Foundation

/// Runs CPU-heavy test work on a thread of its own, so it cannot starve the two threads of
/// the cooperative pool that every other test shares on a 2-core machine.
public func onOwnThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        Thread.detachNewThread { continuation.resume(with: Result { try body() }) }
    }
}
