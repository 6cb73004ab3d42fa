import Synchronization
import UnixSignals

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// SIGTERM and SIGINT, trapped from the start of a long-running command: one that comes while
/// the command is still starting (listening, but its services not yet running) is not the
/// default action, an abrupt exit, but the graceful shutdown once they run.
enum ShutdownSignals {
    private static let trapped = Mutex<UnixSignalsSequence?>(nil)

    /// Traps them now (call first thing in `runserver`, `runworker`, `rundelay`). SIGHUP is
    /// ignored from here on too, until the command says what it does (`ProcessLimits.onHangup`):
    /// a log rotation's HUP while it starts (connecting to a Redis that is not up yet, for
    /// seconds) had killed it on the spot.
    static func trap() async {
        signal(SIGHUP, SIG_IGN)
        let sequence = await UnixSignalsSequence(trapping: .sigterm, .sigint)
        trapped.withLock { $0 = sequence }
    }

    /// What ``trap()`` caught and will catch, for ``runServices(_:metrics:grace:logger:)``.
    static func take() -> UnixSignalsSequence? {
        trapped.withLock { trapped in
            defer { trapped = nil }
            return trapped
        }
    }
}
