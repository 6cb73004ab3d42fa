import ASGI

/// A test client, the harness or the live server could not do what a test asked: no response
/// came, a streamed response stopped early, a socket was used before it connected.
public struct TestClientError: CodedError, Sendable {
    /// What went wrong.
    public enum Code: String, Sendable, Hashable, CustomStringConvertible {
        /// No response came within the client's timeout.
        case noResponse
        /// A streamed response stopped without its last chunk.
        case responseCut
        /// The test WebSocket was used before `connect`.
        case notConnected
        /// The harness is not set up for the call (`login` without a `UserAuthenticator`).
        case notSupported
        /// A message the harness sent could not be received back.
        case notReceived
        /// The live server did not get a port.
        case noPort

        /// The code's name.
        public var description: String { rawValue }
    }

    /// What went wrong.
    public var code: Code
    /// What happened, naming the request or channel.
    public var message: String

    /// An error of `code`.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }
}
