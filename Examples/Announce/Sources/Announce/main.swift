import ASGI
import Channels
import Foundation
import Hummingbird
import RedisChannelLayer

/// `POST /announce` with a text body sends it to the chat's lobby (`Group("chat-lobby")`), from
/// outside any consumer: the layer is `ChannelLayers.default`. Environment: `CHANNEL_LAYER` (the
/// chat's Redis layer URL), `PORT` (8080).
let environment = ProcessInfo.processInfo.environment
let layerURL = environment["CHANNEL_LAYER"] ?? "redis://127.0.0.1:6379/0"
let router = Router()

// README begin
// A Hummingbird route that posts to a room of the chat, in a process of its own:
ChannelLayers.default = try RedisChannelLayer(urls: [layerURL])
router.post("/announce") { request, _ in
    let text = try await request.body.collect(upTo: 4096)
    try await Group("chat-lobby").send(["text": .string(String(buffer: text))])
    return HTTPResponse.Status.accepted
}
// README end

let app = Application(
    router: router,
    configuration: .init(address: .hostname("127.0.0.1", port: Int(environment["PORT"] ?? "") ?? 8080)))
try await app.runService()
