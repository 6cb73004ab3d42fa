import Synchronization

/// A Lua script run with `EVALSHA`, falling back to `EVAL` when the server does not know it
/// (a restarted or flushed server), so every call stays one round trip.
public final class LuaScript: Sendable {
    let name: String
    let source: String
    private let sha = Mutex<String?>(nil)

    public init(name: String, source: String) {
        self.name = name
        self.source = source
    }

    var knownSHA: String? { sha.withLock { $0 } }

    /// Loads the script (`SCRIPT LOAD`) and remembers its SHA.
    func load(on connection: HiredisConnection) throws {
        let reply = try connection.command([Array("SCRIPT".utf8), Array("LOAD".utf8), Array(source.utf8)])
        guard let loaded = reply.text else {
            throw ASGIScriptError.loadFailed(name, "\(reply)")
        }
        sha.withLock { $0 = loaded }
    }

    /// The `EVALSHA` command for a script whose SHA is known.
    func evalshaCommand(keys: [[UInt8]], args: [[UInt8]]) -> [[UInt8]] {
        [Array("EVALSHA".utf8), Array((knownSHA ?? "").utf8), Array(String(keys.count).utf8)] + keys + args
    }

    func run(on connection: HiredisConnection, keys: [[UInt8]], args: [[UInt8]], forceSource: Bool = false) throws -> RedisReply {
        let tail = [Array(String(keys.count).utf8)] + keys + args
        if !forceSource, let known = knownSHA {
            let reply = try connection.command([Array("EVALSHA".utf8), Array(known.utf8)] + tail)
            if case .error(let e) = reply, e.hasPrefix("NOSCRIPT") {
                return try connection.command([Array("EVAL".utf8), Array(source.utf8)] + tail)
            }
            return reply
        }
        let replies = try connection.pipeline([
            [Array("SCRIPT".utf8), Array("LOAD".utf8), Array(source.utf8)],
            [Array("EVAL".utf8), Array(source.utf8)] + tail,
        ])
        if let loaded = replies[0].text { sha.withLock { $0 = loaded } }
        return replies[1]
    }
}

enum ASGIScriptError: Error, CustomStringConvertible {
    case loadFailed(String, String)
    var description: String {
        switch self {
        case .loadFailed(let name, let reply): "Redis did not load the script \(name): \(reply)"
        }
    }
}
