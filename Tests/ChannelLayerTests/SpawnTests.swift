import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// The suite's own process starting: a child (a Redis, a Python peer) keeps none of the test
/// process's descriptors. Every test runs in one process, so a Redis started by one test
/// inherited the connections another test's server had open at that moment, and held them open
/// after the server closed them: the client saw no close until that Redis stopped.
@Suite("starting programs from the tests")
struct SpawnTests {
    @Test func aStartedProgramInheritsNoDescriptorButItsStandardOnes() async throws {
        var pipe: [Int32] = [0, 0]
        #expect(Glibc.pipe(&pipe) == 0)
        defer {
            close(pipe[0])
            close(pipe[1])
        }
        // Open here, without close-on-exec (as NIO's accepted sockets are).
        #expect(fcntl(pipe[0], F_GETFD) & FD_CLOEXEC == 0)
        let script = "for f in \(pipe[0]) \(pipe[1]); do [ -e /proc/$$/fd/$f ] && echo inherited $f; done; echo looked"
        let (status, output) = try await runProgram(["/bin/sh", "-c", script])
        #expect(status == 0)
        #expect(output == "looked\n", "the child holds descriptors of the test process: \(output)")
    }
}
