import ASGI

extension ChannelLayerError {
    /// An error reply from Redis while doing `what`: `outOfMemory` for `-OOM` (Redis reached
    /// `maxmemory` and may not evict), with words that say so; ``ChannelLayerError/notReady(_:)``
    /// (a `connectionLost` that ran nothing) for a Redis that cannot serve for a moment
    /// (`-LOADING`, `-BUSY`, `-MASTERDOWN`, `-TRYAGAIN`); `backendError` otherwise.
    static func redisRefused(_ message: String, _ what: String) -> ChannelLayerError {
        // Refused before it ran, by a Redis that cannot serve for a moment: loading its data set
        // after a restart (seconds for a large append-only file), busy with a script, a replica
        // cut off from its master, a slot moving. Tried again as an unreachable Redis is.
        if RedisRefusal.isNotReady(message) {
            return .notReady("Redis cannot serve yet (\(message)): \(what) is tried again as after a lost connection")
        }
        if message.hasPrefix("OOM") {
            return ChannelLayerError(
                .outOfMemory,
                "Redis is out of memory (maxmemory reached, and its policy evicts nothing): \(what) refused: \(message)")
        }
        return ChannelLayerError(.backendError, "\(what): \(message)")
    }

}

enum RedisRefusal {
    /// Error replies of a Redis that refused a command it did not run, for a moment.
    static let notReadyPrefixes = ["LOADING ", "BUSY ", "MASTERDOWN ", "TRYAGAIN "]

    /// Whether `message` is such a reply.
    static func isNotReady(_ message: String) -> Bool { notReadyPrefixes.contains { message.hasPrefix($0) } }
}
