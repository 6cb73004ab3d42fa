import CHiredis

/// A Redis reply copied out of hiredis into a Swift value.
public enum RedisReply: Sendable, Hashable {
    case string([UInt8])
    case status(String)
    case integer(Int64)
    case array([RedisReply])
    case null
    case error(String)

    /// The bytes of a bulk string reply.
    public var bytes: [UInt8]? { if case .string(let b) = self { b } else { nil } }
    /// The value of an integer reply.
    public var integer: Int64? { if case .integer(let i) = self { i } else { nil } }
    /// The elements of an array reply.
    public var array: [RedisReply]? { if case .array(let a) = self { a } else { nil } }
    /// The message of an error reply.
    public var errorMessage: String? { if case .error(let e) = self { e } else { nil } }

    /// A bulk string or status reply as text.
    public var text: String? {
        switch self {
        case .string(let b): String(decoding: b, as: UTF8.self)
        case .status(let s): s
        default: nil
        }
    }

    /// An integer reply, or a bulk string holding digits (as `GET` of a counter returns).
    var countValue: Int {
        switch self {
        case .integer(let i): Int(i)
        case .string(let b): Int(String(decoding: b, as: UTF8.self)) ?? 0
        default: 0
        }
    }
}

extension RedisReply {
    /// A copy of a reply hiredis's reader built.
    init(_ reply: UnsafeMutablePointer<redisReply>) {
        let r = reply.pointee
        switch r.type {
        case REDIS_REPLY_STRING:
            self = .string(r.str.map { Array(UnsafeRawBufferPointer(start: $0, count: r.len)) } ?? [])
        case REDIS_REPLY_STATUS:
            self = .status(r.str.map { String(decoding: UnsafeRawBufferPointer(start: $0, count: r.len), as: UTF8.self) } ?? "")
        case REDIS_REPLY_ERROR:
            self = .error(r.str.map { String(decoding: UnsafeRawBufferPointer(start: $0, count: r.len), as: UTF8.self) } ?? "")
        case REDIS_REPLY_INTEGER:
            self = .integer(Int64(r.integer))
        case REDIS_REPLY_ARRAY:
            var elements: [RedisReply] = []
            elements.reserveCapacity(r.elements)
            for i in 0..<r.elements {
                if let element = r.element[i] { elements.append(RedisReply(element)) } else { elements.append(.null) }
            }
            self = .array(elements)
        default:
            self = .null
        }
    }
}
