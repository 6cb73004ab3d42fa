import Dispatch
import Logging
import Synchronization
import Testing

@testable import InterfaceServer

@Suite("Access log writer", .timeLimit(.minutes(2)))
struct AccessLogTests {
    @Test("lines are written off the caller's thread, in order; past the limit they are dropped and counted, not held")
    func boundedBackgroundWriter() async throws {
        let gate = DispatchSemaphore(value: 0)
        let written = Mutex<[String]>([])
        let writer = BackgroundWriter(logger: Logger(label: "test"), limit: 3) { line in
            if line == "0" { gate.wait() }  // the disk stalls on the first line
            written.withLock { $0.append(line) }
        }
        // The caller never waits on the stalled sink: ten submits return at once.
        for i in 0..<10 { writer.submit(String(i)) }
        #expect(writer.droppedLines == 7)
        #expect(written.withLock { $0.isEmpty })
        gate.signal()
        writer.flush()
        #expect(written.withLock { $0 } == ["0", "1", "2"])
        // Room again once the writer caught up.
        writer.submit("later")
        writer.flush()
        #expect(written.withLock { $0.last } == "later" && writer.droppedLines == 7)
    }
}
