import ASGI
import Crypto
import Synchronization

/// The group journal: every `groupAdd` of a process-specific channel (a socket of some server)
/// also records `group channel` in a hash of that server's process channel, on the group's
/// shard (on an encrypted layer the field is a keyed digest of the entry and the value the entry
/// sealed, so no group name is stored in the clear), so the server knows every group its sockets were put in — by its own sessions, by
/// any worker's consumer — and its keeper can put back a membership whose group set vanished
/// (evicted under `maxmemory`, deleted). `groupDiscard` takes the entry out. A mark member
/// field (`~`, no group name can make it or a digest be it) tells a journal emptied by discards from one that vanished;
/// a vanished journal is written again from the previous pass's view. With the same add or
/// discard, the socket's server is sent a membership notice (same shard only), from which it
/// keeps its sockets' groups in memory: where its journal vanished, its keeper puts those back.
/// Python asgi_redis processes keep no journal and send no notice: memberships they add are
/// not put back.
extension RedisChannelLayer {
    func journalKey(_ processChannel: String) -> [UInt8] { Array((configuration.prefix + ":journal:" + processChannel).utf8) }

    /// What no group name can be: present in every journal that was written.
    static let journalMark = "~"

    /// An entry's field and value in the journal: the entry and nothing on a plain layer; a keyed
    /// digest (a discard finds it again) and the sealed entry on an encrypted one.
    func journalFieldAndValue(_ entry: String) -> (field: [UInt8], value: [UInt8]) {
        guard let crypter, let digestKey = journalDigestKey else { return (Array(entry.utf8), []) }
        let digest = HMAC<SHA256>.authenticationCode(for: Array(entry.utf8), using: SymmetricKey(data: digestKey))
        return (Array(Hex.encode(Array(digest)).utf8), crypter.encrypt(Array(entry.utf8)))
    }

    /// The entry a journal field and value hold; nil for the mark or what cannot be read.
    func journalEntry(field: [UInt8], value: [UInt8]) -> String? {
        guard field != Array(Self.journalMark.utf8) else { return nil }
        guard let crypter else { return String(decoding: field, as: UTF8.self) }
        guard let plain = try? crypter.decrypt(value, ttl: nil) else { return nil }
        return String(decoding: plain, as: UTF8.self)
    }

    /// The journal commands that go with adding `channel` to `group` (none for a channel of no
    /// process).
    func journalAdd(_ group: String, channel: String, expiry: Int) -> [[RedisArgument]] {
        guard ChannelNames.isProcessSpecific(channel) else { return [] }
        let journal = journalKey(ChannelNames.nonLocalName(channel))
        let (field, value) = journalFieldAndValue(group + " " + channel)
        return [
            ["HSET", .bytes(journal), .text(Self.journalMark), .bytes([]), .bytes(field), .bytes(value)],
            ["EXPIRE", .bytes(journal), .integer(expiry)],
        ]
    }

    /// The journal command that goes with discarding `channel` from `group`.
    func journalDiscard(_ group: String, channel: String) -> [[RedisArgument]] {
        guard ChannelNames.isProcessSpecific(channel) else { return [] }
        return [
            ["HDEL", .bytes(journalKey(ChannelNames.nonLocalName(channel))), .bytes(journalFieldAndValue(group + " " + channel).field)]
        ]
    }

    /// One keeper pass; see `ChannelLayerHistory/groupCheck(processChannel:followers:memberships:isOpen:)`.
    /// Per shard: one `HGETALL` of the journal, then one script (per 500 members) that adds
    /// back what is missing; entries of closed sockets are dropped. Where a shard's journal
    /// vanished, the server's own view (`memberships`) of the groups on that shard is put back
    /// too: joins made since the last pass are in no earlier view of the journal.
    public func groupCheck(
        processChannel: String, followers: [String: [String]], memberships: [String: [String]],
        isOpen: @Sendable (String) -> Bool
    ) async throws(ChannelLayerError) -> GroupCheck {
        return try await withLayerErrors {
            try ChannelNames.validateChannel(processChannel, for: .receive)
            var check = GroupCheck()
            for shard in shards.indices {
                // One shard's failure (it is down) does not stop the others' check.
                do {
                    try await groupCheck(
                        shard: shard, processChannel: processChannel, followers: followers, memberships: memberships, isOpen: isOpen,
                        into: &check)
                } catch {
                    check.failures.append("shard \(shard): \(error)")
                }
            }
            return check
        }
    }

