import ASGI

/// Helpers for HTTP consumers.
extension ConsumerContext {
    /// Answers an `http.request` with one response.
    public func respond(status: Int = 200, contentType: String = "text/plain; charset=utf-8",
                        headers: [(String, String)] = [], body: [UInt8]) async throws {
        var list: [ASGIValue] = [[.utf8Bytes("content-type"), .utf8Bytes(contentType)]]
        for (name, value) in headers { list.append([.utf8Bytes(name.lowercased()), .utf8Bytes(value)]) }
        try await reply(["status": .int(Int64(status)), "headers": .array(list), "content": .bytes(body), "more_content": false])
    }

    public func respond(status: Int = 200, contentType: String = "text/plain; charset=utf-8",
                        headers: [(String, String)] = [], _ text: String) async throws {
        try await respond(status: status, contentType: contentType, headers: headers, body: Array(text.utf8))
    }

    /// Accepts a WebSocket connection.
    public func accept() async throws { try await reply(["accept": true]) }

    /// Sends a text frame on this WebSocket.
    public func sendText(_ text: String) async throws { try await reply(["text": .string(text)]) }
}
