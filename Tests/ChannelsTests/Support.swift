import ASGI
import Channels
import ChannelsRedis
import Foundation
import RedisChannelLayer
import TestSupport
import Testing

/// What the Channels tests add to the shared Redis support: the app-level clients.
extension TestRedis {
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