    private func groupCheck(
        shard: Int, processChannel: String, followers: [String: [String]], memberships: [String: [String]],
        isOpen: @Sendable (String) -> Bool, into check: inout GroupCheck
    ) async throws {
        let journal = journalKey(processChannel)
        let connection = try await shared(shard)
        let reply = try await connection.command(["HGETALL", .bytes(journal)])
        guard case .array(let items) = reply, items.count % 2 == 0 else { throw unexpected(reply, doing: "read the group journal") }
        var marked = false
        var live: Set<String> = []
        var stale: [[UInt8]] = []
        for index in stride(from: 0, to: items.count, by: 2) {
            guard let field = items[index].bytes else { continue }
            if field == Array(Self.journalMark.utf8) {
                marked = true
            } else if let entry = journalEntry(field: field, value: items[index + 1].bytes ?? []),
                let member = GroupMembership(journalEntry: entry), isOpen(member.channel)
            {
                live.insert(entry)
            } else {
                stale.append(field)
            }
        }
        let viewKey = "\(shard) \(processChannel)"
        if marked {
            // The journal lives as long as its server checks it: it must outlive the group sets
            // (which expire `group_expiry` after their last add) to put their members back.
            let renewed = try await connection.command([
                "EXPIRE", .bytes(journal), .integer(configuration.groupExpirySeconds),
            ])
            if let error = renewed.errorMessage { throw ChannelLayerError.redisRefused(error, "renew the group journal") }
        } else {
            // The journal vanished (evicted, deleted): what the last pass saw of sockets still
            // open is written again, and checked below like the rest.
            let lastSeen = journalViews.withLock { $0[viewKey] ?? [] }.filter {
                GroupMembership(journalEntry: $0).map { isOpen($0.channel) } ?? false
            }.sorted()
            // Only what its group set still holds, checked and written in one script (a discard
            // cannot land in between): an entry discarded since the last pass (its member taken
            // out of the set) must not come back. Those whose set vanished too cannot be told
            // from a discard: they are not put back, and are counted.
            if !lastSeen.isEmpty {
                var args: [RedisArgument] = [.text(configuration.prefix), .integer(configuration.groupExpirySeconds)]
                var entries: [String] = []
                for entry in lastSeen {
                    guard let member = GroupMembership(journalEntry: entry) else { continue }
                    let (field, value) = journalFieldAndValue(entry)
                    args += [.text(member.group), .text(member.channel), .bytes(field), .bytes(value)]
                    entries.append(entry)
                }
                let reply = try await pipelined(shard, Scripts.journalRewrite, keys: [.bytes(journal)], args: args)
                guard case .array(let kept) = reply else { throw unexpected(reply, doing: "rewrite the group journal") }
                let verified = kept.compactMap { $0.integer.map { entries[Int($0) - 1] } }
                check.journalLost += entries.count - verified.count
                // A followed membership, or one in the server's own view, is put back below: not lost.
                let verifiedSet = Set(verified)
                check.lost += entries.filter { !verifiedSet.contains($0) }.compactMap { GroupMembership(journalEntry: $0) }
                    .filter {
                        !(followers[$0.group]?.contains($0.channel) ?? false) && !(memberships[$0.group]?.contains($0.channel) ?? false)
                    }
                check.journalRewritten += verified.count
                live.formUnion(verified)
            }
        }
        journalViews.withLock { $0[viewKey] = live }
        if !stale.isEmpty {
            let removed = try await connection.command(["HDEL", .bytes(journal)] + stale.map(RedisArgument.bytes))
            if removed.errorMessage != nil { throw unexpected(removed, doing: "drop closed sockets from the group journal") }
            check.forgotten += stale.count
        }
        var members: [(mode: String, group: String, channel: String, field: [UInt8])] = []
        for (group, channels) in followers where shardIndex(for: group) == shard {
            for channel in channels { members.append(("f", group, channel, [])) }
        }
        if !marked {
            // The journal vanished: the server's own view (from the membership notices) holds
            // what joined since the last pass too, and those whose sets vanished with it.
            for (group, channels) in memberships where shardIndex(for: group) == shard {
                for channel in channels where isOpen(channel) { members.append(("v", group, channel, [])) }
            }
        }
        for entry in live.sorted() {
            guard let member = GroupMembership(journalEntry: entry) else { continue }
            members.append(("j", member.group, member.channel, journalFieldAndValue(entry).field))
        }
        let now = Self.unixTime()
        let head: [RedisArgument] = [
            .text(configuration.prefix), .text(String(now)), .integer(configuration.groupExpirySeconds),
            .text(String(now - Double(configuration.groupExpirySeconds))),
        ]
        var start = 0
        while start < members.count {
            let chunk = members[start..<min(members.count, start + 500)]
            start += chunk.count
            var args = head
            args.reserveCapacity(head.count + 4 * chunk.count)
            for member in chunk { args += [.text(member.mode), .text(member.group), .text(member.channel), .bytes(member.field)] }
            let added = try await pipelined(shard, Scripts.groupKeep, keys: [.bytes(journal)], args: args)
            if let error = added.errorMessage { throw ChannelLayerError.redisRefused(error, "group check") }
            let fields = (added.array ?? []).compactMap(\.text)
            var index = 0
            while index + 2 < fields.count {
                check.restored.append(
                    GroupCheck.Restored(
                        group: fields[index + 1], channel: fields[index + 2], followed: fields[index] == "f",
                        fromServerView: fields[index] == "v"))
                index += 3
            }
        }
    }

