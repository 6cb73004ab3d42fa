import Foundation
import NIOSSL
import Synchronization

/// Why the TLS certificate or key could not be used; said at start-up (and on a reload, which
/// keeps serving the previous pair).
public struct TLSConfigurationError: Error, CustomStringConvertible, Sendable {
    /// What was wrong.
    public enum Code: Sendable {
        /// A certificate without a key, or a key without a certificate.
        case missingKey, missingCertificate
        /// The file is missing, unreadable or not PEM.
        case unreadableCertificate, unreadableKey
        /// The certificate file holds no certificate.
        case noCertificate
        /// TLS refused the pair (a key that does not match, an unusable certificate).
        case rejected
    }

    /// What was wrong.
    public let code: Code
    /// The file it was about.
    public let path: String
    /// What the TLS library said, if anything.
    public let detail: String

    init(_ code: Code, path: String, detail: String = "") {
        self.code = code
        self.path = path
        self.detail = detail
    }

    /// The sentence `runserver` prints.
    public var description: String {
        let reason = detail.isEmpty ? "" : ": \(detail)"
        switch code {
        case .missingKey: return "--tls-cert \(path) needs --tls-key"
        case .missingCertificate: return "--tls-key \(path) needs --tls-cert"
        case .unreadableCertificate: return "cannot read the TLS certificate \(path)\(reason)"
        case .unreadableKey: return "cannot read the TLS private key \(path)\(reason)"
        case .noCertificate: return "no PEM certificate in \(path)"
        case .rejected: return "the TLS certificate \(path) and its key cannot be used together\(reason)"
        }
    }
}

/// The certificate chain and key a TLS server presents, read from PEM files; `reload()` reads
/// them again, and connections accepted after it get the new pair.
public final class TLSCertificateStore: Sendable {
    /// The certificate chain's file (PEM).
    public let certificatePath: String
    /// The private key's file (PEM).
    public let keyPath: String
    private let http2: Bool
    private let current: Mutex<NIOSSLContext>

    init(certificatePath: String, keyPath: String, http2: Bool) throws(TLSConfigurationError) {
        self.certificatePath = certificatePath
        self.keyPath = keyPath
        self.http2 = http2
        self.current = Mutex(try Self.load(certificatePath: certificatePath, keyPath: keyPath, http2: http2))
    }

    /// The context new connections are served with.
    var context: NIOSSLContext { current.withLock { $0 } }

    /// Reads the files again; on failure the previous pair stays in use.
    public func reload() throws(TLSConfigurationError) {
        let context = try Self.load(certificatePath: certificatePath, keyPath: keyPath, http2: http2)
        current.withLock { $0 = context }
    }

    private static func load(certificatePath: String, keyPath: String, http2: Bool) throws(TLSConfigurationError) -> NIOSSLContext {
        guard FileManager.default.isReadableFile(atPath: certificatePath) else {
            throw TLSConfigurationError(.unreadableCertificate, path: certificatePath, detail: "no such readable file")
        }
        guard FileManager.default.isReadableFile(atPath: keyPath) else {
            throw TLSConfigurationError(.unreadableKey, path: keyPath, detail: "no such readable file")
        }
        let chain: [NIOSSLCertificate]
        do {
            chain = try NIOSSLCertificate.fromPEMFile(certificatePath)
        } catch {
            throw TLSConfigurationError(.unreadableCertificate, path: certificatePath, detail: "\(error)")
        }
        guard !chain.isEmpty else { throw TLSConfigurationError(.noCertificate, path: certificatePath) }
        let key: NIOSSLPrivateKey
        do {
            key = try NIOSSLPrivateKey(file: keyPath, format: .pem)
        } catch {
            throw TLSConfigurationError(.unreadableKey, path: keyPath, detail: "\(error)")
        }
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(key))
        configuration.applicationProtocols = http2 ? ["h2", "http/1.1"] : ["http/1.1"]
        configuration.minimumTLSVersion = .tlsv12
        do {
            return try NIOSSLContext(configuration: configuration)
        } catch {
            throw TLSConfigurationError(.rejected, path: certificatePath, detail: "\(error)")
        }
    }
}
