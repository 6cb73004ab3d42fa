import ArgumentParser
import InterfaceServer
import Testing

@testable import ChannelsCommand

/// `runserver`'s options as the server sees them: every flag reaches its configuration field,
/// the clamps hold, and the refusals at start-up say what to do.
@Suite("runserver options")
struct RunServerOptionsTests {
    @Test("defaults: the documented limits, HTTP/2 on, pings every 20 s, a group check every 10 s")
    func defaults() throws {
        let configuration = try RunServer.parse([]).serverConfiguration()
        #expect(configuration.host == "127.0.0.1" && configuration.port == 8000)
        #expect(configuration.http2 && configuration.maxConnections == 10_000)
        #expect(configuration.pingInterval == .seconds(20) && configuration.groupCheckInterval == .seconds(10))
        #expect(configuration.httpTimeout == .seconds(60) && configuration.cutOffTimeout == .seconds(30))
        #expect(configuration.allowedHosts.contains("localhost") && configuration.allowedHosts.contains("127.0.0.1"))
    }

    @Test("each flag reaches its field; zero turns pings and the cut-off off; clamps hold")
    func flagsReachTheConfiguration() throws {
        let configuration = try RunServer.parse([
            "--port", "9100", "--no-http2", "--max-connections", "123", "--ping-interval", "0", "--cut-off-timeout", "0",
            "--group-check-interval", "0.05", "--presence-ttl", "0.1", "--presence-window", "60", "--min-body-rate=-5",
            "--http-timeout", "2.5", "--allowed-hosts", "chat.example", "--max-queued-bytes", "65536",
        ]).serverConfiguration()
        #expect(configuration.port == 9100 && !configuration.http2 && configuration.maxConnections == 123)
        #expect(configuration.pingInterval == nil && configuration.cutOffTimeout == nil)
        #expect(configuration.groupCheckInterval == .milliseconds(200), "clamped up to 0.2 s")
        #expect(configuration.presenceTTL == .milliseconds(300), "clamped up to 0.3 s")
        #expect(configuration.presenceWindow == .seconds(10), "clamped down to 10 s")
        #expect(configuration.minBodyRate == 0)
        #expect(configuration.httpTimeout == .milliseconds(2500))
        #expect(configuration.allowedHosts == ["chat.example"] && configuration.maxQueuedBytesPerSocket == 65536)
        #expect(try RunServer.parse(["--group-check-interval", "0"]).serverConfiguration().groupCheckInterval == .zero)
    }

    @Test("refused at start-up with what to do: a wildcard bind without allowed hosts, --admin without a metrics port")
    func refusals() throws {
        #expect(throws: (any Error).self) { try RunServer.parse(["--bind", "0.0.0.0"]) }
        #expect(RunServer.message(for: ValidationError("x")).isEmpty == false)
        do {
            _ = try RunServer.parse(["--bind", "0.0.0.0"])
        } catch {
            #expect(RunServer.message(for: error).contains("--allowed-hosts"), "\(RunServer.message(for: error))")
        }
        do {
            _ = try RunServer.parse(["--admin"])
            Issue.record("--admin without --metrics-port was accepted")
        } catch {
            #expect(RunServer.message(for: error).contains("--metrics-port"))
        }
        #expect(try RunServer.parse(["--bind", "0.0.0.0", "--allowed-hosts", "*"]).serverConfiguration().allowedHosts == ["*"])
    }

    /// A gap timeout of zero would make every gap watch renew its lease as fast as Redis answers.
    @Test("an ordering gap timeout of zero or less is refused at start-up")
    func orderingGapTimeoutMustBePositive() throws {
        for value in ["0", "-1", "nan"] {
            #expect(throws: (any Error).self) { try RunWorker.parse(["--ordering-gap-timeout", value]) }
        }
        #expect(try RunWorker.parse(["--ordering-gap-timeout", "0.5"]).options.orderingGapTimeout == 0.5)
    }

    @Test("--concurrency sets how many consumers run at once; --threads (Channels 1.x's name) still does")
    func concurrencyAndItsOldName() throws {
        #expect(try RunServer.parse([]).concurrency == 32 && RunWorker.parse([]).concurrency == 32)
        #expect(try RunServer.parse(["--concurrency", "9"]).concurrency == 9)
        #expect(try RunServer.parse(["--threads", "7"]).concurrency == 7)
        #expect(try RunWorker.parse(["--concurrency", "5"]).concurrency == 5)
        #expect(try RunWorker.parse(["--threads", "3"]).concurrency == 3)
    }
}
