#if Redis
    import ASGI
    import ArgumentParser
    import Channels
    import ChannelsRedis
    import Foundation
    import Logging
    import RedisChannelLayer
    import ServiceLifecycle
    import Synchronization

    struct RunDelay: ApplicationSubcommand {
        static let configuration = CommandConfiguration(
            commandName: "rundelay",
            abstract: "Run the delay server: messages sent to asgi.delay go to their channel when due."
        )

        @OptionGroup var options: LayerOptions
        @OptionGroup var metrics: MetricsOptions
        @Option(name: .long, help: "The Redis sorted set that holds scheduled messages. Default: the layer's prefix and 'delay'.")
        var delayKey: String?
        @Option(name: .long, help: "Seconds past its due time after which a delivery counts as late (channels_delay_late_total).")
        var lateAfter = 0.5
        @Option(
            name: .long,
            help:
                "Seconds a taken message is held for its delivery: if this process dies between taking and sending it, any rundelay sends it after that (the one being sent at the death may arrive twice)."
        )
        var deliveryLease = 30.0

        func validate() throws {
            guard lateAfter.isFinite, lateAfter >= 0 else { throw ValidationError("--late-after must be a number of seconds >= 0") }
            guard deliveryLease.isFinite, deliveryLease >= 1 else {
                throw ValidationError("--delivery-lease must be a number of seconds >= 1")
            }
        }

        func run(_ app: ChannelsApplication) async throws {
            await ShutdownSignals.trap()
            let logger = options.makeLogger("channels.rundelay")
            let metricsEndpoint = try await metrics.start(logger: logger)
            let backend = try options.makeBackend(logger: logger, allowMemory: false)
            let layer = backend.layer
            guard let redis = backend.companions as? RedisCompanions else { throw ValidationError("rundelay needs a Redis layer") }
            let first = redis.endpoint
            let client = RedisClient(endpoint: first)
            let delayKey = self.delayKey ?? redis.prefix + "delay"
            let server = DelayServer(
                layer: layer,
                store: RedisDelayStore(
                    client: client, key: delayKey, encryption: redis.encryption, deliveryLease: Duration(secondsValue: deliveryLease)),
                lateAfter: Duration(secondsValue: lateAfter),
                logger: logger)
            // SIGHUP (a log rotation, `systemctl reload`) must not stop it: nothing to reload here.
            ProcessLimits.onHangup { logger.info("SIGHUP: nothing to reload; running on") }
            say("rundelay: waiting for messages on \(DelayServer.channel), scheduled in \(delayKey) on \(first)")
            metricsEndpoint?.setReadiness { await MetricsEndpoint.layerAnswers(layer) }
            await runServices(
                [server], metrics: metricsEndpoint, grace: .seconds(30),
                logger: logger)
            await client.close()
            await layer.close()
        }
    }
#endif
