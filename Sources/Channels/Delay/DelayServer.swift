import ASGI
import Foundation
import Logging
import RedisChannelLayer
import Synchronization

/// Where the delay server keeps messages until they are due.
public protocol DelayStore: Sendable {
    /// Keeps `entry` until `due` (milliseconds since 1970).
    func schedule(_ entry: [UInt8], due: Int64) async throws
    /// Removes and returns up to `limit` entries due at `now`, atomically: two servers taking
    /// at once never get the same entry.
    func takeDue(now: Int64, limit: Int) async throws -> [[UInt8]]
    /// When the earliest entry is due, if there is one.
    func nextDue() async throws -> Int64?
}

/// Delayed messages in this process (the in-memory layer's companion).
public final class InMemoryDelayStore: DelayStore {
    private let entries = Mutex<[(due: Int64, entry: [UInt8])]>([])

    public init() {}

    public func schedule(_ entry: [UInt8], due: Int64) async throws {
        entries.withLock { entries in
            let index = entries.firstIndex { $0.due > due } ?? entries.endIndex
            entries.insert((due, entry), at: index)
        }
    }

    public func takeDue(now: Int64, limit: Int) async throws -> [[UInt8]] {
        entries.withLock { entries in
            let count = min(limit, entries.prefix { $0.due <= now }.count)
            defer { entries.removeFirst(count) }
            return entries.prefix(count).map(\.entry)
        }
    }

    public func nextDue() async throws -> Int64? { entries.withLock { $0.first?.due } }
}

/// Delayed messages in a Redis sorted set scored by due time, so any number of delay servers
/// share them and each message is taken (and sent) by exactly one.
public final class RedisDelayStore: DelayStore {
    public let client: RedisClient
    public let key: String

    private static let take = LuaScript(name: "delay-take", source: """
        local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
        if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
        return due
        """)

    public init(client: RedisClient, key: String = "asgi-delay:scheduled") {
        self.client = client
        self.key = key
    }

    public func schedule(_ entry: [UInt8], due: Int64) async throws {
        // A random prefix keeps two identical messages distinct members of the set.
        var member: [UInt8] = (0..<8).map { _ in UInt8.random(in: 0...255) }
        member.append(contentsOf: entry)
        try await client.command([Array("ZADD".utf8), Array(key.utf8), Array(String(due).utf8), member])
    }

    public func takeDue(now: Int64, limit: Int) async throws -> [[UInt8]] {
        let reply = try await client.run(Self.take, keys: [Array(key.utf8)],
                                         args: [Array(String(now).utf8), Array(String(limit).utf8)])
        return (reply.array ?? []).compactMap { $0.bytes.map { Array($0.dropFirst(8)) } }
    }

    public func nextDue() async throws -> Int64? {
        let reply = try await client.command([Array("ZRANGE".utf8), Array(key.utf8), Array("0".utf8), Array("0".utf8),
                                              Array("WITHSCORES".utf8)])
        guard let items = reply.array, items.count == 2, let score = items[1].text, let value = Double(score) else { return nil }
        return Int64(value)
    }
}

/// The delay server (`rundelay`): takes `{channel, content, delay}` messages (delay in
/// milliseconds) from `asgi.delay`, keeps them in a ``DelayStore``, and sends `content` to
/// `channel` when due. Malformed messages are logged, counted and dropped; a full channel at
/// delivery time is retried a second later.
public final class DelayServer: Sendable {
    public static let channel = "asgi.delay"
    public let layer: any ChannelLayer
    public let store: any DelayStore
    private let logger: Logger
    private let stopping = Atomic<Bool>(false)
    private let wake = Wakeup()
    private let counters = Mutex(Counters())

    public struct Counters: Sendable {
        public var scheduled = 0
        public var delivered = 0
        public var malformed = 0
        public var retriedFull = 0
        public var failed = 0
    }

    public init(layer: any ChannelLayer, store: any DelayStore, logger: Logger = Logger(label: "channels.delay")) {
        self.layer = layer
        self.store = store
        self.logger = logger
    }

    public var statistics: Counters { counters.withLock { $0 } }

    static func nowMillis() -> Int64 { Int64((Date().timeIntervalSince1970 * 1000).rounded()) }