    /// Runs a group add or discard (`commands`, on the group's shard) and, for a socket of a
    /// server that reads bundles (this layer's servers), tells that server: a membership notice
    /// on its notice list (see `Scripts.changeAndNotify`), in one script with the change, so the
    /// notices reach the server in the order the set changed. Only where the group and the
    /// socket's process channel are on one shard.
    func changeMembership(
        _ group: String, channel: String, joined: Bool, commands: [[RedisArgument]], doing what: String
    ) async throws {
        let groupShard = shardIndex(for: group)
        guard ChannelNames.isProcessSpecific(channel) else {
            let replies = try await shared(groupShard).pipeline(commands)
            if let bad = replies.first(where: { $0.errorMessage != nil }) { throw unexpected(bad, doing: what) }
            return
        }
        guard sendShard(for: channel) == groupShard else {
            // The group and the socket's server on different shards: no notice (it could not be
            // in one script with the change, and a view that two workers' changes reach in
            // another order than the set's could put a socket back into a group it left).
            let replies = try await shared(groupShard).pipeline(commands)
            if let bad = replies.first(where: { $0.errorMessage != nil }) { throw unexpected(bad, doing: what) }
            return
        }
        let notice = membershipNotice(group, channel: channel, joined: joined)
        var args = notice.args
        for command in commands {
            args.append(.integer(command.count))
            args += command
        }
        let reply = try await pipelined(groupShard, Scripts.changeAndNotify, keys: notice.keys, args: args)
        if case .error = reply { throw unexpected(reply, doing: what) }
    }

    /// The membership notices for `processChannel`'s server; see
    /// `ChannelLayerHistory.receiveMembershipNotices(processChannel:max:timeout:)`.
    public func receiveMembershipNotices(processChannel: String, max: Int, timeout: Duration) async throws(ChannelLayerError)
        -> [Message]
    {
        try await withLayerErrors {
            try ChannelNames.validateChannel(processChannel, for: .receive)
            let list = RedisArgument.key(configuration.prefix, ChannelNames.membershipNoticeList(forProcess: processChannel))
            let shard = sendShard(for: processChannel)
            let wait = min(timeout, configuration.blockingSlice)
            guard wait > .zero else { return try await takeWithoutWaiting(shard: shard, list: list, max: max).0.map(\.message) }
            let popped = try await blockingTake(shard: shard, lists: [list], wait: wait, max: max)
            return (popped ?? []).map(\.message)
        }
    }

    /// The keys and arguments of a membership notice for `channel`'s server: its notice list
    /// (``ChannelNames/membershipNoticeList(forProcess:)``), its reader registration, then
    /// (notice key, body, expiry).
    func membershipNotice(_ group: String, channel: String, joined: Bool) -> (keys: [RedisArgument], args: [RedisArgument]) {
        let process = ChannelNames.nonLocalName(channel)
        let notice: Message = ["group": .string(group), "channel": .string(channel), "joined": .bool(joined)]
        return (
            [
                .key(configuration.prefix, ChannelNames.membershipNoticeList(forProcess: process)),
                .key(configuration.statsPrefix, process, ":reader"),
            ],
            [.uuidKey(prefix: configuration.prefix), .bytes(seal(notice)), .integer(configuration.expirySeconds)]
        )
    }
}

