import ASGI
import Foundation

/// What `stats` prints and the operations page shows of a layer: each channel's depth and
/// oldest message, each group's size, the layer's totals. One type for both, so they agree;
/// JSON with the snake_case keys `stats --json` has always printed.
struct LayerSnapshot: Codable, Sendable, Equatable {
    struct ChannelRow: Codable, Sendable, Equatable {
        var name: String
        var messagesPending: Int
        var messagesMaxAge: Double
        var messagesCount: Int
        var channelFullCount: Int
    }

    struct GroupRow: Codable, Sendable, Equatable {
        var name: String
        var members: Int
    }

    /// Where the layer keeps its data (no passwords), when the layer can say.
    var location: String?
    var messagesCount: Int
    var channelFullCount: Int
    var channels: [ChannelRow]
    var groups: [GroupRow]

    /// Messages waiting in every channel shown.
    var pendingTotal: Int { channels.reduce(0) { $0 + $1.messagesPending } }

    /// Asks `layer`: the channels named (with none: `routed` and every channel holding
    /// messages, when the layer can tell), and every group when the layer can list them.
    static func take(of layer: any ChannelLayer, channels named: [String], routed: Set<String>) async throws -> LayerSnapshot {
        let inspection = layer as? any ChannelLayerInspection
        var names = Set(named)
        if names.isEmpty {
            names = routed
            if let inspection { names.formUnion(try await inspection.pendingChannels()) }
        }
        var groups: [GroupRow] = []
        if let inspection {
            for group in try await inspection.groups().sorted() {
                groups.append(GroupRow(name: group, members: try await layer.groupChannels(group).count))
            }
        }
        let global = try await layer.globalStatistics()
        var rows: [ChannelRow] = []
        for name in names.sorted() {
            let s = try await layer.channelStatistics(name)
            rows.append(
                ChannelRow(
                    name: name, messagesPending: s.messagesPending, messagesMaxAge: s.messagesMaxAge, messagesCount: s.messagesCount,
                    channelFullCount: s.channelFullCount))
        }
        return LayerSnapshot(
            location: inspection?.location, messagesCount: global.messagesCount, channelFullCount: global.channelFullCount,
            channels: rows, groups: groups)
    }

    static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
        return encoder
    }()

    static let decoder: JSONDecoder = {
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        return decoder
    }()

    /// The JSON `stats --json` prints: channels and groups keyed by name.
    var statsJSON: [String: Any] {
        var object: [String: Any] = ["messages_count": messagesCount, "channel_full_count": channelFullCount]
        object["channels"] = Dictionary(
            uniqueKeysWithValues: channels.map {
                (
                    $0.name,
                    [
                        "messages_count": $0.messagesCount, "channel_full_count": $0.channelFullCount,
                        "messages_pending": $0.messagesPending, "messages_max_age": $0.messagesMaxAge,
                    ] as [String: Any]
                )
            })
        object["groups"] = Dictionary(uniqueKeysWithValues: groups.map { ($0.name, $0.members) })
        if let location { object["location"] = location }
        return object
    }

    /// The table `stats` prints.
    var text: String {
        func pad(_ s: String) -> String { s.padding(toLength: 40, withPad: " ", startingAt: 0) }
        var lines = [pad("channel") + "  pending   oldest(s)   sent   full"]
        for row in channels {
            lines.append(
                pad(row.name)
                    + String(
                        format: "  %7d   %9.1f   %4d   %4d", row.messagesPending, row.messagesMaxAge, row.messagesCount,
                        row.channelFullCount))
        }
        lines.append("total sent \(messagesCount), channel full \(channelFullCount)")
        if !groups.isEmpty {
            lines.append("")
            lines.append(pad("group") + "  members")
            for group in groups { lines.append(pad(group.name) + String(format: "  %7d", group.members)) }
        }
        return lines.joined(separator: "\n")
    }
}
