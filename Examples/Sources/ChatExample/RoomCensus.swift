import Channels
import Logging
import ServiceLifecycle

/// A background service of the application's own (it runs in `runserver`'s and `runworker`'s
/// service group): every minute it logs who is in the lobby, read from anywhere through the
/// process's default layer. It stops at the group's graceful shutdown.
struct RoomCensus: Service {
    let logger = Logger(label: "chat.census")

    func run() async throws {
        logger.info("room census started")
        defer { logger.info("room census stopped") }
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                do {
                    try await Task.sleep(for: .seconds(60))
                    let present = try await Presence("chat-lobby").list()
                    logger.info("lobby census", metadata: ["users": "\(present.count)"])
                } catch is CancellationError {
                    return
                } catch {
                    logger.warning("lobby census failed", metadata: ["error": "\(error)"])
                }
            }
        }
    }
}
