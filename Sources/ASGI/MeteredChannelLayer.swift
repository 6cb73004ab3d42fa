import CoreMetrics

/// A layer that counts every error its callers see, by code, as
/// `channels_layer_errors_total{code}` (`channel_full`, `message_too_large`, `invalid_name`,
/// `invalid_message`, `connection_lost`, `backend_error`, `invalid_configuration`, `closed`,
/// `other`), and forwards everything else to the layer it wraps. The commands wrap the layer
/// they make in one, so the worker, the interface server, the consumers and the delay server are
/// all counted at the one place their calls pass. Free when no metrics backend is bootstrapped.
public struct MeteredChannelLayer: ForwardingChannelLayer, ChannelLayerInspection, ChannelLayerSendMany {
    /// The layer that does the work.
    public let base: any ChannelLayer

    /// `base`, counted.
    public init(_ base: any ChannelLayer) {
        // Never wrap twice: a second wrapper would count every error twice.
        self.base = (base as? MeteredChannelLayer)?.base ?? base
    }

    /// The label value of `error`: a bounded set.
    public static func label(of error: any Error) -> String {
        guard let error = error as? ChannelLayerError else { return "other" }
        var label = ""
        for character in error.code.description {
            if character.isUppercase {
                label += "_" + character.lowercased()
            } else {
                label.append(character)
            }
        }
        return known.contains(label) ? label : "other"
    }

    private static let known: Set<String> = [
        "channel_full", "message_too_large", "invalid_name", "invalid_message", "connection_lost", "backend_error", "out_of_memory",
        "invalid_configuration", "closed",
    ]
    private static let counters: [String: Counter] = Dictionary(
        uniqueKeysWithValues: (known.sorted() + ["other"]).map {
            ($0, Counter(label: "channels_layer_errors_total", dimensions: [("code", $0)]))
        })

    /// `error`, counted. Every layer call of the process passes here, each as a plain `do`/`catch`
    /// (no closure per call).
    fileprivate func counted(_ error: ChannelLayerError) -> ChannelLayerError {
        // A cancelled call is the caller's choice, not a failure of the layer.
        if error.code != .cancelled { Self.counters[Self.label(of: error)]?.increment() }
        return error
    }

    /// Sends through the wrapped layer.
    public func send(_ message: Message, to channel: String) async throws(ChannelLayerError) {
        do { return try await base.send(message, to: channel) } catch { throw counted(error) }
    }

    /// Whether the wrapped layer sends several messages in one step.
    public var sendsManyAtOnce: Bool { (base as? any ChannelLayerSendMany)?.sendsManyAtOnce ?? false }

    /// Sends several through the wrapped layer (in one step when it can).
    public func sendMany(_ messages: [Message], to channel: String, receipt: RunReceipt?) async throws(ChannelLayerError) -> Int {
        do { return try await base.send(messages, to: channel, receipt: receipt) } catch { throw counted(error) }
    }

    /// Receives through the wrapped layer.
    public func receive(channels: [String], timeout: Duration) async throws(ChannelLayerError) -> ReceivedMessage? {
        do { return try await base.receive(channels: channels, timeout: timeout) } catch { throw counted(error) }
    }

    /// Receives a batch through the wrapped layer.
    public func receiveBatch(channels: [String], max: Int, timeout: Duration) async throws(ChannelLayerError) -> [ReceivedMessage] {
        do { return try await base.receiveBatch(channels: channels, max: max, timeout: timeout) } catch { throw counted(error) }
    }

    /// Bundles from the wrapped layer when it bundles, else its batch one message per entry.
    public func receiveBundles(from processChannel: String, max: Int, timeout: Duration) async throws(ChannelLayerError)
        -> [ReceivedBundle]
    {
        do {
            if let bundling = base as? any ChannelLayerBundling {
                return try await bundling.receiveBundles(from: processChannel, max: max, timeout: timeout)
            }
            return try await base.receiveBatch(channels: [processChannel], max: max, timeout: timeout).map {
                ReceivedBundle(channel: $0.channel, message: $0.message)
            }
        } catch {
            throw counted(error)
        }
    }

    /// A fresh channel name from the wrapped layer.
    public func newChannel(_ pattern: String) async throws(ChannelLayerError) -> String {
        do { return try await base.newChannel(pattern) } catch { throw counted(error) }
    }

    /// Adds to a group of the wrapped layer.
    public func groupAdd(_ group: String, channel: String) async throws(ChannelLayerError) {
        do { return try await base.groupAdd(group, channel: channel) } catch { throw counted(error) }
    }

    /// Removes from a group of the wrapped layer.
    public func groupDiscard(_ group: String, channel: String) async throws(ChannelLayerError) {
        do { return try await base.groupDiscard(group, channel: channel) } catch { throw counted(error) }
    }

    /// A group's members in the wrapped layer.
    public func groupChannels(_ group: String) async throws(ChannelLayerError) -> [String] {
        do { return try await base.groupChannels(group) } catch { throw counted(error) }
    }

    /// Sends to a group of the wrapped layer.
    public func sendGroup(_ group: String, message: Message) async throws(ChannelLayerError) {
        do { return try await base.sendGroup(group, message: message) } catch { throw counted(error) }
    }

    /// Flushes the wrapped layer.
    public func flush() async throws(ChannelLayerError) {
        do { return try await base.flush() } catch { throw counted(error) }
    }

    /// The wrapped layer's statistics.
    public func globalStatistics() async throws(ChannelLayerError) -> GlobalStatistics {
        do { return try await base.globalStatistics() } catch { throw counted(error) }
    }

    /// A channel's statistics in the wrapped layer.
    public func channelStatistics(_ channel: String) async throws(ChannelLayerError) -> ChannelStatistics {
        do { return try await base.channelStatistics(channel) } catch { throw counted(error) }
    }

    /// Registers the bundle reader with the wrapped layer.
    public func registerBundleReader(_ processChannel: String) async throws(ChannelLayerError) -> Bool {
        do { return try await base.registeredAsBundleReader(processChannel) } catch { throw counted(error) }
    }

    /// The wrapped layer's pending channels (none when it cannot tell).
    public func pendingChannels() async throws(ChannelLayerError) -> [String] {
        guard let inspection = base as? any ChannelLayerInspection else { return [] }
        do { return try await inspection.pendingChannels() } catch { throw counted(error) }
    }

    /// The wrapped layer's groups (none when it cannot tell).
    public func groups() async throws(ChannelLayerError) -> [String] {
        guard let inspection = base as? any ChannelLayerInspection else { return [] }
        do { return try await inspection.groups() } catch { throw counted(error) }
    }

    /// Where the wrapped layer keeps its data.
    public var location: String { (base as? any ChannelLayerInspection)?.location ?? String(describing: type(of: base)) }
}

/// History and presence go to the wrapped layer uncounted (`ForwardingChannelLayer`'s defaults),
/// but for a publication in one step, a group send whose errors are counted as a group send's.
extension MeteredChannelLayer: ChannelLayerHistory, ChannelLayerPresence {
    /// Publishes through the wrapped layer in one step, when it can.
    public func historyPublish(_ group: String, data: String, retention: HistoryRetention) async throws(ChannelLayerError)
        -> StreamPosition?
    {
        guard let history = base as? any ChannelLayerHistory else { return nil }
        do { return try await history.historyPublish(group, data: data, retention: retention) } catch { throw counted(error) }
    }
}
