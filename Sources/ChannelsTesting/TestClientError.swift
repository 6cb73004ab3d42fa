/// A test client, the harness or the live server could not do what a test asked: no response
/// came, a streamed response stopped early, a socket was used before it connected.
public struct TestClientError: Error, Sendable, CustomStringConvertible {
    /// What went wrong; compare with the static codes.
    public struct Code: Sendable, Hashable, CustomStringConvertible {
        let name: String
        /// The code's name.
        public var description: String { name }

        /// No response came within the client's timeout.
        public static let noResponse = Code(name: "noResponse")
        /// A streamed response stopped without its last chunk.
        public static let responseCut = Code(name: "responseCut")
        /// The test WebSocket was used before `connect`.
        public static let notConnected = Code(name: "notConnected")
        /// The harness is not set up for the call (`login` without a `UserAuthenticator`).
        public static let notSupported = Code(name: "notSupported")
        /// A message the harness sent could not be received back.
        public static let notReceived = Code(name: "notReceived")
        /// The live server did not get a port.
        public static let noPort = Code(name: "noPort")
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

    /// The code and the message.
    public var description: String { "\(code): \(message)" }
}
