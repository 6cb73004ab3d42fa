import ASGI
import ArgumentParser
import Channels
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix

struct Stats: ApplicationSubcommand {
    static let configuration = CommandConfiguration(
        abstract: "Show channel and layer statistics.",
        discussion: """
            On Redis (--layer) it asks the layer itself. The in-memory layer lives inside its \
            runserver: ask that process with --server http://HOST:PORT, its --metrics-port run with \
            --admin (and --admin-token TOKEN when it has one). --server works on either layer.
            """)

    @OptionGroup var options: LayerOptions
    @Option(name: .long, help: "Ask a running runserver started with --admin, at its metrics port (http://HOST:PORT).")
    var server: String?
    @Option(name: .long, help: "The token that server's --admin-token set (default: $CHANNELS_ADMIN_TOKEN).") var adminToken: String?
    @Flag(name: .long, help: "Print JSON.") var json = false
    @Option(name: .long, help: "Refresh every N seconds until interrupted.") var watch: Double?
    @Argument(help: "Channels to show (default: the routed ones and every channel with messages).") var channels: [String] = []

    func run(_ app: ChannelsApplication) async throws {
        let logger = options.makeLogger("channels.stats")
        let source: @Sendable () async throws -> LayerSnapshot
        var close: (@Sendable () async -> Void)?
        if let server {
            let token =
                adminToken ?? ProcessInfo.processInfo.environment["CHANNELS_ADMIN_TOKEN"]
                ?? ProcessInfo.processInfo.environment["CHANNELS_ADMIN_TOKEN_FILE"].flatMap {
                    try? Secrets.read(file: $0, what: "CHANNELS_ADMIN_TOKEN_FILE")
                }
            let channels = self.channels
            source = { try await AdminClient.fetchSnapshot(server: server, token: token, channels: channels) }
        } else {
            guard (try options.layerURL()) != nil else {
                throw ValidationError(
                    "the in-memory layer lives inside its runserver: ask it with --server http://HOST:METRICS_PORT (runserver --admin --metrics-port PORT), or give --layer redis://…"
                )
            }
            let layer = try options.makeBackend(logger: logger, allowMemory: false).layer
            let routed = try Router(app.routing()).channels
            let channels = self.channels
            source = { try await LayerSnapshot.take(of: layer, channels: channels, routed: routed) }
            close = { await layer.close() }
        }
        defer { if let close { Task { await close() } } }
        guard let watch, watch > 0 else {
            try show(try await source())
            return
        }
        while !Task.isCancelled {
            say("\u{1b}[2J\u{1b}[H" + Date().description)
            try show(try await source())
            // A refresh of a display, on a timer.
            try await Task.sleep(for: Duration(secondsValue: watch))
        }
    }

    private func show(_ snapshot: LayerSnapshot) throws {
        if json {
            let data = try JSONSerialization.data(withJSONObject: snapshot.statsJSON, options: [.sortedKeys, .prettyPrinted])
            print(String(decoding: data, as: UTF8.self))
        } else {
            print(snapshot.text)
        }
    }
}
