import NIOCore
import NIOEmbedded
import NIOWebSocket
import Testing

@testable import InterfaceServer

/// The frames a reply batch encodes once for every member: byte for byte what swift-nio's
/// frame encoder writes, at every length encoding, and shared while the text stays the same.
@Suite("reply batch frames")
struct ReplyPayloadsTests {
    /// What `WebSocketFrameEncoder` writes for a final, unmasked text frame of `text`.
    func encodedByNIO(_ text: String) throws -> [UInt8] {
        let channel = EmbeddedChannel(handler: WebSocketFrameEncoder())
        defer { _ = try? channel.finish() }
        let frame = WebSocketFrame(fin: true, opcode: .text, data: channel.allocator.buffer(string: text))
        try channel.writeAndFlush(frame).wait()
        var bytes: [UInt8] = []
        while var part = try channel.readOutbound(as: ByteBuffer.self) {
            bytes += part.readBytes(length: part.readableBytes) ?? []
        }
        return bytes
    }

    @Test("each length encoding matches swift-nio's encoder", arguments: [0, 1, 125, 126, 127, 65_535, 65_536, 200_000])
    func lengths(_ length: Int) throws {
        let text = String(repeating: "é", count: length / 2) + String(repeating: "x", count: length % 2)
        var ours = ReplyPayloads.encodeTextFrame(text, allocator: ByteBufferAllocator())
        #expect(ours.readBytes(length: ours.readableBytes) == (try encodedByNIO(text)))
    }

    @Test("the same text is encoded once; another text gets its own frame")
    func sharedWhileTheTextStaysTheSame() {
        let payloads = ReplyPayloads()
        let allocator = ByteBufferAllocator()
        let text = "a group message for every member"
        let first = payloads.textFrame(text, allocator: allocator)
        let again = payloads.textFrame(String(text), allocator: allocator)
        // One storage: the second member's frame is the first's buffer, not a copy.
        first.withUnsafeReadableBytes { a in
            again.withUnsafeReadableBytes { b in #expect(a.baseAddress == b.baseAddress) }
        }
        let other = payloads.textFrame("another message", allocator: allocator)
        #expect(other != first)
        #expect(other.getString(at: 2, length: other.readableBytes - 2) == "another message")
    }
}
