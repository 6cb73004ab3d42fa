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
    private let writer: BackgroundWriter?
    private let logger: Logger

    /// - Parameter path: a file, `-` for standard output, or nil for the logger.
    init(path: String?, logger: Logger) {
        var accessLogger = logger
        accessLogger[metadataKey: "component"] = "access"
        self.logger = accessLogger
        switch path {
        case nil:
            writer = nil
        case "-":
            writer = BackgroundWriter(logger: logger) { line in
                let bytes = Array((line + "\n").utf8)
                bytes.withUnsafeBytes { raw in
                    var offset = 0
                    while offset < raw.count {
                        #if canImport(Darwin)
                            let written = Darwin.write(1, raw.baseAddress! + offset, raw.count - offset)
                        #else
                            let written = Glibc.write(1, raw.baseAddress! + offset, raw.count - offset)
                        #endif
                        if written <= 0 { break }
                        offset += written
                    }
                }
            }
        case let path?:
            // Used only on the writer's serial queue.
            nonisolated(unsafe) let file = fopen(path, "a")
            if file == nil { logger.error("cannot open the access log", metadata: ["path": "\(path)"]) }
            writer = BackgroundWriter(logger: logger) { line in
                guard let file else { return }
                fputs(line + "\n", file)
                fflush(file)
            }
        }
    }

    private func write(_ line: String) -> Bool {
        guard let writer else { return false }
        writer.submit(line)
        return true
    }

    /// Waits until every line given so far is written (at shutdown).
    func flush() { writer?.flush() }

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

/// Writes lines on a queue of its own, so the event loop that produced them never waits on a
/// disk or a pipe. At most `limit` lines wait; past that (the disk stalls) lines are dropped,
/// counted and reported once a minute at most, rather than held without bound.
final class BackgroundWriter: Sendable {
    private let queue = DispatchQueue(label: "channels.access-log")
    private let sink: @Sendable (String) -> Void
    private let logger: Logger
    private let limit: Int
    private let dropped = Atomic<Int>(0)
    private let lastReport = Mutex<ContinuousClock.Instant?>(nil)

    /// Lines waiting, lines being written, and whether the writer is at work (woken once for
    /// as many lines as come meanwhile: a wake-up per line would cost more than the line).
    private struct Backlog {
        var lines: [String] = []
        var writing = 0
        var draining = false
    }
    private let backlog = Mutex(Backlog())

    init(logger: Logger, limit: Int = 10_000, sink: @escaping @Sendable (String) -> Void) {
        self.logger = logger
        self.limit = limit
        self.sink = sink
    }

    /// Lines dropped because the writer fell `limit` lines behind.
    var droppedLines: Int { dropped.load(ordering: .relaxed) }

    func submit(_ line: String) {
        enum Outcome { case queued, wake, full }
        let outcome = backlog.withLock { backlog -> Outcome in
            guard backlog.lines.count + backlog.writing < limit else { return .full }
            backlog.lines.append(line)
            if backlog.draining { return .queued }
            backlog.draining = true
            return .wake
        }
        switch outcome {
        case .queued:
            return
        case .wake:
            queue.async { self.drain() }
        case .full:
            let total = dropped.add(1, ordering: .relaxed).newValue
            let now = ContinuousClock.now
            let report = lastReport.withLock { last -> Bool in
                guard last.map({ now - $0 >= .seconds(60) }) ?? true else { return false }
                last = now
                return true
            }
            if report { logger.warning("access log falls behind: lines dropped", metadata: ["dropped_total": "\(total)"]) }
        }
    }

    /// On the queue: writes what has come, in order, until nothing is left.
    private func drain() {
        while true {
            let lines = backlog.withLock { backlog -> [String] in
                backlog.writing = 0
                guard !backlog.lines.isEmpty else {
                    backlog.draining = false
                    return []
                }
                let taken = backlog.lines
                backlog.lines.removeAll(keepingCapacity: true)
                backlog.writing = taken.count
                return taken
            }
            if lines.isEmpty { return }
            for line in lines { sink(line) }
        }
    }

    func flush() { queue.sync {} }
}
