import ASGI

extension ChannelLayerError {
    /// An error reply from Redis while doing `what`: `outOfMemory` for `-OOM` (Redis reached
    /// `maxmemory` and may not evict), with words that say so; `backendError` otherwise.
    static func redisRefused(_ message: String, _ what: String) -> ChannelLayerError {
        if message.hasPrefix("OOM") {
            return ChannelLayerError(
                .outOfMemory,
                "Redis is out of memory (maxmemory reached, and its policy evicts nothing): \(what) refused: \(message)")
        }
        return ChannelLayerError(.backendError, "\(what): \(message)")
    }
}
