import ASGI
import ArgumentParser
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix

/// `stats --server`: one GET of a running runserver's `/admin/stats.json` over a plain HTTP/1.1
/// connection (the metrics port is loopback or token-guarded; no TLS there).
enum AdminClient {
    static func fetchSnapshot(server: String, token: String?, channels: [String]) async throws -> LayerSnapshot {
        guard let url = URL(string: server), url.scheme == "http", let host = url.host else {
            throw ValidationError("--server takes http://HOST:PORT (the runserver's --metrics-port), not \(server)")
        }
        var target = "/admin/stats.json"
        if !channels.isEmpty { target += "?channels=" + PercentCoding.encode(channels.joined(separator: ",")) }
        let (status, body) = try await get(host: host, port: url.port ?? 80, target: target, token: token)
        guard status == 200 else {
            let hint = status == 401 ? " (give --admin-token)" : status == 404 ? " (is it a runserver started with --admin?)" : ""
            throw ValidationError("\(server) answered \(status)\(hint): \(String(decoding: body.prefix(200), as: UTF8.self))")
        }
        return try LayerSnapshot.decoder.decode(AdminPage.Report.self, from: Data(body)).layer
    }

    static func get(host: String, port: Int, target: String, token: String?) async throws -> (Int, [UInt8]) {
        let collector = ResponseCollector()
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connectTimeout(.seconds(5))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(collector)
                }
            }
            .connect(host: host, port: port).get()
        var headers = HTTPHeaders([("host", "\(host):\(port)"), ("connection", "close")])
        if let token { headers.add(name: "authorization", value: "Bearer " + token) }
        channel.write(
            HTTPClientRequestPart.head(HTTPRequestHead(version: .http1_1, method: .GET, uri: target, headers: headers)), promise: nil)
        try await channel.writeAndFlush(HTTPClientRequestPart.end(nil)).get()
        let response = try await collector.response.futureResult.get()
        try? await channel.close()
        return response
    }
}

/// Gathers one response: its status and whole body.
private final class ResponseCollector: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPClientResponsePart

    // `status`, `body` and `done` are touched only on the channel's loop.
    private var status = 0
    private var body: [UInt8] = []
    private var done = false
    let response = MultiThreadedEventLoopGroup.singleton.next().makePromise(of: (Int, [UInt8]).self)

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head): status = Int(head.status.code)
        case .body(let buffer): body += buffer.readableBytesView
        case .end: finish(.success((status, body)))
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        finish(.failure(error))
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        finish(.failure(ChannelError.eof))
    }

    private func finish(_ result: Result<(Int, [UInt8]), any Error>) {
        guard !done else { return }
        done = true
        response.completeWith(result)
    }
}
