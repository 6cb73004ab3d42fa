import ArgumentParser
import ASGI
import Channels
import Foundation
import Logging
import RedisChannelLayer
import Synchronization

struct RunDelay: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rundelay",
        abstract: "Run the delay server: messages sent to asgi.delay go to their channel when due."
    )

    @OptionGroup var options: LayerOptions
    @Option(name: .long, help: "The Redis sorted set that holds scheduled messages.") var delayKey = "asgi-delay:scheduled"

    func run() async throws {
        let logger = options.makeLogger("channels.rundelay")
        let layer = try options.makeLayer(logger: logger, allowMemory: false)
        guard let redis = layer as? RedisChannelLayer, let first = redis.configuration.hosts.first else {
            throw ValidationError("rundelay needs a Redis layer")
        }
        let client = RedisClient(endpoint: first)
        let server = DelayServer(layer: layer, store: RedisDelayStore(client: client, key: delayKey), logger: logger)
        say("rundelay: waiting for messages on \(DelayServer.channel), scheduled in \(delayKey) on \(first)")
        await runUntilSignal(logger: logger, run: server.run, stop: server.stop)
        await client.close()
        await layer.close()
    }
}
