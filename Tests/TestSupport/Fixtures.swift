import ASGI

/// Hex helpers for recorded vectors.
public func hex(_ bytes: [UInt8]) -> String { bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined() }
public func unhex(_ text: String) -> [UInt8] {
    var out: [UInt8] = []
    var chars = Array(text.utf8)[...]
    while chars.count >= 2 {
        out.append(UInt8(String(decoding: chars.prefix(2), as: UTF8.self), radix: 16)!)
        chars = chars.dropFirst(2)
    }
    return out
}

/// The messages the Python peer calls "nested", "small" and "response" (shared by the
/// msgpack vectors and the Redis layout tests).
public enum Cases {
    public static let nested: Message = [
        "text": "café £",
        "raw": .bytes([0xc2, 0xa3, 0x01, 0x00, 0x03, 0x21]),
        "pound": "\u{a3}",
        "count": 300,
        "negative": -40,
        "big": .int(1 << 40),
        "ratio": 1.5,
        "yes": true,
        "nothing": nil,
        "list": [.utf8Bytes("bytes"), "str", [1, "two", .utf8Bytes("three")]],
        "headers": [
            [.utf8Bytes("host"), .utf8Bytes("example.com")],
            [.utf8Bytes("x-dup"), .utf8Bytes("1")],
            [.utf8Bytes("x-dup"), .utf8Bytes("2")],
        ],
        "map": ["inner": .bytes([0x00, 0xff]), "deeper": ["s": "x"]],
    ]
    public static let small: Message = ["text": "hello"]
    public static let response: Message = ["status": 200, "headers": [], "content": .utf8Bytes("hi"), "more_content": false]
}