extension GroupMembership {
    /// The membership a journal entry (`group channel`) records; nil for anything else.
    init?(journalEntry entry: String) {
        guard let space = entry.firstIndex(of: " ") else { return nil }
        self.init(group: String(entry[..<space]), channel: String(entry[entry.index(after: space)...]))
    }
}

extension Scripts {
    /// A group add or discard, then a membership notice to the member's server: the commands
    /// (each as its argument count and its arguments, from ARGV[4] on) run in order, then, when
    /// the member's process channel has a reader that reads bundles (KEYS[2] holds `bundles`:
    /// this layer's servers, never a Daphne 1.4), the notice body (ARGV[2]) is stored under
    /// ARGV[1] and pushed on the server's notice list (KEYS[1]; its newest 10,000 kept),
    /// expiring after ARGV[3] seconds. Notices take no capacity check: they are small, and a
    /// join must not fail because its server is busy. The server
    /// keeps its own view of its sockets' groups from them, and its group keeper puts those back
    /// when the group's set and the journal vanished together (evicted under `maxmemory`).
    /// Returns 1 when the notice was pushed.
    static let changeAndNotify = LuaScript(
        name: "changeAndNotify",
        source: """
            local i = 4
            while i <= #ARGV do
                local n = tonumber(ARGV[i])
                redis.call(unpack(ARGV, i + 1, i + n))
                i = i + n + 1
            end
            if redis.call('GET', KEYS[2]) ~= 'bundles' then return 0 end
            redis.call('SET', ARGV[1], ARGV[2], 'EX', ARGV[3])
            redis.call('RPUSH', KEYS[1], ARGV[1])
            -- A server that does not read them (one older than notices): at most the newest 10,000.
            redis.call('LTRIM', KEYS[1], -10000, -1)
            redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]) + 1)
            return 1
            """)

    /// KEYS: the journal. ARGV: the layer prefix, group expiry, then (group, channel, field,
    /// value) quadruples from a server's last view of its vanished journal: each is written
    /// back only if its group set still holds the channel; the mark with them. The 1-based
    /// indexes of the quadruples written.
    static let journalRewrite = LuaScript(
        name: "journalRewrite",
        source: """
            local kept = {}
            local n = 0
            for i = 3, #ARGV, 4 do
                n = n + 1
                if redis.call('ZSCORE', ARGV[1] .. ':group:' .. ARGV[i], ARGV[i + 1]) then
                    redis.call('HSET', KEYS[1], ARGV[i + 2], ARGV[i + 3])
                    kept[#kept + 1] = n
                end
            end
            if #kept > 0 then
                redis.call('HSET', KEYS[1], '~', '')
                redis.call('EXPIRE', KEYS[1], ARGV[2])
            end
            return kept
            """)

    /// KEYS: the journal. ARGV: the layer prefix, now, group expiry, the expiry cutoff, then
    /// (mode, group, channel, journal field) quadruples: mode `f` (a socket that follows the
    /// group) and mode `v` (from the server's own view, its journal having vanished) are put
    /// back whenever missing or expired, mode `j` only while its journal field is there (a
    /// discard that came after the journal was read wins). The triples (mode, group, channel)
    /// added.
    static let groupKeep = LuaScript(
        name: "groupKeep",
        source: """
            local added = {}
            for i = 5, #ARGV, 4 do
                local mode, group, channel = ARGV[i], ARGV[i + 1], ARGV[i + 2]
                if mode ~= 'j' or redis.call('HEXISTS', KEYS[1], ARGV[i + 3]) == 1 then
                    local gkey = ARGV[1] .. ':group:' .. group
                    local score = redis.call('ZSCORE', gkey, channel)
                    if not score or tonumber(score) < tonumber(ARGV[4]) then
                        redis.call('ZADD', gkey, ARGV[2], channel)
                        redis.call('EXPIRE', gkey, ARGV[3])
                        redis.call('DEL', ARGV[1] .. ':groupcache:' .. group)
                        added[#added + 1] = mode
                        added[#added + 1] = group
                        added[#added + 1] = channel
                    end
                end
            end
            return added
            """)
}
