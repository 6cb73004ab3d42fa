import ASGI
import Channels
import Foundation
import InterfaceServer
import NIOCore
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// A streamed request body whose chunks its channel refused as full for the whole bound: the
/// client gets 503, and the consumer that took the request and reads
/// the body hears the client is gone (a closed chunk) instead of waiting for chunks that will not
/// come. Found by a red-team run: the application was never told.
@Suite("a streamed body given up (real sockets)", .timeLimit(.minutes(2)))
struct StreamedBodyGiveUpTests {
    @Test func theConsumerReadingTheBodyHearsItWasGivenUp() async throws {
        let layer = InMemoryChannelLayer(configuration: .init(channelCapacities: [("http.request.body?*", 1)]))
        let (server, port) = try await GiveUpFixtures.server(on: layer) {
            $0.channelFullTimeout = .seconds(1)
            $0.bodyChunkSize = 4096
        }

        // A 64 KB upload, written whole; the application takes the request, not the body.
        let response = Task {
            try await offThePool { () -> String in
                let descriptor = try GiveUpFixtures.loopbackSocket(port: port)
                defer { Glibc.close(descriptor) }
                let body = [UInt8](repeating: 0x61, count: 65536)
                let head = "POST /upload/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: \(body.count)\r\n\r\n"
                let bytes = Array(head.utf8) + body
                _ = bytes.withUnsafeBytes { Glibc.send(descriptor, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                var answer: [UInt8] = []
                var chunk = [UInt8](repeating: 0, count: 4096)
                // The response's head and its short body (the connection stays open).
                while !String(decoding: answer, as: UTF8.self).contains("try again") {
                    let count = chunk.withUnsafeMutableBytes { recv(descriptor, $0.baseAddress, $0.count, 0) }
                    if count <= 0 { break }
                    answer += chunk[0..<count]
                }
                return String(decoding: answer, as: UTF8.self)
            }
        }
        let deadline = ContinuousClock.now + .seconds(40)
        var request: Message?
        while request == nil, ContinuousClock.now < deadline {
            request = try await layer.receive(channels: [ASGIChannel.httpRequest], timeout: .milliseconds(100))?.message
        }
        let bodyChannel = try #require(request?["body_channel"]?.stringValue, "the request streams its body")
        let answer = try await response.value
        #expect(answer.hasPrefix("HTTP/1.1 503"), "the client is told: \(answer.prefix(80))")

        // The consumer reads the body now: what got in, then the closed chunk, then nothing.
        var chunks: [Message] = []
        while chunks.last?["closed"]?.boolValue != true, ContinuousClock.now < deadline {
            if let chunk = try await layer.receive(channels: [bodyChannel], timeout: .milliseconds(100)) {
                chunks.append(chunk.message)
            }
        }
        #expect(
            chunks.last?["closed"]?.boolValue == true,
            "the consumer hears the body was given up: \(chunks.count) chunks, \(server.statistics)")
        #expect(chunks.dropLast().allSatisfy { $0["more_content"]?.boolValue == true && $0["closed"]?.boolValue != true })
        #expect(server.statistics.httpUnavailable == 1)
        await server.shutdown()
    }
}
