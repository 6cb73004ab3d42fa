import ASGI
import Channels
import ChannelsCommand
import Foundation

/// The seed tutorial as one app: `chat runserver`, `chat runworker`, `chat rundelay`, `chat stats`.
/// Rooms keep their last 1,000 messages (5 minutes) for pages that reconnect
/// (`CHAT_HISTORY_SIZE`, `CHAT_HISTORY_TTL` seconds).
GroupHistory.keep(
    "chat-*", size: ChatConsumers.environmentInt("CHAT_HISTORY_SIZE", 1000),
    ttl: .seconds(ChatConsumers.environmentInt("CHAT_HISTORY_TTL", 300)))
var app = ChannelsApplication(name: "chat", users: ChatUsers()) {
    [
        // Step 1: an HTTP consumer.
        route("http.request", path: "^/hello/", ChatConsumers.hello),
        route("http.request", path: "^/poll/$", method: "^POST$", ChatConsumers.poll),
        route("http.request", path: "^/$", ChatConsumers.page),
        // The framework's JavaScript client, which the page uses.
        ChannelsClient.route(),
        route("http.request", path: "^/stream/$", ChatConsumers.stream),
        route("http.request", path: "^/events/$", ChatConsumers.events),
        route("http.request", path: "^/download/(?P<mib>[0-9]{1,2})/$", ChatConsumers.download),
        // Step 6: log in over HTTP (the session cookie), ask who you are.
        include(
            [
                route("http.request", path: "^csrf/$", httpSession(ChatConsumers.csrf)),
                route("http.request", path: "^login/$", method: "^POST$", csrfProtect(ChatConsumers.login)),
                route("http.request", path: "^register/$", method: "^POST$", csrfProtect(ChatConsumers.register)),
                route("http.request", path: "^logout/$", method: "^POST$", csrfProtect(ChatConsumers.logout)),
                // Clients without cookies: a signed token, and who it says you are.
                route("http.request", path: "^token/$", method: "^POST$", ChatConsumers.token),
                route("http.request", path: "^token/me/$", tokenUser(required: true, ChatConsumers.me)),
                route("http.request", path: "^me/$", httpSessionUser(ChatConsumers.me)),
                route("http.request", path: "^rooms/(?P<room>[A-Za-z0-9_-]{1,50})/messages/$", ChatConsumers.historyJSON),
                // Data binding: the author edits or deletes a message; every open page of the room hears of it.
                route(
                    "http.request", path: "^rooms/(?P<room>[A-Za-z0-9_-]{1,50})/messages/(?P<id>[0-9]{1,18})/$",
                    method: "^(?:PATCH|DELETE)$", csrfProtect(httpSessionUser(MessageBinding.http))),
            ], path: "^/api/"),
        // Step 2: a WebSocket echo.
        route("websocket.connect", path: "^/echo/$", ChatConsumers.accept),
        route("websocket.receive", path: "^/echo/$", ChatConsumers.echo),
        // An echo only a partner's pages may open (the server must allow that origin too:
        // --allowed-origins https://partner.example): Channels' OriginValidator on one route.
        route("websocket.connect", path: "^/partner/$", originValidator(["https://partner.example"], ChatConsumers.accept)),
        route("websocket.receive", path: "^/partner/$", ChatConsumers.echo),
        // A socket for token holders (mobile apps): the token on the connect, the user after it.
        route("websocket.connect", path: "^/mobile/$", tokenUser(required: true, channelSession(ChatConsumers.mobileConnect))),
        route("websocket.receive", path: "^/mobile/$", channelSessionUser(ChatConsumers.mobileEcho)),
        // Sockets under /private/ are for logged-in users only (403 otherwise).
        route("websocket.connect", path: "^/private/", channelSessionUserFromHTTP(ChatConsumers.privateConnect)),
        // Steps 3, 5, 6, 7, 9: rooms from the path kept in the channel session, the user carried
        // from the HTTP session, a group per room and per user, messages handled in order.
        include(
            [
                route("websocket.connect", channelSessionUserFromHTTP(enforceOrdering(ChatConsumers.joinRoom))),
                route("websocket.receive", channelSessionUser(enforceOrdering(ChatConsumers.postToRoom))),
                route("websocket.disconnect", channelSessionUser(enforceOrdering(ChatConsumers.leaveRoom))),
            ], path: "^/chat/(?P<room>[A-Za-z0-9_-]{1,50})/$"),
        // Step 8: a channel of our own; its consumer stores each message and broadcasts it, one
        // socket's messages in the order they were sent.
        route("chat-messages", inSendOrder(ChatConsumers.saveAndBroadcast)),
    ]
}

// A background service of the app's own, run (and stopped) with runserver's and runworker's services.
app.services = { [RoomCensus()] }

// The processes that serve open the database first: a path that cannot be opened is a clear
// start-up error (exit 1), not a crash in the middle of a consumer.
if ["runserver", "runworker"].contains(CommandLine.arguments.dropFirst().first ?? "") {
    do {
        _ = try ChatDatabase.shared
    } catch {
        FileHandle.standardError.write(Data("chat: \(error)\n".utf8))
        exit(1)
    }
}

await app.main()
