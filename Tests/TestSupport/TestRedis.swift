import ASGI
import Foundation
import RedisChannelLayer

/// The Redis (and the Python venv) of `scripts/test.sh`, shared by the test targets. Tests that
/// need them fail, not skip, without them: the error says what is missing and how to get it.
public enum TestRedis {
    /// Something a test needs that this machine's test run did not provide.
    public struct Missing: Error, CustomStringConvertible {
        /// What is missing and how to get it.
        public let description: String
    }

    /// `REDIS_URL`, when set.
    public static var url: String? { ProcessInfo.processInfo.environment["REDIS_URL"] }

    /// `REDIS_URL`, or an error saying to run `scripts/test.sh`.
    public static func requireURL() throws -> String {
        guard let url else {
            throw Missing(description: "REDIS_URL is not set: run scripts/test.sh, which starts a throwaway redis-server")
        }
        return url
    }

    /// `INTEROP_PYTHON` (the asgi_redis 1.4.3 venv's python), or an error saying where it comes from.
    public static func requirePython() throws -> String {
        guard let python = ProcessInfo.processInfo.environment["INTEROP_PYTHON"] else {
            throw Missing(description: "INTEROP_PYTHON is not set: run scripts/test.sh, which builds the asgi_redis 1.4.3 venv")
        }
        return python
    }

    /// A key prefix of a test's own, so tests run in parallel on one server.
    public static func uniquePrefix() -> String { "t" + ChannelNames.randomLetters(8) + ":" }

    /// A Redis layer on keys of its own.
    public static func layer(
        prefix: String = uniquePrefix(), capacity: Int = 100, channelCapacities: [(String, Int)] = [],
        blockingSlice: Duration? = nil
    ) throws -> RedisChannelLayer {
        var configuration = try RedisChannelLayerConfiguration(urls: [try requireURL()])
        configuration.prefix = prefix
        configuration.statsPrefix = String(prefix.dropLast()) + "-meta:"
        configuration.capacity = capacity
        configuration.channelCapacities = channelCapacities
        if let blockingSlice { configuration.blockingSlice = blockingSlice }
        return try RedisChannelLayer(configuration: configuration)
    }
}
