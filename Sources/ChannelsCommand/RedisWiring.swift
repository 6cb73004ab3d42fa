#if Redis
    import ASGI
    import ArgumentParser
    import Channels
    import ChannelsRedis
    import Foundation
    import Logging
    import RedisChannelLayer

    // The commands' Redis wiring, built with the package's `Redis` trait (on by default). An
    // application built without it (`traits: []` on its dependency) runs on the in-memory layer
    // and links no hiredis; a `redis://` URL then gets an error that says why.

    /// The stores that go with a Redis layer: sessions, rate limits, the generated secret and
    /// delayed messages live on its first server, under its prefix, sealed with its keys.
    struct RedisCompanions: LayerCompanions {
        /// The first Redis server of the layer's ring.
        let endpoint: RedisEndpoint
        /// The layer's key prefix.
        let prefix: String
        /// The layer's encryption, applied to what is stored beside it.
        let encryption: StorageEncryption?

        var location: String { "\(endpoint)" }
        var cipher: (any SessionCipher)? { encryption }

        func sessionStore() -> any SessionStore {
            RedisSessionStore(client: RedisClient(endpoint: endpoint), prefix: prefix + "session:")
        }

        func rateLimiter() -> any RateLimiter {
            RedisRateLimiter(client: RedisClient(endpoint: endpoint), prefix: prefix + "ratelimit:")
        }

        /// One secret for every process of the deployment: generated once and kept at
        /// `<prefix>secret` (`SET NX`), sealed with the layer's keys when there are any, so
        /// reading Redis does not give it away.
        func generatedSecret(logger: Logger) async throws -> DeploymentSecret {
            let client = RedisClient(endpoint: endpoint)
            defer { Task { await client.close() } }
            let key = RedisArgument.key(prefix, "secret")
            let fresh = Array(RandomToken.string(50, from: RandomToken.alphanumerics).utf8)
            _ = try await client.command("SET", key, .bytes(encryption?.seal(fresh) ?? fresh), "NX")
            guard let kept = try await client.command("GET", key).bytes, !kept.isEmpty,
                let stored = encryption.map({ try? $0.open(kept) }) ?? kept
            else {
                throw ValidationError("could not keep a generated secret in Redis at \(prefix)secret (or the layer's keys do not open it)")
            }
            logger.warning(
                "no CHANNELS_SECRET_KEY: using the secret generated in the layer's Redis; set one for production",
                metadata: ["key": "\(prefix)secret"])
            return DeploymentSecret(stored)
        }
    }

    /// The Redis layer of `url` (comma-separated for shards), counted, with its companions.
    func makeRedisBackend(url: String, logger: Logger) throws -> Backend {
        let redis = try RedisChannelLayer(
            urls: RedisChannelLayerConfiguration.splitURLList(url), environment: ProcessInfo.processInfo.environment, logger: logger)
        // Said once at start, without holding the start up.
        Task {
            for warning in await redis.evictionWarnings() { logger.warning("\(warning)") }
        }
        let companions = RedisCompanions(
            endpoint: redis.configuration.hosts.first ?? RedisEndpoint(), prefix: redis.configuration.prefix,
            encryption: StorageEncryption(keys: redis.configuration.symmetricEncryptionKeys))
        return Backend(layer: MeteredChannelLayer(redis), companions: companions)
    }

    /// A session store on the Redis server `url` names (`--session-store redis://…`).
    func redisSessionStore(url: String, prefix: String) throws -> any SessionStore {
        RedisSessionStore(client: RedisClient(endpoint: try RedisEndpoint(url: url)), prefix: prefix)
    }
#endif
