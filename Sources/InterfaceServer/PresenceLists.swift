import ASGI
import Synchronization

/// The presence lists this server sends its joining sockets, read once for many.
///
/// A socket that joins a group's presence gets the group's list (who is there, and the version
/// its later diffs count from). Read per socket, that is one read of every member per join: a
/// reconnect storm of N sockets into one room costs N reads of N members (5,000 sockets: about
/// 5 ms of Redis each, 25 s of Redis per storm, measured). Here a read serves every socket that
/// asked for the group's list before it began: a socket that asks while a read is on its way
/// waits for the next one (the read on its way may have begun before this socket's join and
/// miss it), which begins when that one ends. So at most one read per group is on its way from
/// this server, and the busier the group the more sockets each read answers.
///
/// A list read after a socket's join (and after it joined the group its diffs come through)
/// is as good for it as one read for it alone: every change after the read reaches it as a
/// diff with a higher version. Its frame's text is made once per read too (for 3,000 members,
/// making it per socket was a fifth of the servers' time in a join storm).
final class PresenceLists: Sendable {
    /// A read list and its frame's text.
    struct Read: Sendable {
        let snapshot: PresenceSnapshot
        let text: String
    }

    private struct Reading {
        /// Whether a read is on its way.
        var busy = false
        /// The sockets waiting for the next read.
        var waiting: [CheckedContinuation<Read?, Never>] = []
    }

    private let reading = Mutex<[String: Reading]>([:])
    /// Reads made (for tests and the metrics of a run).
    let reads = Atomic<Int>(0)

    /// `group`'s list, read after this call began (nil: the read failed, and failed again).
    func list(_ group: String, from presence: any ChannelLayerPresence) async -> Read? {
        await withCheckedContinuation { continuation in
            let start = reading.withLock { all -> Bool in
                all[group, default: Reading()].waiting.append(continuation)
                guard all[group]?.busy == false else { return false }
                all[group]?.busy = true
                return true
            }
            if start { Task { await self.read(group, from: presence) } }
        }
    }

    /// Reads for the sockets waiting, then again for those that came meanwhile, until none did.
    private func read(_ group: String, from presence: any ChannelLayerPresence) async {
        while true {
            let answered = reading.withLock { all -> [CheckedContinuation<Read?, Never>] in
                let waiting = all[group]?.waiting ?? []
                all[group]?.waiting = []
                return waiting
            }
            reads.add(1, ordering: .relaxed)
            // A read that fails is tried again (3 times more, after pauses of 0.2, 0.4 and
            // 0.8 s): it answers every socket that waited for it, not one. Not on a closed layer.
            var snapshot: PresenceSnapshot?
            var backoff = Backoff(first: .milliseconds(200), cap: .seconds(2))
            for attempt in 0..<4 {
                if attempt > 0 { try? await Task.sleep(for: backoff.next()) }
                do {
                    snapshot = try await presence.presenceSnapshot(group)
                    break
                } catch {
                    if error.code == .closed || error.code == .invalidName { break }
                }
            }
            let read = snapshot.map { snapshot in
                Read(snapshot: snapshot, text: PresenceText.list(snapshot.members, version: snapshot.version))
            }
            for continuation in answered { continuation.resume(returning: read) }
            let done = reading.withLock { all -> Bool in
                guard all[group]?.waiting.isEmpty != false else { return false }
                all[group] = nil
                return true
            }
            if done { return }
        }
    }
}