    /// Runs until `stop()`.
    public func run() async {
        logger.info("delay server ready", metadata: ["channel": "\(Self.channel)"])
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.intake() }
            group.addTask { await self.dispatch() }
        }
        logger.info("delay server stopped", metadata: ["delivered": "\(statistics.delivered)"])
    }

    public func stop() {
        stopping.store(true, ordering: .relaxed)
        wake.signal()
    }

    private var isStopping: Bool { stopping.load(ordering: .relaxed) }

    private func intake() async {
        var failures = 0
        while !isStopping {
            do {
                guard let received = try await layer.receive(channels: [Self.channel], timeout: .seconds(1)) else { continue }
                failures = 0
                try await accept(received.message)
            } catch {
                failures += 1
                if failures == 1 || failures % 30 == 0 { logger.error("delay intake failed", metadata: ["error": "\(error)"]) }
                try? await Task.sleep(for: .milliseconds(min(1000, 50 * failures)))
            }
        }
    }

    /// Validates and stores one `asgi.delay` message.
    func accept(_ message: Message) async throws {
        guard let channel = message["channel"]?.stringValue, (try? ChannelNames.validateChannel(channel)) != nil,
              let content = message["content"]?.mapValue,
              let delay = message["delay"]?.doubleValue, delay.isFinite, delay >= 0, delay <= 366 * 86_400_000 else {
            counters.withLock { $0.malformed += 1 }
            logger.warning("dropped a malformed delay message: it needs channel (a valid name), content (a map) and delay (ms >= 0)",
                           metadata: ["message": "\(String(describing: message).prefix(200))"])
            return
        }
        let entry = MsgPackEncoder.encode(["channel": .string(channel), "content": .map(content)] as ASGIValue)
        try await store.schedule(entry, due: Self.nowMillis() + Int64(delay))
        counters.withLock { $0.scheduled += 1 }
        wake.signal()
    }

    private func dispatch() async {
        var failures = 0
        while !isStopping {
            var wait = Duration.seconds(1)
            do {
                while true {
                    let due = try await store.takeDue(now: Self.nowMillis(), limit: 100)
                    for entry in due { await deliver(entry) }
                    if due.count < 100 { break }
                }
                if let next = try await store.nextDue() {
                    let millis = max(0, min(1000, next - Self.nowMillis()))
                    wait = .milliseconds(millis)
                }
                failures = 0
            } catch {
                failures += 1
                if failures == 1 || failures % 30 == 0 { logger.error("delay dispatch failed", metadata: ["error": "\(error)"]) }
                wait = .milliseconds(min(1000, 50 * failures))
            }
            // Woken early by a message scheduled here; the bound covers messages scheduled by
            // another delay server (and its death).
            if wait > .zero { await wake.wait(timeout: wait) }
        }
    }

    private func deliver(_ entry: [UInt8]) async {
        guard let value = try? MsgPackDecoder().decode(entry), let map = value.mapValue,
              let channel = map["channel"]?.stringValue, let content = map["content"]?.mapValue else {
            counters.withLock { $0.malformed += 1 }
            logger.warning("dropped an unreadable stored delay entry")
            return
        }
        do {
            try await layer.send(Message(content), to: channel)
            counters.withLock { $0.delivered += 1 }
        } catch let error as ChannelLayerError where error.code == .channelFull {
            counters.withLock { $0.retriedFull += 1 }
            logger.info("channel full at delivery; retrying in 1 s", metadata: ["channel": "\(channel)"])
            try? await store.schedule(entry, due: Self.nowMillis() + 1000)
        } catch {
            counters.withLock { $0.failed += 1 }
            logger.error("could not deliver a delayed message; retrying in 1 s", metadata: ["channel": "\(channel)", "error": "\(error)"])
            try? await store.schedule(entry, due: Self.nowMillis() + 1000)
        }
    }
}

/// A one-slot signal: `wait(timeout:)` returns when signalled (or when a signal came since the
/// last wait) or when the timeout passes. No polling: it suspends on a continuation.
final class Wakeup: Sendable {
    private struct State {
        var pending = false
        var waiter: CheckedContinuation<Void, Never>?
        var generation = 0
    }

    private let state = Mutex(State())

    func signal() {
        let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
            guard let waiter = state.waiter else {
                state.pending = true
                return nil
            }
            state.waiter = nil
            return waiter
        }
        waiter?.resume()
    }

    func wait(timeout: Duration) async {
        let generation = state.withLock { state -> Int? in
            if state.pending {
                state.pending = false
                return nil
            }
            state.generation += 1
            return state.generation
        }
        guard let generation else { return }
        let timer = Task { [weak self] in
            try? await Task.sleep(for: timeout)
            self?.fire(generation: generation)
        }
        await withCheckedContinuation { continuation in
            let resumeNow = state.withLock { state -> Bool in
                if state.pending || state.generation != generation {
                    state.pending = false
                    return true
                }
                state.waiter = continuation
                return false
            }
            if resumeNow { continuation.resume() }
        }
        timer.cancel()
    }

    private func fire(generation: Int) {
        let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
            guard state.generation == generation, let waiter = state.waiter else {
                if state.generation == generation { state.generation += 1 }
                return nil
            }
            state.waiter = nil
            return waiter
        }
        waiter?.resume()
    }
}

extension Channel {
    /// Sends `message` to this channel after `delay`, through the delay server (`rundelay`, or
    /// the one `runserver` runs in process on the in-memory layer).
    public func send(_ message: Message, delay: Duration, immediately: Bool = false) async throws {
        let millis = delay.components.seconds * 1000 + delay.components.attoseconds / 1_000_000_000_000_000
        try ChannelNames.validateChannel(name)
        try await Channel(DelayServer.channel).send(Self.delayEnvelope(message, to: name, millis: millis), immediately: immediately)
    }

    /// The same, outside a consumer.
    public func send(_ message: Message, delay: Duration, on layer: any ChannelLayer) async throws {
        let millis = delay.components.seconds * 1000 + delay.components.attoseconds / 1_000_000_000_000_000
        try ChannelNames.validateChannel(name)
        try await layer.send(Self.delayEnvelope(message, to: name, millis: millis), to: DelayServer.channel)
    }

    static func delayEnvelope(_ message: Message, to channel: String, millis: Int64) -> Message {
        ["channel": .string(channel), "content": .map(message.fields), "delay": .int(millis)]
    }
}
