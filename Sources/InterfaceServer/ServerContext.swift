import ASGI
import CoreMetrics
import Dispatch
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// What every connection of one server shares.
final class ServerContext: Sendable {
    let layer: any ChannelLayer
    let router: ReplyRouter
    let configuration: ServerConfiguration
    let logger: Logger
    let accessLog: AccessLog?
    private let openSockets = Mutex<[ObjectIdentifier: @Sendable (UInt16) -> Void]>([:])
    private let pingWheels = Mutex<[ObjectIdentifier: PingWheel<WebSocketSession>]>([:])
    private let tailWheels = Mutex<[ObjectIdentifier: LoopWheel<WebSocketSession>]>([:])
    let shuttingDown = Atomic<Bool>(false)
    /// The hosts requests may name and the origins WebSockets may come from.
    let allowedHosts: AllowedHosts

    init(layer: any ChannelLayer, router: ReplyRouter, configuration: ServerConfiguration, logger: Logger, accessLog: AccessLog?) {
        self.layer = layer
        self.router = router
        self.configuration = configuration
        self.allowedHosts = AllowedHosts(configuration.allowedHosts, origins: configuration.allowedOrigins)
        self.logger = logger
        self.accessLog = accessLog
        self.presenceDiffs = PresenceDiffBatcher(window: configuration.presenceWindow)
    }

    let counters = ServerCounters()
    /// This server's sockets tracked as present (see ``PresenceKeeper``).
    let presence = PresenceRegistry()
    /// The groups this server's sockets follow, and which (see ``GroupKeeper``).
    let followers = FollowerRegistry()
    /// Followed groups' history tops, shared by the sockets' tail checks.
    let historyTops = HistoryTops()
    let presenceDiffs: PresenceDiffBatcher
    /// The channels this server found full, and the sends waiting in line for them.
    let fullChannels = FullChannels()
    /// The presence lists sent to joining sockets, one read for many (see ``PresenceLists``).
    let presenceLists = PresenceLists()

    /// Tells `group` (in a moment, with the other changes of the moment) that `user` joined or
    /// left, with that change's presence version.
    func tellPresence(_ group: String, user: String, joined: Bool, version: Int64) {
        let layer = self.layer
        let logger = self.logger
        presenceDiffs.add(group, user: user, joined: joined, version: version) { diffs in
            for diff in diffs {
                do {
                    try await layer.sendGroup(diff.group, message: ["text": .string(PresenceText.diff(diff))])
                } catch {
                    logger.warning("a presence diff was not sent", metadata: ["group": "\(diff.group)", "error": "\(error)"])
                }
            }
        }
    }

    /// True when the request's `Host` names an allowed host; counts the refusal otherwise.
    func hostAllowed(_ head: HTTPRequestHead) -> Bool {
        // Exactly one Host (RFC 9112 3.2: two are a 400): which one a proxy and we would each believe is not a question to leave open.
        let hosts = head.headers[canonicalForm: "host"]
        guard hosts.count == 1, let host = hosts.first.map(String.init), allowedHosts.allows(host: host) else {
            counters.count(.refusedHost)
            return false
        }
        return true
    }

    /// A sender for one connection's messages (see ``LayerSender``), whose send loop runs in
    /// the connection's task (`owner`) and ends once `channel` has closed and it sent what it held.
    func makeSender(
        on channel: any Channel, owner: ConnectionSenders?, outageTimeout: Duration, heldLimit: Int? = nil
    ) -> LayerSender {
        let sender = LayerSender(
            server: self, loop: channel.eventLoop, outageTimeout: outageTimeout,
            heldLimit: heldLimit ?? configuration.maxHeldMessages, owner: owner)
        let bound = NIOLoopBound(sender, eventLoop: channel.eventLoop)
        channel.closeFuture.whenComplete { _ in bound.value.close() }
        return sender
    }

    func trackSocket(_ id: ObjectIdentifier, closer: @escaping @Sendable (UInt16) -> Void) {
        openSockets.withLock { $0[id] = closer }
        ServerMetrics.websocketsOpen.increment()
    }

    /// Each event loop's ping wheel (made the first time a socket of that loop needs it); nil
    /// without pings (`pingInterval` nil).
    func pingWheel(on loop: any EventLoop) -> PingWheel<WebSocketSession>? {
        guard let interval = configuration.pingInterval else { return nil }
        return pingWheels.withLock { wheels in
            let key = ObjectIdentifier(loop)
            if let wheel = wheels[key] { return wheel }
            let wheel = PingWheel<WebSocketSession>(loop: loop, interval: interval)
            wheels[key] = wheel
            return wheel
        }
    }

    /// Each event loop's tail-check wheel (``WebSocketSession/tailTick()``): every following
    /// socket with a check due is looked at once per ``WebSocketSession/tailQuiet``.
    func tailWheel(on loop: any EventLoop) -> LoopWheel<WebSocketSession> {
        tailWheels.withLock { wheels in
            let key = ObjectIdentifier(loop)
            if let wheel = wheels[key] { return wheel }
            let wheel = LoopWheel<WebSocketSession>(
                loop: loop, interval: .nanoseconds(WebSocketSession.tailQuiet.nanoseconds), slots: 1, place: \.tailPlace
            ) { $0.tailTick() }
            wheels[key] = wheel
            return wheel
        }
    }

    /// The sockets on the event loops' tail wheels (each counted on its loop).
    func socketsOnTailWheels() async -> Int {
        var total = 0
        for wheel in tailWheels.withLock({ Array($0.values) }) {
            total += (try? await wheel.loop.submit { wheel.sockets }.get()) ?? 0
        }
        return total
    }

    func untrackSocket(_ id: ObjectIdentifier) {
        if openSockets.withLock({ $0.removeValue(forKey: id) }) != nil { ServerMetrics.websocketsOpen.decrement() }
    }

    /// Closes every open WebSocket with `code` (1001 on shutdown).
    func closeAllSockets(code: UInt16) {
        let closers = openSockets.withLock { Array($0.values) }
        for closer in closers { closer(code) }
    }

    var openSocketCount: Int { openSockets.withLock { $0.count } }
}
