import ASGI
import Synchronization

/// Helpers for HTTP consumers.
extension ConsumerContext {
    /// Answers an `http.request` with one response. A body larger than fits in one message of
    /// the layer goes out as a first message and `more_content` chunks, with `content-length`
    /// set so the client still gets a plain (not chunked) response.
    public func respond(
        status: Int = 200, contentType: String = "text/plain; charset=utf-8",
        headers: [(String, String)] = [], body: [UInt8]
    ) async throws {
        var list = responseHeaders(contentType: contentType)
        for (name, value) in headers { list.add(name: name, value: value) }
        list = withCookies(list)
        let chunkSize = responseChunkSize
        guard body.count > chunkSize else {
            try await reply(HTTPResponseStart(status: status, headers: list, content: body))
            return
        }
        if !list.contains("content-length") { list.add(name: "content-length", value: String(body.count)) }
        // Sent as they go, each within the server's credit: a client that reads slowly holds
        // this consumer, not megabytes in the layer and the server.
        let disconnectChannel = await disconnectChannelForStream()
        try await reserveResponseBytes(chunkSize)
        try await reply(
            HTTPResponseStart(
                status: status, headers: list, content: Array(body[..<chunkSize]), moreContent: true,
                disconnectChannel: disconnectChannel, takesCredit: takesResponseCredit),
            immediately: true)
        responseOpen.store(true, ordering: .relaxed)
        var offset = chunkSize
        while offset < body.count {
            let end = min(offset + chunkSize, body.count)
            try await reserveResponseBytes(end - offset)
            try await reply(HTTPResponseChunk(content: Array(body[offset..<end]), moreContent: end < body.count), immediately: true)
            offset = end
        }
        responseOpen.store(false, ordering: .relaxed)
    }

    /// The most body bytes one response message carries: well inside the layer's size limit
    /// (512 KiB with the default 1 MiB). A consumer that makes a large body as it streams it
    /// (`respondStart`, `respondChunk`) sends chunks of this size.
    public var responseChunkSize: Int { max(16 * 1024, min(512 * 1024, layer.maxMessageSize / 2)) }

    /// Sends a whole HTTP response to the message's reply channel.
    public func respond(
        status: Int = 200, contentType: String = "text/plain; charset=utf-8",
        headers: [(String, String)] = [], _ text: String
    ) async throws {
        try await respond(status: status, contentType: contentType, headers: headers, body: Array(text.utf8))
    }

    /// Accepts a WebSocket connection.
    public func accept() async throws { try await reply(WebSocketSendMessage.accept) }

    /// Accepts the WebSocket with a first text frame, written before anything else the socket
    /// is sent (what the server writes for `follow` and presence comes after it).
    public func accept(text: String) async throws { try await reply(WebSocketSendMessage(accept: true, data: .text(text))) }

    /// Sends a text frame on this WebSocket.
    public func sendText(_ text: String) async throws { try await reply(WebSocketSendMessage.text(text)) }

    /// `content-type` first, as every response of the helpers starts.
    private func responseHeaders(contentType: String) -> ASGIHeaders { [("content-type", contentType)] }

    /// `headers` plus a `set-cookie` for each cookie the session wrappers set.
    private func withCookies(_ headers: ASGIHeaders) -> ASGIHeaders {
        var headers = headers
        for cookie in responseCookies { headers.add(name: "set-cookie", value: cookie) }
        return headers
    }
}

extension ConsumerContext {
    /// The whole request body: `body`, then the chunks on `body_channel` when the server split a
    /// large upload. Waits at most `timeout` for each chunk.
    public func requestBody(timeout: Duration = .seconds(30)) async throws -> [UInt8] {
        let request = try HTTPRequestMessage(message)
        var body = request.body
        guard let bodyChannel = request.bodyChannel else { return body }
        let lease = slot.withLock { $0 }
        while true {
            // A chunk not there yet is waited for with the worker's slot lent out: a client
            // that uploads slowly holds none.
            var next = lease == nil ? nil : try await layer.receive(channels: [bodyChannel], timeout: .zero)
            if next == nil {
                if let lease {
                    next = try await lease.lent { try await layer.receive(channels: [bodyChannel], timeout: timeout) }
                } else {
                    next = try await layer.receive(channels: [bodyChannel], timeout: timeout)
                }
            }
            guard let received = next else {
                throw RequestBodyError(.chunkMissing, "request body chunk on '\(bodyChannel)' did not arrive")
            }
            let chunk = try HTTPBodyChunk(received.message)
            body += chunk.content
            if chunk.closed {
                throw RequestBodyError(.clientLeft, "the client went away during the upload to '\(bodyChannel)'")
            }
            if !chunk.moreContent { return body }
        }
    }

    /// Starts a streamed response; send the rest with `respondChunk`. Under a worker, a client
    /// that leaves cancels the consumer (its next `respondChunk` or `Task.sleep` throws
    /// `CancellationError`), so a stream stops with its reader. With a `content-length` among
    /// `headers` the client gets a plain response of that length (a large body made as it is
    /// sent, never held whole); without one, a chunked one.
    public func respondStart(
        status: Int = 200, contentType: String = "text/plain; charset=utf-8", headers: [(String, String)] = [],
        firstChunk: [UInt8] = []
    ) async throws {
        let disconnectChannel = await disconnectChannelForStream()
        try await reserveResponseBytes(firstChunk.count)
        var list = responseHeaders(contentType: contentType)
        for (name, value) in headers { list.add(name: name, value: value) }
        try await reply(
            HTTPResponseStart(
                status: status, headers: withCookies(list),
                content: firstChunk, moreContent: true, disconnectChannel: disconnectChannel,
                takesCredit: takesResponseCredit),
            immediately: true)
        responseOpen.store(true, ordering: .relaxed)
    }

    /// One more chunk of a streamed response, sent now (server-sent events arrive as they
    /// are made); `last: true` ends it. When the client reads slower than chunks are made, this
    /// waits (the server's `response_credit`) until the client has taken enough of what was sent.
    public func respondChunk(_ chunk: [UInt8], last: Bool = false) async throws {
        try await reserveResponseBytes(chunk.count)
        try await reply(HTTPResponseChunk(content: chunk, moreContent: !last), immediately: true)
        if last { responseOpen.store(false, ordering: .relaxed) }
    }
}
