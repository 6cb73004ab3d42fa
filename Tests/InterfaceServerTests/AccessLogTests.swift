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
        let hooked = Mutex(0)
        let writer = BackgroundWriter<String>(label: "test", limit: 3, onDrop: { hooked.withLock { $0 += 1 } }) { lines in
            if lines.contains("0") { gate.wait() }  // the disk stalls on the first line
            written.withLock { $0 += lines }
        }
        // The caller never waits on the stalled sink: ten submits return at once.
        for i in 0..<10 { writer.submit(String(i)) }
        // Counted as they happen (a metric), while the sink is still stalled.
        #expect(writer.droppedLines == 7 && hooked.withLock { $0 } == 7)
        #expect(written.withLock { $0.isEmpty })
        gate.signal()
        writer.flush()
        #expect(written.withLock { $0 } == ["0", "1", "2"])
        // Room again once the writer caught up.
        writer.submit("later")
        writer.flush()
        #expect(written.withLock { $0.last } == "later" && writer.droppedLines == 7)
    }

    @Test("lines that came while the sink was busy reach it in one call; a gap line stands where lines were dropped")
    func batchesAndGapLines() async throws {
        let gate = DispatchSemaphore(value: 0)
        let entered = DispatchSemaphore(value: 0)
        let calls = Mutex<[[String]]>([])
        let writer = BackgroundWriter<String>(label: "test", limit: 4, gapLine: { "dropped \($0)" }) { lines in
            if lines.contains("a") {
                entered.signal()
                gate.wait()
            }
            calls.withLock { $0.append(lines) }
        }
        writer.submit("a")
        entered.wait()
        // "a" is in the sink (stalled); three more wait, then the limit drops two.
        for line in ["b", "c", "d", "e", "f"] { writer.submit(line) }
        #expect(writer.droppedLines == 2)
        gate.signal()
        writer.flush()
        writer.submit("g")
        writer.flush()
        // One call for the three that waited; the gap line after them, before what came later.
        #expect(calls.withLock { $0 } == [["a"], ["b", "c", "d"], ["dropped 2"], ["g"]])
    }
}
