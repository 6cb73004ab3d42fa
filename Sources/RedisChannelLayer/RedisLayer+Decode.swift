import ASGI
import CoreMetrics
import DequeModule
import Logging
import NIOCore
import NIOPosix
import OrderedCollections
import Synchronization

/// What a take brings back: bodies decoded (and decrypted) into messages, a bundled group
/// message expanded into one message per member, kept in a local backlog that is handed out
/// before anything popped later.
extension RedisChannelLayer {
    /// Decodes `{list, body, list, body, ...}` from `start`, dropping (and counting) bad bodies.
    func decodePairs(_ items: [RedisReply], from start: Int) -> [ReceivedBundle] {
        var out: [ReceivedBundle] = []
        out.reserveCapacity((items.count - start) / 2)
        var index = start
        while index + 1 < items.count {
            if let list = items[index].bytes, let body = items[index + 1].bytes, let taken = decodeReceived(list: list, body: body) {
                out.append(taken)
            }
            index += 2
        }
        return out
    }

    /// Returns the first `max` messages of `taken` (a bundle counts one per member) and keeps
    /// the rest (members of a bundle) for the next receives of their channel.
    func handOut(_ taken: [ReceivedBundle], max: Int) -> [ReceivedMessage] {
        let popped = taken.count == 1 ? taken[0].messages : taken.flatMap(\.messages)
        guard popped.count > max else { return popped }
        // A bundle's members share their process channel: one name and one append per run of
        // them, not one per member.
        var runs: [(queue: String, items: ArraySlice<ReceivedMessage>)] = []
        var start = max
        var queue = ChannelNames.nonLocalName(popped[max].channel)
        for index in (max + 1)..<popped.count {
            let channel = popped[index].channel
            if queue.utf8.last == 0x21, ChannelNames.hasBytePrefix(channel, queue) { continue }
            let next = ChannelNames.nonLocalName(channel)
            if next == queue { continue }
            runs.append((queue, popped[start..<index]))
            start = index
            queue = next
        }
        runs.append((queue, popped[start...]))
        backlog.withLock { backlog in
            for run in runs { backlog[run.queue, default: []].append(contentsOf: run.items) }
        }
        return Array(popped[..<max])
    }

    /// Up to `max` messages kept from earlier bundles for any of `channels`.
    func fromBacklog(_ channels: [String], max: Int) -> [ReceivedMessage] {
        backlog.withLock { backlog -> [ReceivedMessage] in
            guard !backlog.isEmpty else { return [] }
            var out: [ReceivedMessage] = []
            for channel in channels where out.count < max {
                // Taken out of the dictionary, so popping does not copy the whole queue.
                guard var queue = backlog.removeValue(forKey: channel) else { continue }
                while out.count < max, let next = queue.popFirst() { out.append(next) }
                if !queue.isEmpty { backlog[channel] = queue }
            }
            return out
        }
    }

    /// Decodes a popped body: one message, or a bundled group message with its member list
    /// (`__asgi_channel__` holding a list of names). A body that is not a valid message is
    /// logged, counted and dropped (nil), and so is a bundle for no member.
    func decodeReceived(list: [UInt8], body: [UInt8]) -> ReceivedBundle? {
        let listName = String(decoding: list.dropFirst(configuration.prefix.utf8.count), as: UTF8.self)
        var body = body
        if let crypter {
            do {
                body = try crypter.decrypt(body, ttl: configuration.expirySeconds + 10)
            } catch {
                undecryptableDropped.add(1, ordering: .relaxed)
                RedisMetrics.undecryptable.increment()
                logger.warning(
                    "dropped a message that does not decrypt with any of the layer's keys",
                    metadata: ["channel": "\(listName)", "bytes": "\(body.count)", "error": "\(error)"])
                return nil
            }
        }
        do {
            let layout = BundleMembers.layout(of: body)
            if let layout, let members = bundleMembers.members(in: body, at: layout, listName: listName) {
                // A member list decoded and checked before: only the message is decoded (the
                // map's other entries).
                var rest: [UInt8] = []
                rest.reserveCapacity(body.count - layout.list.upperBound + 5)
                MsgPackEncoder.writeMapHeader(count: layout.mapCount - 1, into: &rest)
                rest += body[layout.list.upperBound...]
                let message = try decoder.decodeMessage(rest)
                // (A second member list in the same map: the whole decoder decides, below.)
                if message[asgiChannelKey] == nil { return ReceivedBundle(members: members, message: message) }
            }
            var message = try decoder.decodeMessage(body)
            switch message.removeValue(forKey: asgiChannelKey) {
            case nil:
                return ReceivedBundle(channel: listName, message: message)
            case .string(let name)?:
                return ReceivedBundle(channel: name, message: message)
            case .array(let names)?:
                var out: [String] = []
                out.reserveCapacity(names.count)
                for name in names {
                    guard case .string(let member) = name, ChannelNames.hasBytePrefix(member, listName) else {
                        throw BundleError(
                            .foreignMember, "a bundle on '\(listName)' names '\(name.stringValue ?? "\(name)")', not one of its channels")
                    }
                    out.append(member)
                }
                guard !out.isEmpty else { return nil }
                let members = BundleMemberList(out)
                if let layout { bundleMembers.keep(members, of: body, at: layout, listName: listName) }
                return ReceivedBundle(members: members, message: message)
            case let other?:
                throw BundleError(.notANameOrList, "'\(asgiChannelKey)' is \(other.typeName), not a channel name or a bundle's list")
            }
        } catch {
            malformedDropped.add(1, ordering: .relaxed)
            RedisMetrics.malformed.increment()
            logger.warning(
                error is BundleError ? "dropped a malformed bundled group message" : "dropped a message that is not valid msgpack",
                metadata: [
                    "channel": "\(listName)", "bytes": "\(body.count)", "error": "\(error)",
                ])
            return nil
        }
    }
}

/// A stored message that says it carries a group send for several members of one process (a
/// bundle) and does not hold together: dropped and counted as malformed, with this as the reason.
struct BundleError: CodedError, Sendable {
    /// What is wrong with the bundle.
    enum Code: String, Sendable, CustomStringConvertible {
        /// A member of the bundle is not a channel of the process channel it was stored on:
        /// a bundle must never deliver to another process's sockets.
        case foreignMember
        /// `__asgi_channel__` is neither a channel name nor a list of them.
        case notANameOrList

        var description: String { rawValue }
    }

    let code: Code
    let message: String

    init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }
}
