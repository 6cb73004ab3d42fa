import ASGI
import Dispatch
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// One line per HTTP request and WebSocket event: Daphne-style text to a file or standard
/// output, or (the default) a structured line through the server's logger, whose keys a log
/// shipper can index (`--log-format json` makes it one JSON object).
final class AccessLog: Sendable {
    private let writer: BackgroundWriter<String>?
    private let logger: Logger
    /// The log's file, when it goes to one.
    private let file: AccessLogFile?

    /// - Parameter path: a file, `-` for standard output, or nil for the logger. A file that
    ///   cannot be opened for appending is an error (said at start-up, not found out later).
    init(path: String?, logger: Logger) throws(AccessLogError) {
        var accessLogger = logger
        accessLogger[metadataKey: "component"] = "access"
        self.logger = accessLogger
        switch path {
        case nil:
            writer = nil
            file = nil
        case "-":
            writer = Self.writer(logger: logger) { lines in StandardStream.write(lines.joined(separator: "\n") + "\n", to: 1) }
            file = nil
        case let path?:
            let opened = try AccessLogFile(path: path)
            file = opened
            writer = Self.writer(logger: logger) { lines in opened.write(lines) }
        }
    }

    /// Opens the log's file again (after a log rotation moved it: SIGHUP); lines go to the new
    /// one from then on. False when the log goes to no file; throws when the file cannot be
    /// opened (lines keep going to the previous one).
    func reopen() throws(AccessLogError) -> Bool {
        guard let file else { return false }
        try file.reopen()
        return true
    }

    /// A writer whose drops are reported in the server's log, once a minute at most.
    private static func writer(logger: Logger, sink: @escaping @Sendable ([String]) -> Void) -> BackgroundWriter<String> {
        BackgroundWriter(
            label: "channels.access-log",
            report: { total in logger.warning("access log falls behind: lines dropped", metadata: ["dropped_total": "\(total)"]) },
            sink: sink)
    }

    private func write(_ line: String) -> Bool {
        guard let writer else { return false }
        writer.submit(line)
        return true
    }

    /// Waits until every line given so far is written (at shutdown), at most 2 s: the output
    /// may be a pipe nobody reads. The wait is not on the caller's thread.
    func flush() async { await writer?.flushed(within: .seconds(2)) }

    func http(client: String, method: String, path: String, status: Int, size: Int, seconds: Double) {
        // A session key or token in a query string is a credential: the log gets `***`.
        let path = Redaction.redact(path)
        if !write("\(client) - - \"\(method) \(path)\" \(status) \(size) \(Self.fixed(seconds, digits: 3))s") {
            logger.log(
                level: status >= 500 ? .warning : .info, "http",
                metadata: [
                    "client": "\(client)", "method": "\(method)", "path": "\(path)", "status": "\(status)",
                    "bytes": "\(size)", "ms": "\(Self.fixed(seconds * 1000, digits: 1))",
                ])
        }
    }

    /// `value` with `digits` decimals (what `%.Nf` prints, without Foundation's formatter).
    static func fixed(_ value: Double, digits: Int) -> String {
        var scale = 1.0
        for _ in 0..<digits { scale *= 10 }
        let scaled = Int((max(0, value) * scale).rounded())
        let whole = scaled / Int(scale), frac = String(scaled % Int(scale))
        return "\(whole)." + String(repeating: "0", count: max(0, digits - frac.count)) + frac
    }

    func websocket(client: String, event: String, path: String, detail: String = "") {
        let path = Redaction.redact(path)
        if !write("\(client) - - \"WS\(event) \(path)\"" + (detail.isEmpty ? "" : " \(detail)")) {
            var metadata: Logger.Metadata = ["client": "\(client)", "event": "\(event.lowercased())", "path": "\(path)"]
            if !detail.isEmpty { metadata["detail"] = "\(detail)" }
            logger.info("websocket", metadata: metadata)
        }
    }
}

/// An access log file that cannot be opened for appending.
public struct AccessLogError: Error, CustomStringConvertible {
    /// The file.
    public let path: String
    /// Why (the system's word for the error).
    public let reason: String

    /// What went wrong, with the path.
    public var description: String { "cannot open the access log \(path) for appending: \(reason)" }
}

/// The access log's file: appended to by the writer's queue, swapped for a new one on a reopen.
final class AccessLogFile: @unchecked Sendable {
    let path: String
    private let lock = NSLock()
    /// Guarded by `lock`.
    private var handle: UnsafeMutablePointer<FILE>

    init(path: String) throws(AccessLogError) {
        self.path = path
        handle = try Self.open(path)
    }

    private static func open(_ path: String) throws(AccessLogError) -> UnsafeMutablePointer<FILE> {
        // Opened without waiting (a FIFO nobody reads would hold the start-up forever: ENXIO
        // now), then written to as usual.
        let descriptor = Glibc.open(path, O_WRONLY | O_APPEND | O_CREAT | O_NONBLOCK | O_CLOEXEC, 0o666)
        guard descriptor >= 0 else {
            let reason = String(cString: strerror(errno))
            throw AccessLogError(path: path, reason: errno == ENXIO ? reason + " (a FIFO nobody reads)" : reason)
        }
        _ = fcntl(descriptor, F_SETFL, fcntl(descriptor, F_GETFL) & ~O_NONBLOCK)
        guard let handle = fdopen(descriptor, "a") else {
            let reason = String(cString: strerror(errno))
            close(descriptor)
            throw AccessLogError(path: path, reason: reason)
        }
        return handle
    }

    func write(_ lines: [String]) {
        lock.withLock {
            for line in lines { fputs(line + "\n", handle) }
            fflush(handle)
        }
    }

    func reopen() throws(AccessLogError) {
        let fresh = try Self.open(path)
        let old = lock.withLock {
            let old = handle
            handle = fresh
            return old
        }
        fclose(old)
    }

    deinit { fclose(handle) }
}
