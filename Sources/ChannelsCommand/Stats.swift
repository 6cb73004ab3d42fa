import ASGI
import ArgumentParser
import Channels
import Foundation
import Logging
import Synchronization

struct Stats: ApplicationSubcommand {
    static let configuration = CommandConfiguration(abstract: "Show channel and layer statistics.")

    @OptionGroup var options: LayerOptions
    @Flag(name: .long, help: "Print JSON.") var json = false
    @Option(name: .long, help: "Refresh every N seconds until interrupted.") var watch: Double?
    @Argument(help: "Channels to show (default: the routed ones and every channel with messages).") var channels: [String] = []

    func run(_ app: ChannelsApplication) async throws {
        let logger = options.makeLogger("channels.stats")
        let layer = try options.makeBackend(logger: logger, allowMemory: false).layer
        defer { Task { await layer.close() } }
        guard let watch, watch > 0 else {
            try await show(layer, app: app)
            return
        }
        while !Task.isCancelled {
            say("\u{1b}[2J\u{1b}[H" + Date().description)
            try await show(layer, app: app)
            // A refresh of a display, on a timer.
            try await Task.sleep(for: Duration(secondsValue: watch))
        }
    }

    private func show(_ layer: any ChannelLayer, app: ChannelsApplication) async throws {
        var names = Set(channels)
        if names.isEmpty {
            names = try Router(app.routing()).channels
            if let inspection = layer as? any ChannelLayerInspection {
                names.formUnion(try await inspection.pendingChannels())
            }
        }
        var groups: [(String, Int)] = []
        if let inspection = layer as? any ChannelLayerInspection {
            for group in try await inspection.groups() { groups.append((group, try await layer.groupChannels(group).count)) }
        }
        let global = try await layer.globalStatistics()
        var rows: [(String, ChannelStatistics)] = []
        for name in names.sorted() {
            rows.append((name, try await layer.channelStatistics(name)))
        }
        if json {
            var object: [String: Any] = ["messages_count": global.messagesCount, "channel_full_count": global.channelFullCount]
            object["channels"] = Dictionary(
                uniqueKeysWithValues: rows.map {
                    (
                        $0.0,
                        [
                            "messages_count": $0.1.messagesCount, "channel_full_count": $0.1.channelFullCount,
                            "messages_pending": $0.1.messagesPending, "messages_max_age": $0.1.messagesMaxAge,
                        ] as [String: Any]
                    )
                })
            object["groups"] = Dictionary(uniqueKeysWithValues: groups.map { ($0.0, $0.1) })
            let data = try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .prettyPrinted])
            print(String(decoding: data, as: UTF8.self))
        } else {
            print("channel".padding(toLength: 40, withPad: " ", startingAt: 0) + "  pending   oldest(s)   sent   full")
            for (name, s) in rows {
                print(
                    name.padding(toLength: 40, withPad: " ", startingAt: 0)
                        + String(
                            format: "  %7d   %9.1f   %4d   %4d", s.messagesPending, s.messagesMaxAge, s.messagesCount, s.channelFullCount))
            }
            print("total sent \(global.messagesCount), channel full \(global.channelFullCount)")
            if !groups.isEmpty {
                print("")
                print("group".padding(toLength: 40, withPad: " ", startingAt: 0) + "  members")
                for (name, size) in groups {
                    print(name.padding(toLength: 40, withPad: " ", startingAt: 0) + String(format: "  %7d", size))
                }
            }
        }
    }
}
