import ASGI
import NIOSSL

/// The earlier name of ``RedisTLSConfiguration``.
@available(*, deprecated, renamed: "RedisTLSConfiguration")
public typealias RedisTLSOptions = RedisTLSConfiguration

/// The TLS configuration of a `rediss://` endpoint, named after redis-py's URL options.
public struct RedisTLSConfiguration: Sendable, Hashable {
    /// The values of `ssl_cert_reqs`, redis-py's names.
    public enum Verification: String, Sendable, Hashable {
        /// The certificate must be valid and signed by a trusted CA (the default).
        case required
        /// As `required`: a Redis server always presents a certificate.
        case optional
        /// Nothing is checked: encryption without authentication of the server.
        case none
    }

    /// PEM file of the CAs to trust (`ssl_ca_certs`); nil for the system's roots.
    public var caCertificatesPath: String?
    /// PEM certificate chain presented to the server, for mutual TLS (`ssl_certfile`).
    public var certificatePath: String?
    /// PEM private key of that certificate (`ssl_keyfile`).
    public var privateKeyPath: String?
    /// Whether the server's certificate is checked (`ssl_cert_reqs`).
    public var verification: Verification
    /// Whether the certificate must name the host connected to (`ssl_check_hostname`).
    public var checkHostname: Bool
    /// The name the certificate must carry and the SNI sent, when it is not the URL's host.
    public var serverName: String?

    /// Full verification against the system's roots.
    public init(
        caCertificatesPath: String? = nil, certificatePath: String? = nil, privateKeyPath: String? = nil,
        verification: Verification = .required, checkHostname: Bool = true, serverName: String? = nil
    ) {
        self.caCertificatesPath = caCertificatesPath
        self.certificatePath = certificatePath
        self.privateKeyPath = privateKeyPath
        self.verification = verification
        self.checkHostname = checkHostname
        self.serverName = serverName
    }
}

extension RedisTLSConfiguration {
    /// The NIOSSL client context these options describe; throws `invalidConfiguration` naming
    /// a file that cannot be read.
    func makeContext() throws(ChannelLayerError) -> NIOSSLContext {
        var configuration = TLSConfiguration.makeClientConfiguration()
        if let path = caCertificatesPath {
            do {
                configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(path))
            } catch {
                throw ChannelLayerError(.invalidConfiguration, "cannot read ssl_ca_certs '\(path)': \(error)", underlying: error)
            }
        }
        if let certificatePath, let privateKeyPath {
            do {
                configuration.certificateChain = try NIOSSLCertificate.fromPEMFile(certificatePath).map { .certificate($0) }
            } catch {
                throw ChannelLayerError(.invalidConfiguration, "cannot read ssl_certfile '\(certificatePath)': \(error)", underlying: error)
            }
            do {
                configuration.privateKey = .privateKey(try NIOSSLPrivateKey(file: privateKeyPath, format: .pem))
            } catch {
                throw ChannelLayerError(.invalidConfiguration, "cannot read ssl_keyfile '\(privateKeyPath)': \(error)", underlying: error)
            }
        }
        switch verification {
        case .none: configuration.certificateVerification = .none
        case .required, .optional: configuration.certificateVerification = checkHostname ? .fullVerification : .noHostnameVerification
        }
        do {
            return try NIOSSLContext(configuration: configuration)
        } catch {
            throw ChannelLayerError(.invalidConfiguration, "cannot set up TLS: \(error)", underlying: error)
        }
    }
}
