import ArgumentParser
import Dispatch
import Foundation
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// The process's file-descriptor limit and its SIGHUP, for `runserver`.
enum ProcessLimits {
    /// Descriptors kept for everything that is not a client: the layer's connections, logs,
    /// the metrics port.
    static let reserved = 256

    /// Raises the soft open-files limit as far as `connections` need (up to the hard limit) and
    /// returns the connection cap the process can honour: `connections`, or less (with a
    /// warning) when the hard limit does not allow it. A cap over the limit would let idle
    /// connections exhaust descriptors and refuse every new client in `accept`.
    static func raiseOpenFiles(toServe connections: Int, logger: Logger) throws -> Int {
        guard connections > 0 else { throw ValidationError("--max-connections must be at least 1") }
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return connections }
        let wanted = rlim_t(connections + reserved)
        if limit.rlim_cur < wanted {
            var raised = limit
            raised.rlim_cur = min(wanted, limit.rlim_max)
            if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &raised) == 0 { limit = raised }
        }
        let honoured = max(1, Int(limit.rlim_cur) - reserved)
        if honoured < connections {
            logger.warning(
                "open-files limit too low for --max-connections; serving fewer",
                metadata: ["max_connections": "\(honoured)", "asked": "\(connections)", "nofile": "\(limit.rlim_cur)"])
            return honoured
        }
        return connections
    }

    private static let hangup = Mutex<(any DispatchSourceSignal)?>(nil)

    /// Runs `action` on each SIGHUP (the process is not stopped by it).
    static func onHangup(_ action: @escaping @Sendable () -> Void) {
        signal(SIGHUP, SIG_IGN)
        hangup.withLock { current in
            let source = DispatchSource.makeSignalSource(signal: SIGHUP, queue: .global())
            source.setEventHandler(handler: action)
            source.resume()
            current = source
        }
    }
}
