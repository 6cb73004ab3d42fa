/// An error that names its kind with a code (to switch over) and says what happened in a message
/// (for logs); its description is both. The framework's errors, one per domain, adopt it.
public protocol CodedError: Error, CustomStringConvertible {
    associatedtype Code: CustomStringConvertible
    /// What kind of failure.
    var code: Code { get }
    /// What happened, naming what it happened to.
    var message: String { get }
}

extension CodedError {
    /// The code and the message.
    public var description: String { "\(code): \(message)" }
}
