import ASGI
import NIOCore

/// Finding a service's master through Redis Sentinel, as redis-py's `Sentinel.master_for`
/// does: ask each sentinel in turn (`SENTINEL get-master-addr-by-name`), connect to the
/// address the first one that knows gives, and check with `ROLE` that it is still a master
/// (a failover may be under way, or a sentinel may lag behind).
enum RedisSentinel {
    /// The master's endpoint (the template's credentials, database, TLS and timeouts at the
    /// address the sentinels give), and the index of the sentinel that answered.
    static func resolveMaster(
        of template: RedisEndpoint, service: String, sentinels: [RedisEndpoint.SentinelHost], startingAt first: Int,
        on loop: any EventLoop, connectTimeout: Duration, commandTimeout: Duration
    ) async throws(ChannelLayerError) -> (master: RedisEndpoint, sentinel: Int) {
        var failures: [String] = []
        for offset in 0..<sentinels.count {
            let index = (first + offset) % sentinels.count
            let sentinel = sentinels[index]
            var endpoint = RedisEndpoint(host: sentinel.host, port: sentinel.port, password: template.sentinelPassword)
            endpoint.connectTimeout = template.connectTimeout
            endpoint.keepalive = template.keepalive
            do {
                let connection = try await RedisConnection.connect(
                    to: endpoint, on: loop, connectTimeout: connectTimeout, commandTimeout: commandTimeout)
                defer { connection.close() }
                let reply = try await connection.command(["SENTINEL", "get-master-addr-by-name", .text(service)])
                guard case .array(let parts) = reply, parts.count == 2, let host = parts[0].text,
                    let portText = parts[1].text, let port = Int(portText)
                else {
                    failures.append("\(sentinel): \(reply.errorMessage ?? "knows no service '\(service)'")")
                    continue
                }
                var master = template
                master.address = .tcp(host: host, port: port)
                return (master, index)
            } catch {
                failures.append("\(sentinel): \(error.message)")
            }
        }
        throw ChannelLayerError(
            .connectionLost, "no sentinel gave a master for '\(service)' (\(failures.joined(separator: "; ")))")
    }

    /// Throws unless the server on `connection` is a master (after a failover the old master
    /// comes back as a replica, and a lagging sentinel may still name it).
    static func checkIsMaster(_ connection: RedisConnection, service: String) async throws(ChannelLayerError) {
        let reply = try await connection.command(["ROLE"])
        guard case .array(let parts) = reply, let role = parts.first?.text else {
            throw ChannelLayerError(.backendError, "\(connection.endpoint) answered ROLE with \(reply)")
        }
        guard role == "master" else {
            throw ChannelLayerError(
                .connectionLost, "\(connection.endpoint) is a \(role), not the master of '\(service)' (a failover under way?)")
        }
    }
}
