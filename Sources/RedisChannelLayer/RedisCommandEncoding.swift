import ASGI
import NIOCore

/// One argument of a Redis command, kept in the form the caller has it (bytes, a string, a
/// number, a key as prefix + name) and written as a RESP bulk string straight into the
/// buffer that goes to the socket: a command costs one buffer, not an array per argument.
///
/// Every command of the package is spelled with it: `["SCAN", .text(cursor), "COUNT", 1000]`
/// (string and integer literals are arguments).
public enum RedisArgument: Sendable, Hashable, ExpressibleByStringLiteral, ExpressibleByIntegerLiteral {
    /// Bytes as they are.
    case bytes([UInt8])
    /// A string's UTF-8.
    case text(String)
    /// A number in decimal.
    case integer(Int)
    /// A key written from its parts back to back (prefix, name and an optional suffix such as
    /// `:messages_count`), without joining them into a string first.
    case key(String, String, String = "")
    /// `prefix` + 32 lowercase hex characters of a fresh random version-4 UUID, as Python's
    /// `uuid4().hex` writes it: a message body's key.
    case uuidKey(prefix: String)

    /// A literal command name or option: `"SCAN"`.
    public init(stringLiteral value: String) { self = .text(value) }
    /// A literal number: `1000`.
    public init(integerLiteral value: Int) { self = .integer(value) }

    /// The argument's length in bytes.
    var count: Int {
        switch self {
        case .bytes(let b): b.count
        case .text(let s): s.utf8.count
        case .integer(let n): RedisCommandEncoding.decimalLength(n)
        case .key(let a, let b, let c): a.utf8.count + b.utf8.count + c.utf8.count
        case .uuidKey(let prefix): prefix.utf8.count + 32
        }
    }
}

/// Writing commands as RESP arrays of bulk strings.
enum RedisCommandEncoding {
    /// A buffer holding `commands` encoded, sized for them.
    static func encode(_ commands: [[RedisArgument]]) -> ByteBuffer {
        var buffer = ByteBufferAllocator().buffer(capacity: commands.reduce(0) { $0 + size($1) })
        for args in commands { write(args, into: &buffer) }
        return buffer
    }

    /// A buffer holding one command.
    static func encode(_ args: [RedisArgument]) -> ByteBuffer {
        var buffer = ByteBufferAllocator().buffer(capacity: size(args))
        write(args, into: &buffer)
        return buffer
    }

    /// The bytes `args` take encoded, give or take a few.
    static func size(_ args: [RedisArgument]) -> Int {
        var size = 16
        for arg in args { size += arg.count + 16 }
        return size
    }

    static func write(_ args: [RedisArgument], into buffer: inout ByteBuffer) {
        writeHeader(args.count, into: &buffer)
        for arg in args { write(arg, into: &buffer) }
    }

    /// `*count\r\n`: a command of `count` arguments follows.
    static func writeHeader(_ count: Int, into buffer: inout ByteBuffer) {
        buffer.writeInteger(UInt8(ascii: "*"))
        writeDecimal(count, into: &buffer)
        buffer.writeStaticString("\r\n")
    }

    static func writeBulk(_ bytes: [UInt8], into buffer: inout ByteBuffer) {
        writeLength(bytes.count, into: &buffer)
        buffer.writeBytes(bytes)
        buffer.writeStaticString("\r\n")
    }

    static func write(_ arg: RedisArgument, into buffer: inout ByteBuffer) {
        switch arg {
        case .bytes(let b):
            writeBulk(b, into: &buffer)
            return
        case .text(let s):
            writeLength(s.utf8.count, into: &buffer)
            buffer.writeString(s)
        case .integer(let n):
            writeLength(decimalLength(n), into: &buffer)
            writeDecimal(n, into: &buffer)
        case .key(let a, let b, let c):
            writeLength(a.utf8.count + b.utf8.count + c.utf8.count, into: &buffer)
            buffer.writeString(a)
            buffer.writeString(b)
            if !c.isEmpty { buffer.writeString(c) }
        case .uuidKey(let prefix):
            writeLength(prefix.utf8.count + 32, into: &buffer)
            buffer.writeString(prefix)
            let (high, low) = RandomToken.uuid4()
            buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: 32) { out in
                for i in 0..<16 {
                    out[i] = Hex.lowercaseDigits[Int((high >> (UInt64(15 - i) * 4)) & 0xf)]
                    out[16 + i] = Hex.lowercaseDigits[Int((low >> (UInt64(15 - i) * 4)) & 0xf)]
                }
                return 32
            }
        }
        buffer.writeStaticString("\r\n")
    }

    private static func writeLength(_ count: Int, into buffer: inout ByteBuffer) {
        buffer.writeInteger(UInt8(ascii: "$"))
        writeDecimal(count, into: &buffer)
        buffer.writeStaticString("\r\n")
    }

    /// `value` in decimal ASCII, without allocating.
    static func writeDecimal(_ value: Int, into buffer: inout ByteBuffer) {
        if value >= 0 && value < 10 {
            buffer.writeInteger(UInt8(ascii: "0") + UInt8(value))
            return
        }
        let length = decimalLength(value)
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { out in
            var rest = value.magnitude
            var index = length - 1
            repeat {
                out[index] = UInt8(ascii: "0") + UInt8(rest % 10)
                rest /= 10
                index -= 1
            } while rest > 0
            if value < 0 { out[0] = UInt8(ascii: "-") }
            return length
        }
    }

    static func decimalLength(_ value: Int) -> Int {
        var length = value < 0 ? 2 : 1
        var rest = value.magnitude
        while rest >= 10 {
            rest /= 10
            length += 1
        }
        return length
    }
}
