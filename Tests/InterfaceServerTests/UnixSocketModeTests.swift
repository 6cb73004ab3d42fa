import Foundation
import Testing

@testable import InterfaceServer

#if canImport(Glibc)
    import Glibc
#endif

/// The Unix socket's mode is set on the socket the server bound, never through what may have
/// replaced it in a folder others can write: a symbolic link (as root, a chmod through it would
/// open any file to everyone) or another file.
@Suite("unix socket mode")
struct UnixSocketModeTests {
    func folder() throws -> String {
        let path = NSTemporaryDirectory() + "unix-mode-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
        return path
    }

    func mode(_ path: String) -> UInt16 {
        var info = stat()
        _ = lstat(path, &info)
        return UInt16(info.st_mode & 0o777)
    }

    /// A Unix socket bound at `path` (left open until `body` returns).
    func bound(_ path: String, _ body: () throws -> Void) throws {
        let descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        #expect(descriptor >= 0)
        defer { close(descriptor) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (index, byte) in path.utf8.enumerated() { raw[index] = byte }
        }
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        #expect(result == 0)
        try body()
    }

    @Test func theBoundSocketGetsTheMode() throws {
        let dir = try folder()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try bound(dir + "/s.sock") {
            #expect(InterfaceServer.setMode(0o666, ofSocketAt: dir + "/s.sock") == nil)
            #expect(mode(dir + "/s.sock") == 0o666)
            #expect(InterfaceServer.setMode(0o600, ofSocketAt: dir + "/s.sock") == nil)
            #expect(mode(dir + "/s.sock") == 0o600)
        }
    }

    @Test func aLinkOrAFileInItsPlaceIsLeftAlone() throws {
        let dir = try folder()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let secret = dir + "/secret"
        FileManager.default.createFile(atPath: secret, contents: Data("x".utf8), attributes: [.posixPermissions: 0o600])
        // A symbolic link where the socket was.
        #expect(symlink(secret, dir + "/s.sock") == 0)
        let throughLink = InterfaceServer.setMode(0o666, ofSocketAt: dir + "/s.sock")
        #expect(throughLink?.contains("no longer the socket") == true, "\(throughLink ?? "set")")
        #expect(mode(secret) == 0o600, "the link's target was opened up")
        // A plain file where the socket was.
        #expect(InterfaceServer.setMode(0o666, ofSocketAt: secret) != nil)
        #expect(mode(secret) == 0o600)
    }
}
