import ASGI
import Logging
import NIOCore
import Synchronization

/// What every connection of one server shares.
final class ServerContext: Sendable {
    let layer: any ChannelLayer
    let router: ReplyRouter
    let configuration: ServerConfiguration
    let logger: Logger
    let accessLog: AccessLog?
    private let openSockets = Mutex<[ObjectIdentifier: @Sendable (UInt16) -> Void]>([:])
    let shuttingDown = Atomic<Bool>(false)

    init(layer: any ChannelLayer, router: ReplyRouter, configuration: ServerConfiguration, logger: Logger, accessLog: AccessLog?) {
        self.layer = layer
        self.router = router
        self.configuration = configuration
        self.logger = logger
        self.accessLog = accessLog
    }

    /// Sends to the layer from an event loop without blocking it; `completion` runs on `loop`.
    /// Sends passed the same `after` task go out in the order they were made: pass the task
    /// this returns to the next send of the same connection.
    @discardableResult
    func send(_ message: Message, to channel: String, on loop: any EventLoop, after previous: Task<Void, Never>? = nil,
              completion: @escaping @Sendable (Result<Void, any Error>) -> Void) -> Task<Void, Never> {
        let layer = self.layer
        return Task {
            await previous?.value
            let result: Result<Void, any Error>
            do {
                try await layer.send(message, to: channel)
                result = .success(())
            } catch {
                result = .failure(error)
            }
            loop.execute { completion(result) }
        }
    }

    func trackSocket(_ id: ObjectIdentifier, closer: @escaping @Sendable (UInt16) -> Void) {
        openSockets.withLock { $0[id] = closer }
    }

    func untrackSocket(_ id: ObjectIdentifier) {
        _ = openSockets.withLock { $0.removeValue(forKey: id) }
    }

    /// Closes every open WebSocket with `code` (1001 on shutdown).
    func closeAllSockets(code: UInt16) {
        let closers = openSockets.withLock { Array($0.values) }
        for closer in closers { closer(code) }
    }

    var openSocketCount: Int { openSockets.withLock { $0.count } }
}

/// One line per HTTP request and WebSocket event, to a file or standard output.
final class AccessLog: Sendable {
    private let write: @Sendable (String) -> Void

    init(path: String) {
        if path == "-" {
            write = { line in print(line) }
        } else {
            let handle = Mutex<UnsafeMutablePointer<FILE>?>(fopen(path, "a"))
            write = { line in
                handle.withLock { file in
                    guard let file else { return }
                    fputs(line + "\n", file)
                    fflush(file)
                }
            }
        }
    }

    func http(client: String, method: String, path: String, status: Int, size: Int, seconds: Double) {
        write("\(client) - - \"\(method) \(path)\" \(status) \(size) \(String(format: "%.3f", seconds))s")
    }

    func websocket(client: String, event: String, path: String, detail: String = "") {
        write("\(client) - - \"WS\(event) \(path)\"" + (detail.isEmpty ? "" : " \(detail)"))
    }
}

#if canImport(Glibc)
import Glibc
#endif
import Foundation
