import ASGI
import Channels
import ChannelsRedis
import Foundation
import RedisChannelLayer
import Testing

/// The Redis of `scripts/test.sh`. Tests that need it fail (not skip) without it, saying why.
enum TestRedis {
    static func requireURL() throws -> String {
        guard let url = ProcessInfo.processInfo.environment["REDIS_URL"] else {
            Issue.record("REDIS_URL is not set: run scripts/test.sh, which starts a throwaway redis-server")
            throw Missing.redis
        }
        return url
    }

    enum Missing: Error { case redis }

    /// A Redis layer on keys of its own, so tests run in parallel on one server.
    static func layer(
        prefix: String = "t" + ChannelNames.randomLetters(8) + ":", capacity: Int = 100,
        channelCapacities: [(String, Int)] = [], blockingSlice: Duration? = nil
    ) throws -> RedisChannelLayer {
        var configuration = try RedisChannelLayerConfiguration(urls: [try requireURL()])
        configuration.prefix = prefix
        configuration.statsPrefix = String(prefix.dropLast()) + "-meta:"
        configuration.capacity = capacity
        configuration.channelCapacities = channelCapacities
        if let blockingSlice { configuration.blockingSlice = blockingSlice }
        return try RedisChannelLayer(configuration: configuration)
    }

    static func client() throws -> RedisClient { try RedisClient(url: try requireURL()) }

    static func sessionStore(prefix: String) throws -> RedisSessionStore {
        RedisSessionStore(client: try client(), prefix: prefix)
    }
}

enum StoreKind: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case memory, redis
    var testDescription: String { rawValue }
}

/// Users for the auth tests.
struct TestUsers: UserAuthenticator {
    func user(id: String) async throws -> User? {
        ["1": User(id: "1", username: "alice"), "2": User(id: "2", username: "bob")][id]
    }

    func authenticate(username: String, password: String) async throws -> User? {
        guard password == username + "'s password" else { return nil }
        return ["alice": User(id: "1", username: "alice"), "bob": User(id: "2", username: "bob")][username]
    }
}

/// A log of what consumers did, safe to share between them.
actor Log {
    var entries: [String] = []
    func add(_ entry: String) { entries.append(entry) }
}
