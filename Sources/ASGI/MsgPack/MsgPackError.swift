/// Why a byte string could not be decoded as msgpack.
public struct MsgPackError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What is wrong with the bytes.
    public struct Code: Sendable, Hashable, CustomStringConvertible {
        let name: String
        /// The code's name.
        public var description: String { name }

        /// The input ended inside a value.
        public static let truncated = Code(name: "truncated")
        /// A length field claims more bytes or elements than the input holds.
        public static let lengthExceedsInput = Code(name: "lengthExceedsInput")
        /// A str value is not valid UTF-8.
        public static let invalidUTF8 = Code(name: "invalidUTF8")
        /// Containers nested deeper than the decoder's limit.
        public static let nestingTooDeep = Code(name: "nestingTooDeep")
        /// The reserved byte 0xc1, or an extension type, which ASGI messages never hold.
        public static let unsupportedType = Code(name: "unsupportedType")
        /// A map key that is neither str nor UTF-8 bin.
        public static let invalidMapKey = Code(name: "invalidMapKey")
        /// A uint64 above Int64.max.
        public static let integerOverflow = Code(name: "integerOverflow")
        /// Bytes left after the top-level value.
        public static let trailingBytes = Code(name: "trailingBytes")
        /// The top-level value is not a map, so it is not a message.
        public static let notAMap = Code(name: "notAMap")
    }

    /// What is wrong.
    public var code: Code
    /// Offset in the input where the problem was found.
    public var offset: Int
    /// More detail, for logs.
    public var detail: String

    /// An error at byte `offset`.
    public init(_ code: Code, offset: Int, detail: String = "") {
        self.code = code
        self.offset = offset
        self.detail = detail
    }

    /// The code, the offset and the detail.
    public var description: String {
        "msgpack \(code) at byte \(offset)" + (detail.isEmpty ? "" : ": \(detail)")
    }
}
