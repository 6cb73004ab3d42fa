import ASGI
import Logging

/// Cuts the streamed responses whose worker died (`ResponseStreamLeases`): a worker holds a
/// lease for each response it streams, in this server's pool, and renews it while the response
/// runs. Every `streamLeaseSweep` the keeper claims the leases of the pool that lapsed and sends
/// each one's reply channel an `HTTPResponseChunk` with `worker_lost`, through the layer, so it
/// arrives after the chunks the worker sent before it stopped; the connection then cuts the
/// response (503 when none had started), counted as `channels_connection_limits_total{limit="worker_lost"}`.
/// A reply channel whose request is already over finds nobody (counted as unroutable).
struct StreamLeaseKeeper {
    let server: ServerContext

    /// Leases claimed in one look, at most (more are claimed in the next).
    static let claimBatch = 256
    /// A claim that takes longer than this found the layer stalled: what it claimed gets
    /// `stallGrace` instead of a cut.
    static let stallBound: Duration = .seconds(1)
    static let stallGrace: Duration = .seconds(30)

    func run() async {
        let interval = server.configuration.streamLeaseSweep
        guard interval > .zero, let leases = server.layer.leases else { return }
        let processChannel = server.router.processChannel
        let pool = ResponseStreamLeases.pool(processChannel: processChannel)
        var failures = 0
        while !Task.isCancelled {
            guard (try? await Task.sleep(for: interval)) != nil else { return }
            do {
                // Claimed for a minute: released below once handled; one whose release fails
                // lapses again and is cut again (a reply nobody reads), never left behind.
                let started = ContinuousClock.now
                let claimed = try await leases.claimLapsedLeases(in: pool, max: Self.claimBatch, for: .seconds(60))
                failures = 0
                if ContinuousClock.now - started > Self.stallBound, !claimed.isEmpty {
                    // The layer stood still (a stalled Redis shard): every lease may have lapsed
                    // meanwhile, with its worker's renewal queued behind this claim. Given back
                    // for a grace, not cut (a red team saw 40 of 60 live streams cut, whichever
                    // claim came first); a dead worker's lapses again and is cut then.
                    server.logger.warning(
                        "the look for streams whose worker stopped took long; giving their leases a grace",
                        metadata: ["leases": "\(claimed.count)"])
                    for lease in claimed {
                        try? await leases.holdLease(lease.name, in: pool, note: lease.note, for: Self.stallGrace)
                    }
                    continue
                }
                for lease in claimed {
                    await cut(lease, pool: pool, processChannel: processChannel, leases: leases)
                }
            } catch {
                failures += 1
                if failures == 1 || failures % 30 == 0 {
                    server.logger.warning(
                        "could not look for streamed responses whose worker stopped",
                        metadata: ["error": "\(error)", "failures": "\(failures)"])
                }
            }
        }
    }

    private func cut(_ lease: ChannelLayerLease, pool: String, processChannel: String, leases: any ChannelLayerLeases) async {
        let replyChannel = lease.note
        // Only this server's reply channels (the pool is named after it; anything else is not ours to cut).
        if replyChannel.hasPrefix(processChannel), replyChannel.count > processChannel.count {
            server.logger.warning(
                "a worker stopped renewing the lease of a response it streamed; cutting it",
                metadata: ["reply_channel": "\(replyChannel)", "disconnect_channel": "\(lease.name)"])
            do {
                try await server.layer.send(
                    HTTPResponseChunk(content: [], moreContent: false, workerLost: true).message, to: replyChannel)
            } catch {
                // Left claimed: it lapses again in a minute and is tried again.
                server.logger.warning("could not cut a response whose worker stopped", metadata: ["error": "\(error)"])
                return
            }
        }
        try? await leases.releaseLease(lease.name, in: pool, ifNote: lease.note)
    }
}
