import ASGI
import NIOSSL

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
