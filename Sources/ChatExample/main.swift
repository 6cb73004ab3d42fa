import ASGI
import Channels
import ChannelsCommand
import Foundation

/// The seed tutorial as one app: `chat runserver`, `chat runworker`, `chat stats`.
let app = ChannelsApplication(name: "chat") {
    [
        // Step 1: an HTTP consumer.
        route("http.request", path: "^/hello/", ChatConsumers.hello),
        route("http.request", path: "^/poll/$", method: "^POST$", ChatConsumers.poll),
        route("http.request", path: "^/$", ChatConsumers.page),
        route("http.request", path: "^/stream/$", ChatConsumers.stream),
        // Step 2: a WebSocket echo.
        route("websocket.connect", path: "^/echo/$", ChatConsumers.accept),
        route("websocket.receive", path: "^/echo/$", ChatConsumers.echo),
        // Sockets under /private/ are refused (403) until the auth step lands.
        route("websocket.connect", path: "^/private/", { _ in throw ConsumerError.denyConnection }),
        // Steps 3, 5, 7, 8: rooms from the path, a group per room, messages through a channel.
        include([
            route("websocket.connect", ChatConsumers.joinRoom),
            route("websocket.receive", ChatConsumers.postToRoom),
            route("websocket.disconnect", ChatConsumers.leaveRoom),
        ], path: "^/chat/(?P<room>[A-Za-z0-9_-]{1,50})/$"),
        route("chat-messages", ChatConsumers.broadcast),
    ]
}

await app.main()
