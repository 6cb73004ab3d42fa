import ASGI

/// Helpers for HTTP consumers.
extension ConsumerContext {
    /// Answers an `http.request` with one response. A body larger than fits in one message of
    /// the layer goes out as a first message and `more_content` chunks, with `content-length`
    /// set so the client still gets a plain (not chunked) response.
    public func respond(status: Int = 200, contentType: String = "text/plain; charset=utf-8",
                        headers: [(String, String)] = [], body: [UInt8]) async throws {
        var list: [ASGIValue] = [[.utf8Bytes("content-type"), .utf8Bytes(contentType)]]
        for (name, value) in headers { list.append([.utf8Bytes(name.lowercased()), .utf8Bytes(value)]) }
        for cookie in responseCookies { list.append([.utf8Bytes("set-cookie"), .utf8Bytes(cookie)]) }
        let chunkSize = responseChunkSize
        guard body.count > chunkSize else {
            try await reply(["status": .int(Int64(status)), "headers": .array(list), "content": .bytes(body), "more_content": false])
            return
        }
        if !headers.contains(where: { $0.0.lowercased() == "content-length" }) {
            list.append([.utf8Bytes("content-length"), .utf8Bytes(String(body.count))])
        }
        try await reply(["status": .int(Int64(status)), "headers": .array(list),
                         "content": .bytes(Array(body[..<chunkSize])), "more_content": true])
        var offset = chunkSize
        while offset < body.count {
            let end = min(offset + chunkSize, body.count)
            try await reply(["content": .bytes(Array(body[offset..<end])), "more_content": .bool(end < body.count)])
            offset = end
        }
    }

    /// The most body bytes one response message carries: well inside the layer's size limit.
    var responseChunkSize: Int { max(16 * 1024, min(512 * 1024, layer.maxMessageSize / 2)) }

    public func respond(status: Int = 200, contentType: String = "text/plain; charset=utf-8",
                        headers: [(String, String)] = [], _ text: String) async throws {
        try await respond(status: status, contentType: contentType, headers: headers, body: Array(text.utf8))
    }

    /// Accepts a WebSocket connection.
    public func accept() async throws { try await reply(["accept": true]) }

    /// Sends a text frame on this WebSocket.
    public func sendText(_ text: String) async throws { try await reply(["text": .string(text)]) }
}

extension ConsumerContext {
    /// The whole request body: `body`, then the chunks on `body_channel` when the server split a
    /// large upload. Waits at most `timeout` for each chunk.
    public func requestBody(timeout: Duration = .seconds(30)) async throws -> [UInt8] {
        var body = (try? message.bytes("body")) ?? []
        guard let bodyChannel = message["body_channel"]?.stringValue else { return body }
        while true {
            guard let chunk = try await layer.receive(channels: [bodyChannel], timeout: timeout) else {
                throw ChannelLayerError(.connectionLost, "request body chunk on '\(bodyChannel)' did not arrive")
            }
            body += (try? chunk.message.bytes("content")) ?? []
            if (try? chunk.message.bool("closed", default: false)) == true {
                throw ChannelLayerError(.connectionLost, "the client went away during the upload")
            }
            if (try? chunk.message.bool("more_content", default: false)) != true { return body }
        }
    }

    /// Starts a streamed response; send the rest with `respondChunk`.
    public func respondStart(status: Int = 200, contentType: String = "text/plain; charset=utf-8", firstChunk: [UInt8] = []) async throws {
        var list: [ASGIValue] = [[.utf8Bytes("content-type"), .utf8Bytes(contentType)]]
        for cookie in responseCookies { list.append([.utf8Bytes("set-cookie"), .utf8Bytes(cookie)]) }
        try await reply(["status": .int(Int64(status)),
                         "headers": .array(list),
                         "content": .bytes(firstChunk), "more_content": true], immediately: true)
    }

    /// One more chunk of a streamed response, sent now (server-sent events arrive as they
    /// are made); `last: true` ends it.
    public func respondChunk(_ chunk: [UInt8], last: Bool = false) async throws {
        try await reply(["content": .bytes(chunk), "more_content": .bool(!last)], immediately: true)
    }
}
