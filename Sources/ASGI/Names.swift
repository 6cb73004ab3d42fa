#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// The naming rules of ASGI 1.0 channels and groups.
///
/// Channel names: `^[a-zA-Z\d\-_.]+((\?|\!)[\d\w\-_.]*)?$`, ASCII only, shorter than 100
/// characters. Group names: `^[a-zA-Z\d\-_.]+$`, shorter than 100.
public enum ChannelNames {
    /// The longest channel or group name ASGI allows.
    public static let maxLength = 100

    /// Where a name is going to be used; receives and sends have slightly different rules.
    public enum Use: Sendable {
        case send
        case receive
    }

    @inline(__always)
    static func isBaseCharacter(_ c: UInt8) -> Bool {
        (c >= 0x61 && c <= 0x7a) || (c >= 0x41 && c <= 0x5a) || (c >= 0x30 && c <= 0x39)
            || c == 0x2d || c == 0x5f || c == 0x2e
    }

    /// Checks a channel name; throws ``ChannelLayerError`` with code `invalidName` naming it.
    public static func validateChannel(_ name: String, for use: Use = .send) throws(ChannelLayerError) {
        let utf8 = name.utf8
        guard utf8.count < maxLength, !utf8.isEmpty else {
            throw invalid(name, "channel names must be 1 to \(maxLength - 1) characters")
        }
        var markerIndex: Int? = nil
        for (i, c) in utf8.enumerated() {
            if isBaseCharacter(c) { continue }
            if (c == 0x3f || c == 0x21) && markerIndex == nil && i > 0 {
                markerIndex = i
                continue
            }
            throw invalid(
                name, "channel names hold ASCII letters, digits, '-', '_', '.' and at most one '?' or '!' after the first character")
        }
        if let markerIndex {
            let marker = utf8[utf8.index(utf8.startIndex, offsetBy: markerIndex)]
            let endsAtMarker = markerIndex == utf8.count - 1
            if marker == 0x3f && endsAtMarker {
                throw invalid(name, "single-reader channel names must not end with '?'")
            }
            if marker == 0x21 && !endsAtMarker && use == .receive {
                throw invalid(name, "process-specific channel names in a receive must end at the '!'")
            }
        }
    }

    /// Checks a group name.
    public static func validateGroup(_ name: String) throws(ChannelLayerError) {
        let utf8 = name.utf8
        guard utf8.count < maxLength, !utf8.isEmpty else {
            throw ChannelLayerError(.invalidName, "invalid group name '\(name)': group names must be 1 to \(maxLength - 1) characters")
        }
        for c in utf8 where !isBaseCharacter(c) {
            throw ChannelLayerError(
                .invalidName, "invalid group name '\(name)': group names hold only ASCII letters, digits, '-', '_' and '.'")
        }
    }

    /// Checks a `newChannel` pattern: a valid channel name prefix that ends with `?`.
    public static func validatePattern(_ pattern: String) throws(ChannelLayerError) {
        guard pattern.utf8.last == 0x3f else {
            throw invalid(pattern, "new channel patterns must end with '?'")
        }
        // The pattern plus one letter must be a valid name.
        try validateChannel(pattern + "a")
        guard pattern.utf8.count + 12 < maxLength else {
            throw invalid(pattern, "pattern too long for a 12-letter suffix")
        }
    }

    /// `prefix!` for `prefix!suffix`; the name itself otherwise.
    public static func nonLocalName(_ name: String) -> String {
        guard let bang = name.utf8.firstIndex(of: 0x21) else { return name }
        return String(name[...bang])
    }

    /// The list a server's membership notices are pushed on (a group add or discard of one of
    /// its sockets, told to the server by the layer that made it): its process channel's name,
    /// then `#membership`. No channel can have that name (`#`), so no `send`, ours or
    /// asgi_redis's, can put a notice there; and it is a list of its own: notices take nothing
    /// from the capacity the process channel has for replies.
    public static func membershipNoticeList(forProcess process: String) -> String {
        process + "#membership"
    }

    /// Whether `name`'s UTF-8 bytes begin with `prefix`'s: one byte comparison (names are
    /// ASCII), where `hasPrefix` compares characters.
    public static func hasBytePrefix(_ name: String, _ prefix: String) -> Bool {
        let result = name.utf8.withContiguousStorageIfAvailable { bytes in
            prefix.utf8.withContiguousStorageIfAvailable { head in
                bytes.count >= head.count && (head.isEmpty || memcmp(bytes.baseAddress!, head.baseAddress!, head.count) == 0)
            }
        }
        return (result ?? nil) ?? name.utf8.starts(with: prefix.utf8)
    }

    /// True for a process-specific name (it contains `!`).
    public static func isProcessSpecific(_ name: String) -> Bool { name.utf8.contains(0x21) }
    /// True for a single-reader name (it contains `?`).
    public static func isSingleReader(_ name: String) -> Bool { name.utf8.contains(0x3f) }
    /// True for the channel of a connection's last message (`websocket.disconnect`,
    /// `http.disconnect`, any `*.disconnect`): a fair batch receive takes it only into the room
    /// the other channels leave, so a connection's disconnect is not taken while the connects
    /// queued before it wait.
    public static func isDeferredInBatches(_ name: String) -> Bool { name.hasSuffix(".disconnect") }

    private static func invalid(_ name: String, _ reason: String) -> ChannelLayerError {
        ChannelLayerError(.invalidName, "invalid channel name '\(name)': \(reason)")
    }

    /// `count` random ASCII letters, as asgi_redis uses for new channel names.
    public static func randomLetters(_ count: Int) -> String { RandomToken.string(count) }
}
