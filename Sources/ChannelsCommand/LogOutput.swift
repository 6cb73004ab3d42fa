import CoreMetrics
import Foundation
import InterfaceServer
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// One line of the process's log, as it was logged; made into text on the writer's queue.
struct LogRecord: Sendable {
    enum Format: Sendable { case text, json }
    let format: Format
    let time: Date
    let level: Logger.Level
    let label: String
    let metadata: Logger.Metadata
    let source: String
    let message: Logger.Message
}

/// Where the commands' log lines go: standard error, written on a queue of its own. An event
/// loop that logs (an access line per WebSocket event, by default) neither formats the line nor
/// waits for the write, and a standard error that stops taking lines (a pipe nobody reads, a
/// stalled log collector) costs dropped lines, counted in a line of their own, not a stalled
/// server (`channels_log_lines_dropped_total` counts them too, as they are dropped, and lines a
/// closed standard error refused). Lines that come together leave in one write; `error` and
/// `critical` lines at once, and `critical` ones are waited for (not again once a wait ran out).
/// `CHANNELS_LOG_BACKLOG` sets how many lines may wait (default 50,000).
enum LogOutput {
    static let standardError = BackgroundWriter<LogRecord>(
        label: "channels.log",
        limit: ProcessInfo.processInfo.environment["CHANNELS_LOG_BACKLOG"].flatMap(Int.init).map { max(1, $0) } ?? 50_000,
        gapLine: { dropped in
            LogRecord(
                format: LogSetup.format, time: Date(), level: .warning, label: "channels.log",
                metadata: ["dropped": "\(dropped)"], source: "ChannelsCommand",
                message: "log lines dropped: standard error did not take them in time")
        },
        // Counted as it happens, not when the gap line goes out: the count moves while standard
        // error is stuck, which is when it is looked at.
        onDrop: { countDropped(1) },
        sink: { records in
            var text = ""
            for record in records {
                switch record.format {
                case .text: TextLogLine.format(record, into: &text)
                case .json: JSONLogLine.format(record, into: &text)
                }
            }
            if StandardStream.write(text, to: 2) {
                stalled.store(false, ordering: .relaxed)
            } else {
                countDropped(records.count)  // standard error is closed: lost, and counted
            }
        })

    /// A flush ran out of time (standard error stuck) and nothing was written since: a
    /// `critical` line does not wait again.
    private static let stalled = Atomic<Bool>(false)

    /// `channels_log_lines_dropped_total`: made again by ``registerMetrics()`` once the metrics
    /// backend is set (a counter made before counts nowhere), so it reads 0 from the start.
    private static let droppedCounter = Mutex<Counter?>(nil)

    static func registerMetrics() {
        droppedCounter.withLock { $0 = Counter(label: "channels_log_lines_dropped_total") }
    }

    private static func countDropped(_ lines: Int) {
        let counter = droppedCounter.withLock { counter -> Counter in
            if let counter { return counter }
            let made = Counter(label: "channels_log_lines_dropped_total")
            counter = made
            return made
        }
        counter.increment(by: lines)
    }

    /// Waits (up to 2 s: the output may be a pipe nobody reads) for the lines logged so far.
    static func flush() {
        if !standardError.flush(timeout: .seconds(2)) { stalled.store(true, ordering: .relaxed) }
    }

    /// ``flush()`` for a `critical` line, unless the last flush found standard error stuck.
    static func flushForCritical() {
        guard !stalled.load(ordering: .relaxed) else { return }
        flush()
    }
}

/// The commands' log handler: each event becomes a ``LogRecord`` for ``LogOutput``, made into a
/// line there, in the process's format (``LogSetup``).
struct LineLogHandler: LogHandler {
    let label: String
    let format: LogRecord.Format
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]

    init(label: String, format: LogRecord.Format) {
        self.label = label
        self.format = format
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        // The handler's metadata, the event's over it, and the error's (as each format names it).
        var metadata = self.metadata
        if let explicit = event.metadata, !explicit.isEmpty { metadata.merge(explicit) { $1 } }
        if let error = event.error {
            switch format {
            case .text:
                metadata["error.message"] = "\(error)"
                metadata["error.type"] = "\(String(reflecting: type(of: error)))"
            case .json:
                metadata["error"] = "\(error)"
            }
        }
        LogOutput.standardError.submit(
            LogRecord(
                format: format, time: Date(), level: event.level, label: label, metadata: metadata, source: event.source,
                message: event.message),
            urgent: event.level >= .error)
        if event.level == .critical { LogOutput.flushForCritical() }
    }
}

/// swift-log's `StreamLogHandler` line (`2026-12-06T12:29:46+0000 info channels.server: k=v
/// [Source] message`): the default `--log-format text`.
enum TextLogLine {
    /// Only on the writer's queue: the local time of the second last formatted.
    nonisolated(unsafe) private static var lastSecond: (second: Int, text: String)?

    static func format(_ record: LogRecord, into text: inout String) {
        text += timestamp(Int(record.time.timeIntervalSince1970.rounded(.down)))
        text += " \(record.level)"
        if !record.label.isEmpty { text += " " }
        text += record.label + ":"
        if !record.metadata.isEmpty {
            for (key, value) in record.metadata.sorted(by: { $0.key < $1.key }) { text += " \(key)=\(value)" }
        }
        text += " [\(record.source)] \(record.message)\n"
    }

    /// `%Y-%m-%dT%H:%M:%S%z` in local time, as `StreamLogHandler` writes it; made once a second
    /// (`localtime` looks at the zone file every time it is called).
    private static func timestamp(_ second: Int) -> String {
        if let lastSecond, lastSecond.second == second { return lastSecond.text }
        var time = time_t(second)
        var local = tm()
        var buffer = [Int8](repeating: 0, count: 64)
        guard localtime_r(&time, &local) != nil else { return "<unknown>" }
        let count = strftime(&buffer, buffer.count, "%Y-%m-%dT%H:%M:%S%z", &local)
        let text = String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        lastSecond = (second, text)
        return text
    }
}

/// One JSON object per line: `ts`, `level`, `logger`, `msg`, then the metadata keys. For log
/// shippers (`--log-format json` or `LOG_FORMAT=json`).
enum JSONLogLine {
    static func format(_ record: LogRecord, into text: inout String) {
        var object: [String: Any] = [
            "ts": ISO8601DateFormatter.string(
                from: record.time, timeZone: .gmt,
                formatOptions: [.withInternetDateTime, .withFractionalSeconds]),
            "level": record.level.rawValue, "logger": record.label, "msg": record.message.description,
        ]
        for (key, value) in record.metadata { object[key] = plain(value) }
        guard let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) else { return }
        text += String(decoding: data, as: UTF8.self) + "\n"
    }

    private static func plain(_ value: Logger.Metadata.Value) -> Any {
        switch value {
        case .string(let s): s
        case .stringConvertible(let c): c.description
        case .array(let a): a.map(plain)
        case .dictionary(let d): d.mapValues(plain)
        }
    }
}

/// Chooses the log format once per process.
enum LogSetup {
    private static let done = Mutex(false)
    nonisolated(unsafe) private(set) static var format = LogRecord.Format.text

    static func bootstrap(format: String) {
        let first = done.withLock { done -> Bool in
            defer { done = true }
            return !done
        }
        guard first else { return }
        if format == "json" {
            Self.format = .json
            LoggingSystem.bootstrap { LineLogHandler(label: $0, format: .json) }
        } else {
            LoggingSystem.bootstrap { LineLogHandler(label: $0, format: .text) }
        }
        // What is still queued when the process exits is written first (bounded).
        atexit { LogOutput.flush() }
    }
}
