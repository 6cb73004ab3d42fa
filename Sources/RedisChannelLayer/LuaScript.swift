import ASGI
import NIOCore
import Synchronization

/// A Lua script run with `EVALSHA`, falling back to `EVAL` when the server does not know it
/// (a restarted or flushed server), so every call stays one round trip.
public final class LuaScript: Sendable {
    let name: String
    let source: String
    fileprivate let sha = Mutex<[UInt8]?>(nil)

    /// A script called `name` in errors and logs, with its Lua source.
    public init(name: String, source: String) {
        self.name = name
        self.source = source
    }

    var knownSHA: [UInt8]? { sha.withLock { $0 } }
}

extension LuaScript {
    /// One call on a (shared) connection: `EVALSHA` once the SHA is known, `EVAL` when the
    /// server answers NOSCRIPT, and `SCRIPT LOAD` + `EVAL` pipelined the first time. The keys
    /// and arguments are written straight into the request.
    func run(on connection: RedisConnection, keys: [RedisArgument], args: [RedisArgument]) async throws(ChannelLayerError) -> RedisReply {
        if let known = knownSHA {
            let reply = try await connection.send(encode(.bytes(Self.evalsha), .bytes(known), keys, args), commands: 1)[0]
            if case .error(let e) = reply, e.hasPrefix("NOSCRIPT") {
                return try await connection.send(encode(.bytes(Self.eval), .text(source), keys, args), commands: 1)[0]
            }
            return reply
        }
        let load: [RedisArgument] = [.text("SCRIPT"), .text("LOAD"), .text(source)]
        var both = encode(.bytes(Self.eval), .text(source), keys, args)
        var request = ByteBufferAllocator().buffer(capacity: RedisCommandEncoding.size(load) + both.readableBytes)
        RedisCommandEncoding.write(load, into: &request)
        request.writeBuffer(&both)
        let replies = try await connection.send(request, commands: 2)
        if let loaded = replies[0].bytes { sha.withLock { $0 = loaded } }
        return replies[1]
    }

    /// One call as RESP, to be pipelined behind another command: `EVALSHA` once the SHA is
    /// known, else `EVAL` with the source.
    func encodedCall(keys: [RedisArgument], args: [RedisArgument]) -> ByteBuffer {
        if let known = knownSHA { return encode(.bytes(Self.evalsha), .bytes(known), keys, args) }
        return encode(.bytes(Self.eval), .text(source), keys, args)
    }

    /// `command script numkeys keys... args...`
    private func encode(_ command: RedisArgument, _ script: RedisArgument, _ keys: [RedisArgument], _ args: [RedisArgument]) -> ByteBuffer {
        var size = script.count + 64
        for arg in keys { size += arg.count + 16 }
        for arg in args { size += arg.count + 16 }
        var buffer = ByteBufferAllocator().buffer(capacity: size)
        RedisCommandEncoding.writeHeader(3 + keys.count + args.count, into: &buffer)
        RedisCommandEncoding.write(command, into: &buffer)
        RedisCommandEncoding.write(script, into: &buffer)
        RedisCommandEncoding.write(.integer(keys.count), into: &buffer)
        for key in keys { RedisCommandEncoding.write(key, into: &buffer) }
        for arg in args { RedisCommandEncoding.write(arg, into: &buffer) }
        return buffer
    }

    private static let evalsha = Array("EVALSHA".utf8)
    private static let eval = Array("EVAL".utf8)
}
