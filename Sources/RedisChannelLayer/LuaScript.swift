import ASGI
import Synchronization

/// A Lua script run with `EVALSHA`, falling back to `EVAL` when the server does not know it
/// (a restarted or flushed server), so every call stays one round trip.
public final class LuaScript: Sendable {
    let name: String
    let source: String
    fileprivate let sha = Mutex<String?>(nil)

    /// A script called `name` in errors and logs, with its Lua source.
    public init(name: String, source: String) {
        self.name = name
        self.source = source
    }

    var knownSHA: String? { sha.withLock { $0 } }
}

extension LuaScript {
    /// One call on a (shared) connection: `EVALSHA` once the SHA is known, `EVAL` when the
    /// server answers NOSCRIPT, and `SCRIPT LOAD` + `EVAL` pipelined the first time.
    func run(on connection: RedisConnection, keys: [[UInt8]], args: [[UInt8]]) async throws(ChannelLayerError) -> RedisReply {
        var tail: [[UInt8]] = [Array(String(keys.count).utf8)]
        tail.reserveCapacity(1 + keys.count + args.count)
        tail += keys
        tail += args
        if let known = knownSHA {
            let reply = try await connection.command([Self.evalsha, Array(known.utf8)] + tail)
            if case .error(let e) = reply, e.hasPrefix("NOSCRIPT") {
                return try await connection.command([Self.eval, Array(source.utf8)] + tail)
            }
            return reply
        }
        let replies = try await connection.pipeline([
            [Array("SCRIPT".utf8), Array("LOAD".utf8), Array(source.utf8)],
            [Self.eval, Array(source.utf8)] + tail,
        ])
        if let loaded = replies[0].text { sha.withLock { $0 = loaded } }
        return replies[1]
    }

    private static let evalsha = Array("EVALSHA".utf8)
    private static let eval = Array("EVAL".utf8)
}

enum ASGIScriptError: Error, CustomStringConvertible {
    case loadFailed(String, String)
    var description: String {
        switch self {
        case .loadFailed(let name, let reply): "Redis did not load the script \(name): \(reply)"
        }
    }
}
