import ASGI
import Channels
import ChannelsCommand
import Foundation

/// The Python peers' benchmark application, in Swift, for `scripts/bench-server.sh`: the same
/// behaviour as `../shared/peers/channels1/chat/consumers.py` (the Channels 1.x "Persisting Data"
/// consumers), so both stacks serve identical traffic.
///
/// - any path is a room (the path without slashes, kept in the channel session); every text
///   frame is relayed verbatim to the room's group `chat-<room>`, sender included;
/// - any HTTP path answers `Hello world! You asked for <path>`;
/// - `bench.noop` is a consumer that does nothing (the worker dispatch benchmark).
///
/// With `PEERCHAT_HISTORY=1` rooms keep a history (the cost of history on the fan-out figure,
/// `scripts/bench-fanout.sh`): sockets follow their room, and a frame is published as
/// `{"text": <frame>}` with its offset and epoch.
let history = ProcessInfo.processInfo.environment["PEERCHAT_HISTORY"] == "1"
if history { GroupHistory.keep("chat-*", size: 1000, ttl: .seconds(300)) }

let app = ChannelsApplication(name: "peer-chat") {
    [
        route(ASGIChannel.httpRequest) { context in
            try await context.respond(contentType: "text/html; charset=utf-8", "Hello world! You asked for \(context.path)")
        },
        route(
            ASGIChannel.websocketConnect,
            channelSession { context in
                try await context.accept()
                let room = context.path.trimmingCharacters(in: "/")
                try context.channelSession["room"] = .string(room)
                if history {
                    // A socket that comes back with ?offset=&epoch= gets what it missed first.
                    try await context.follow(Group("chat-\(room)"), after: context.streamPosition)
                } else {
                    try await Group("chat-\(room)").add(context.replyChannel!)
                }
            }),
        route(
            ASGIChannel.websocketReceive,
            channelSession { context in
                let room = try context.channelSession["room"]?.stringValue ?? ""
                let frame = try context.message(as: WebSocketReceiveMessage.self)
                if history, let text = frame.data.text {
                    try await Group("chat-\(room)").publish("{\"text\":" + JSONText.quote(text) + "}")
                } else {
                    try await Group("chat-\(room)").send(WebSocketSendMessage(data: frame.data))
                }
            }),
        route(
            ASGIChannel.websocketDisconnect,
            channelSession { context in
                let room = try context.channelSession["room"]?.stringValue ?? ""
                try await Group("chat-\(room)").discard(context.replyChannel!)
            }),
        route("bench.noop") { _ in },
    ]
}

extension String {
    func trimmingCharacters(in character: Character) -> String {
        var s = Substring(self)
        while s.first == character { s = s.dropFirst() }
        while s.last == character { s = s.dropLast() }
        return String(s)
    }
}

await app.main()
