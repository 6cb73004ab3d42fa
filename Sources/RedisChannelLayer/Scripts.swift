/// The Lua scripts of the Redis layer. Each keeps one operation to one round trip.
enum Scripts {
    /// Send with the capacity check and the statistics counters, atomically.
    /// KEYS: body, list, channel messages_count, global messages_count,
    ///       channel channel_full_count, global channel_full_count
    /// ARGV: body bytes, expiry, capacity, channel stats expiry, global stats expiry
    /// Returns 1 when sent, 0 when the channel is full.
    static let send = LuaScript(
        name: "send",
        source: """
            if redis.call('LLEN', KEYS[2]) >= tonumber(ARGV[3]) then
                redis.call('INCR', KEYS[5])
                redis.call('EXPIRE', KEYS[5], ARGV[4])
                redis.call('INCR', KEYS[6])
                redis.call('EXPIRE', KEYS[6], ARGV[5])
                return 0
            end
            redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
            redis.call('RPUSH', KEYS[2], KEYS[1])
            redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]) + 1)
            redis.call('INCR', KEYS[3])
            redis.call('EXPIRE', KEYS[3], ARGV[4])
            redis.call('INCR', KEYS[4])
            redis.call('EXPIRE', KEYS[4], ARGV[5])
            return 1
            """)

    /// Several messages to one channel at once, in their order: as `send` for each, as long as
    /// the list has room (the same keys, bodies and counters as that many sends; a Python
    /// reader cannot tell). KEYS: the list, its and the global sent counters, its and the global
    /// full counters, the sender's receipt, then one body key per message; ARGV: expiry,
    /// capacity, the two counters' expiries, the receipt's expiry (0: none), the run's number,
    /// then the bodies. Returns how many were stored (the first ones); a message left out for
    /// want of room counts once as the channel being full. The receipt holds `<run>:<stored>`
    /// for the sender's last stored run: the same run again (its first try stored, its reply
    /// lost) answers with what that try stored, and nothing is stored again.
    static let sendRun = LuaScript(
        name: "sendRun",
        source: """
            local keep = tonumber(ARGV[5])
            if keep > 0 then
                local done = redis.call('GET', KEYS[6])
                if done then
                    local run, stored = string.match(done, '^(%d+):(%d+)$')
                    if run == ARGV[6] then return tonumber(stored) end
                end
            end
            local count = #KEYS - 6
            local room = tonumber(ARGV[2]) - redis.call('LLEN', KEYS[1])
            local stored = math.max(0, math.min(count, room))
            for i = 1, stored do
                redis.call('SET', KEYS[6 + i], ARGV[6 + i], 'EX', ARGV[1])
                redis.call('RPUSH', KEYS[1], KEYS[6 + i])
            end
            if keep > 0 and stored > 0 then redis.call('SET', KEYS[6], ARGV[6] .. ':' .. stored, 'EX', keep) end
            if stored > 0 then
                redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]) + 1)
                redis.call('INCRBY', KEYS[2], stored)
                redis.call('EXPIRE', KEYS[2], ARGV[3])
                redis.call('INCRBY', KEYS[3], stored)
                redis.call('EXPIRE', KEYS[3], ARGV[4])
            end
            if stored < count then
                redis.call('INCR', KEYS[4])
                redis.call('EXPIRE', KEYS[4], ARGV[3])
                redis.call('INCR', KEYS[5])
                redis.call('EXPIRE', KEYS[5], ARGV[4])
            end
            return stored
            """)

    /// Non-blocking receive: pop from the lists in the given order, read and delete the body,
    /// skipping bodies that have already expired. Returns {list, body} or nil.
    static let receive = LuaScript(
        name: "receive",
        source: """
            for i = 1, #KEYS do
                while true do
                    local bodyKey = redis.call('LPOP', KEYS[i])
                    if not bodyKey then break end
                    local body = redis.call('GET', bodyKey)
                    if body then
                        redis.call('DEL', bodyKey)
                        return {KEYS[i], body}
                    end
                end
            end
            return false
            """)

    /// Lua: `takeFrom(from, list, out, limit)` pops body keys from the list `from` until `out`
    /// holds `limit` entries, appending (`list`, body) for each body still there and deleting
    /// it; returns how many keys it popped and how many of their bodies had expired.
    static let takeFromLua = """
        local function takeFrom(from, list, out, limit)
            local popped, expired = 0, 0
            while #out < limit do
                local bodyKey = redis.call('LPOP', from)
                if not bodyKey then break end
                popped = popped + 1
                local body = redis.call('GET', bodyKey)
                if body then
                    redis.call('DEL', bodyKey)
                    out[#out + 1] = list
                    out[#out + 1] = body
                else
                    expired = expired + 1
                end
            end
            return popped, expired
        end

        """

    /// Pops up to ARGV[1] messages from the lists in KEYS, fairly: first each list up to an
    /// equal share (lists taken in turn from the ARGV[2]-th, so a batch smaller than the number
    /// of busy lists does not always go to the first), then whatever room is left, in the same
    /// turn. A flood on one list (a storm of connects) cannot take every batch from the others.
    /// The last ARGV[3] lists (a connection's last message: `*.disconnect`) get no share: they
    /// fill what room the others leave, so a socket's disconnect is not taken while connects
    /// queued before it wait (with every list deferred, all share). The result keeps the lists'
    /// order, each list's messages in queue order: {bodies found expired, list, body, list, body, ...}.
    static let receiveMany = LuaScript(
        name: "receiveMany",
        source: takeFromLua + receiveManyLua + """
            local result = {0}
            result[1] = receiveMany(KEYS, tonumber(ARGV[1]), tonumber(ARGV[2] or '0'), tonumber(ARGV[3] or '0'), result)
            return result
            """)

    /// `receiveMany(lists, max, first, deferred, result, headList, headBody)`: the fair take of
    /// ``receiveMany`` over the list names in `lists`, appended to `result` as {list, body, ...};
    /// a message already popped from `headList` (its body `headBody`) goes in first among its
    /// list's, where that list comes in the order.
    static let receiveManyLua = """
        local function receiveMany(lists, max, first, deferred, result, headList, headBody)
            local n = #lists
            if max <= 0 or n == 0 then
                if headBody then
                    result[#result + 1] = headList
                    result[#result + 1] = headBody
                end
                return 0
            end
            if deferred >= n then deferred = 0 end
            local shared = n - deferred
            first = first % shared
            local share = math.ceil(max / shared)
            local per, dry, taken, expired = {}, {}, 0, 0
            for i = 1, n do per[i] = {} end
            for j = 0, shared - 1 do
                local i = (first + j) % shared + 1
                local want = math.min(share, max - taken)
                if want > 0 then
                    local _, gone = takeFrom(lists[i], lists[i], per[i], 2 * want)
                    expired = expired + gone
                    dry[i] = #per[i] < 2 * want
                    taken = taken + #per[i] / 2
                end
            end
            for j = 0, n - 1 do
                if taken >= max then break end
                local i = j < shared and (first + j) % shared + 1 or j + 1
                if not dry[i] then
                    local out = per[i]
                    local before = #out
                    local _, gone = takeFrom(lists[i], lists[i], out, before + 2 * (max - taken))
                    expired = expired + gone
                    taken = taken + (#out - before) / 2
                end
            end
            for i = 1, n do
                if headBody and lists[i] == headList then
                    result[#result + 1] = headList
                    result[#result + 1] = headBody
                    headBody = nil
                end
                for _, v in ipairs(per[i]) do result[#result + 1] = v end
            end
            if headBody then
                result[#result + 1] = headList
                result[#result + 1] = headBody
            end
            return expired
        end

        """

    /// After a `BLPOP` on several lists: takes the body it popped (KEYS[1], from the list
    /// ARGV[4]) and up to ARGV[1] more messages of all the lists (KEYS[2...], fairly, as
    /// ``receiveMany`` with ARGV[2] and ARGV[3]), the popped one first among its list's and that
    /// list in its place (a socket's disconnect popped by the wait still comes after its frames
    /// taken with it): {bodies found expired (the popped one included), list, body, ...}.
    /// Fewer than asked means every list was empty, so the next receive waits in `BLPOP`
    /// instead of looking first (a round trip that found nothing, and ran ahead of the
    /// consumer's first command when one message came).
    static let takeBodyAndMany = LuaScript(
        name: "takeBodyAndMany",
        source: takeFromLua + receiveManyLua + """
            local out = {0}
            local body = redis.call('GET', KEYS[1])
            if body then redis.call('DEL', KEYS[1]) end
            local lists = {}
            for i = 2, #KEYS do lists[i - 1] = KEYS[i] end
            local expired = receiveMany(lists, tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), out, ARGV[4], body)
            out[1] = expired + (body and 0 or 1)
            return out
            """)

    /// After BLPOP: takes the popped body (KEYS[1]) and up to ARGV[1] more messages of its list
    /// (KEYS[2]): {body or false, list, body, list, body, ...}.
    static let takeBodyAndMore = LuaScript(
        name: "takeBodyAndMore",
        source: takeFromLua + """
            local out = {false}
            local body = redis.call('GET', KEYS[1])
            if body then
                redis.call('DEL', KEYS[1])
                out[1] = body
            end
            takeFrom(KEYS[2], KEYS[2], out, 1 + 2 * tonumber(ARGV[1]))
            return out
            """)

    /// Takes from a list (KEYS[2]) and its in-hand list (KEYS[1]), in hand first: up to ARGV[1]
    /// messages, the bodies read and deleted. Pipelined behind `BLMOVE list inhand`, it takes
    /// the key just moved (and any a reader left in hand when its connection died between the
    /// two) and, only when it found one, more of the list; with ARGV[2] = 1 (a take without
    /// waiting) it takes from the list whatever was in hand. An in-hand list left non-empty
    /// (more than ARGV[1] were there) expires after ARGV[3] seconds, as its bodies do.
    /// {expired bodies, list, body, list, body, ...}.
    static let takeInHand = LuaScript(
        name: "takeInHand",
        source: takeFromLua + """
            local out = {0}
            local limit = 1 + 2 * tonumber(ARGV[1])
            local fromHand, expired = takeFrom(KEYS[1], KEYS[2], out, limit)
            out[1] = expired
            -- Stopped by the limit, not by an empty hand: what is left expires as its bodies do.
            if #out >= limit and redis.call('EXISTS', KEYS[1]) == 1 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
            if fromHand > 0 or ARGV[2] == '1' then takeFrom(KEYS[2], KEYS[2], out, limit) end
            return out
            """)

    /// Reads and deletes a body popped by BLPOP. Returns the body or nil if it expired.
    static let takeBody = LuaScript(
        name: "takeBody",
        source: """
            local body = redis.call('GET', KEYS[1])
            if body then redis.call('DEL', KEYS[1]) end
            return body
            """)

    /// Current group members after dropping expired ones.
    /// KEYS: group, its send cache (deleted when members expired). ARGV: cutoff (now - group_expiry).
    static let groupMembers = LuaScript(
        name: "groupMembers",
        source: """
            if redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[1]) > 0 then redis.call('DEL', KEYS[2]) end
            return redis.call('ZRANGE', KEYS[1], 0, -1)
            """)

    /// Sends one message to many channels on this shard, skipping full ones: a whole group
    /// send in one round trip. Members come from the group's sorted set (mode "group", KEYS[1])
    /// or from the argument list (mode "list"); in mode "bodies" (encrypted layers, whose
    /// bodies only the client can make) the arguments are (list name, body, members reached)
    /// triples, stored as they are.
    ///
    /// Members on a process channel whose reader registered as reading bundles (the string
    /// `bundles` at `<stats prefix><process channel>:reader`) get one message per process
    /// channel whose `__asgi_channel__` is the list of those members: fan-out costs one stored
    /// message per server process, not per member. Every other member (a Daphne 1.4 reply
    /// channel, a `?` or plain channel) gets its own message, exactly as asgi_redis writes it.
    ///
    /// In mode "group" the split of the members of a group of 32 or more is kept in the
    /// group's cache (KEYS[4], a hash: each bundle's process channel and member count, and the
    /// other members; each bundle's encoded member list in the string `KEYS[4]:<i>`, which
    /// a send copies inside Redis with `COPY`, then writes the message after it: a Lua string
    /// costs a nanosecond a byte to make, and a bundle for 500 members is 20 KB), stamped with the set's
    /// fingerprint (size, when its expiry was last set, newest and oldest member with their
    /// scores): the next send of an
    /// unchanged group reads it instead of the whole set, so a room of thousands costs a few
    /// commands, not a Lua string and a table entry per member. This layer's own writers delete
    /// the cache whenever they change a group; a change by another process (asgi_redis adds
    /// scored with its clock and sets the set's expiry, removes, expiry) changes the
    /// fingerprint (which holds when the expiry was last set, on Redis 7); a cache older than
    /// ARGV[13 + 2 * patterns] seconds (from Redis's clock) is rebuilt anyway.
    /// KEYS: group (or the empty string), global messages_count, global channel_full_count,
    ///       (mode "group") the group's cache
    /// ARGV: mode, cutoff, prefix, stats prefix, expiry, channel stats expiry,
    ///       global stats expiry, plain body, process-channel body head, key base (24 hex),
    ///       default capacity, pattern count N, then N (lua pattern, capacity) pairs,
    ///       then (mode "group") the cache's longest life in seconds, or (mode "list") the
    ///       member names.
    /// Returns {messages stored, sends refused as full, members reached, members missed}, then
    /// (list, body, member count) for each message refused on a process channel (`…!`), so
    /// the sender can offer it again in mode "bodies" (backpressure instead of a drop).
    static let sendMany = LuaScript(name: "sendMany", source: sendManySource)

    /// `sendMany` in mode "group" that first appends a publication to the group's history and
    /// makes the message it sends from it: one round trip for `Group.publish` instead of two.
    /// KEYS: as `sendMany` in mode "group", then the history's meta, stream and ids (see
    /// `historyAppend`). ARGV: as `sendMany` in mode "group" (the two bodies empty), then the
    /// candidate epoch, the entry's body, the history's size, ttl, meta expiry, now, the append's
    /// id (an id already appended in this epoch takes the offset it took, as `historyAppend`),
    /// the text's tail (`PublicationText.tail`) and the group's name. The message is
    /// `{"text": <head><tail>, "publication": {"group", "offset", "epoch"}}`, the head being
    /// `{"offset":<offset>,"epoch":"<epoch>"`. Returns the offset and the epoch, then what
    /// `sendMany` returns.
    static let publishMany = LuaScript(
        name: "publishMany",
        source:
            sendManySource
            .replacing("-- (publish: the history append)", with: publishAppend)
            .replacing(
                "-- (publish: the position first)", with: "table.insert(result, 1, published[2]); table.insert(result, 1, published[1])"))

    private static let publishAppend = """
        local q = 14 + 2 * patternCount
        local epoch = redis.call('HGET', KEYS[5], 'epoch')
        if not epoch then
            epoch = ARGV[q]
            redis.call('DEL', KEYS[6])
            redis.call('HSET', KEYS[5], 'epoch', epoch, 'offset', 0)
        end
        local id = epoch .. ':' .. ARGV[q + 6]
        local offset = tonumber(redis.call('ZSCORE', KEYS[7], id))
        if not offset then
            offset = redis.call('HINCRBY', KEYS[5], 'offset', 1)
            redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[q + 2], string.format('%d', offset) .. '-1', 'b', ARGV[q + 1], 't', ARGV[q + 5])
            redis.call('EXPIRE', KEYS[6], ARGV[q + 3])
            redis.call('EXPIRE', KEYS[5], ARGV[q + 4])
            redis.call('ZADD', KEYS[7], offset, id)
            redis.call('ZREMRANGEBYRANK', KEYS[7], 0, -257)
            redis.call('EXPIRE', KEYS[7], ARGV[q + 3])
        end
        published = {offset, epoch}
        local function str(s)
            local n = string.len(s)
            if n <= 31 then return string.char(160 + n) .. s end
            if n <= 255 then return string.char(217, n) .. s end
            if n <= 65535 then return string.char(218, math.floor(n / 256), n % 256) .. s end
            return string.char(219, math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
                               math.floor(n / 256) % 256, n % 256) .. s
        end
        local function uint(n)
            if n < 128 then return string.char(n) end
            if n < 256 then return string.char(204, n) end
            if n < 65536 then return string.char(205, math.floor(n / 256), n % 256) end
            if n < 4294967296 then
                return string.char(206, math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
                                   math.floor(n / 256) % 256, n % 256)
            end
            local high, low = math.floor(n / 4294967296), n % 4294967296
            return string.char(207, math.floor(high / 16777216) % 256, math.floor(high / 65536) % 256,
                               math.floor(high / 256) % 256, high % 256, math.floor(low / 16777216) % 256,
                               math.floor(low / 65536) % 256, math.floor(low / 256) % 256, low % 256)
        end
        local fieldBytes = str('text') .. str('{"offset":' .. string.format('%d', offset) .. ',"epoch":"' .. epoch .. '"' .. ARGV[q + 7])
            .. str('publication') .. string.char(131) .. str('group') .. str(ARGV[q + 8]) .. str('offset') .. uint(offset)
            .. str('epoch') .. str(epoch)
        plainBody = string.char(130) .. fieldBytes
        localHead = string.char(131) .. fieldBytes .. str('__asgi_channel__')
        """

    /// The source of `sendMany`, with two hooks `publishMany` fills.
    private static let sendManySource = """
        local mode = ARGV[1]
        local prefix, statsPrefix = ARGV[3], ARGV[4]
        local expiry = tonumber(ARGV[5])
        local channelStatsExpiry, globalStatsExpiry = ARGV[6], ARGV[7]
        local plainBody, localHead, keyBase = ARGV[8], ARGV[9], ARGV[10]
        local defaultCapacity = tonumber(ARGV[11])
        local patternCount = tonumber(ARGV[12])
        local patterns = {}
        for i = 1, patternCount do
            patterns[i] = {ARGV[12 + 2 * i - 1], tonumber(ARGV[12 + 2 * i])}
        end
        local function strHeader(n)
            if n <= 31 then return string.char(160 + n) end
            if n <= 255 then return string.char(217, n) end
            return string.char(218, math.floor(n / 256), n % 256)
        end
        local function arrayHeader(n)
            if n <= 15 then return string.char(144 + n) end
            if n <= 65535 then return string.char(220, math.floor(n / 256), n % 256) end
            return string.char(221, math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
                               math.floor(n / 256) % 256, n % 256)
        end
        local published
        -- (publish: the history append)
        local sent, full, reached, missed = 0, 0, 0, 0
        local refused = {}
        local serial = 0
        -- The message's fields without their map header, and the header of a map with one
        -- more entry (a bundle's member list first, then the fields): for cached bundles.
        local fields, bundleHead
        local function messageParts()
            if fields then return true end
            local first = string.byte(plainBody, 1)
            local count, from
            if first >= 128 and first <= 143 then
                count, from = first - 128, 2
            elseif first == 222 then
                count, from = string.byte(plainBody, 2) * 256 + string.byte(plainBody, 3), 4
            else
                return false
            end
            -- A map of 65,535 fields has no room for one more in a map16 header.
            if count >= 65535 then return false end
            fields = string.sub(plainBody, from)
            bundleHead = string.char(222, math.floor((count + 1) / 256), (count + 1) % 256)
            return true
        end
        -- A cached bundle's body as bytes (a refused send is handed back whole).
        local function cachedBody(partKey)
            return bundleHead .. string.sub(redis.call('GET', partKey), 4) .. fields
        end
        local function store(listName, body, count)
            local capacity = defaultCapacity
            for _, p in ipairs(patterns) do
                if string.find(listName, p[1]) then capacity = p[2]; break end
            end
            local listKey = prefix .. listName
            if redis.call('LLEN', listKey) >= capacity then
                full = full + 1
                missed = missed + count
                local fullKey = statsPrefix .. listName .. ':channel_full_count'
                redis.call('INCR', fullKey)
                redis.call('EXPIRE', fullKey, channelStatsExpiry)
                if string.sub(listName, -1) == '!' then
                    if type(body) == 'table' then body = cachedBody(body[1]) end
                    refused[#refused + 1] = listName
                    refused[#refused + 1] = body
                    refused[#refused + 1] = count
                end
                return
            end
            serial = serial + 1
            local bodyKey = prefix .. keyBase .. string.format('%08x', serial)
            if type(body) == 'table' then
                -- A cached member list, copied inside Redis (Redis 6.2+); the message after it.
                local copied = redis.pcall('COPY', body[1], bodyKey)
                if copied == 1 then
                    redis.call('SETRANGE', bodyKey, 0, bundleHead)
                    redis.call('APPEND', bodyKey, fields)
                    redis.call('EXPIRE', bodyKey, expiry)
                else
                    redis.call('SET', bodyKey, cachedBody(body[1]), 'EX', expiry)
                end
            else
                redis.call('SET', bodyKey, body, 'EX', expiry)
            end
            redis.call('RPUSH', listKey, bodyKey)
            redis.call('EXPIRE', listKey, expiry + 1)
            local countKey = statsPrefix .. listName .. ':messages_count'
            redis.call('INCR', countKey)
            redis.call('EXPIRE', countKey, channelStatsExpiry)
            sent = sent + 1
            reached = reached + count
        end
        local readers = {}
        local function readerForm(listName)
            local form = readers[listName]
            if form == nil then
                form = redis.call('GET', statsPrefix .. listName .. ':reader') or ''
                readers[listName] = form
            end
            return form
        end
        -- A member that gets a message of its own.
        local function storeOne(member)
            local bang = string.find(member, '!', 1, true)
            if bang then
                store(string.sub(member, 1, bang), localHead .. strHeader(string.len(member)) .. member, 1)
            else
                store(member, plainBody, 1)
            end
        end
        -- Deletes the cache: its hash and its member lists (as many as the hash says, or as the
        -- last rebuild wrote: `:n`, which the writers that delete only the hash leave).
        local function dropCache()
            local n = tonumber(redis.call('HGET', KEYS[4], 'n') or '0') or 0
            local written = tonumber(redis.call('GET', KEYS[4] .. ':n') or '0') or 0
            if written > n then n = written end
            redis.call('DEL', KEYS[4], KEYS[4] .. ':n')
            for i = 1, n do redis.call('DEL', KEYS[4] .. ':' .. i) end
        end
        -- The cached split, when it is still the group's: {lists, encoded members, counts},
        -- the other members, and nothing stored yet; nil when the group changed.
        local function cachedSplit(fingerprint, now, longest)
            local head = redis.call('HMGET', KEYS[4], 'fp', 'n', 'o', 'at')
            if head[1] ~= fingerprint or not head[2] or not head[3] or not head[4] then return nil end
            local age = now - tonumber(head[4])
            if age < 0 or age >= longest then return nil end
            local k = tonumber(head[2])
            local lists, parts, counts = {}, {}, {}
            if k > 0 then
                if not messageParts() then return nil end
                local names, partKeys = {}, {}
                for i = 1, k do
                    names[#names + 1] = 'L' .. i
                    names[#names + 1] = 'C' .. i
                    partKeys[i] = KEYS[4] .. ':' .. i
                end
                local values = redis.call('HMGET', KEYS[4], unpack(names))
                if redis.call('EXISTS', unpack(partKeys)) ~= k then return nil end
                for i = 1, k do
                    local listName, count = values[2 * i - 1], values[2 * i]
                    if not listName or not count or readerForm(listName) ~= 'bundles' then return nil end
                    lists[i], parts[i], counts[i] = listName, {partKeys[i]}, tonumber(count)
                end
            end
            return lists, parts, counts, head[3]
        end
        local members
        local fingerprint, now, longest
        if mode == 'group' then
            local removed = redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[2])
            local card = redis.call('ZCARD', KEYS[1])
            if card > 0 and card < 32 then
                -- A small group costs less read whole than through its cache; a cache from
                -- when it was larger goes (it must not match again when the group grows back).
                members = redis.call('ZRANGE', KEYS[1], 0, -1)
                dropCache()
            elseif card > 0 then
                local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
                local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
                -- When the set's expiry was last set, to the millisecond (Redis 7): asgi_redis
                -- and this layer set it with every add.
                local stamp = redis.pcall('PEXPIRETIME', KEYS[1])
                if type(stamp) ~= 'number' then stamp = '' end
                fingerprint = card .. '\\n' .. stamp .. '\\n' .. newest[1] .. '\\n' .. newest[2] .. '\\n' .. oldest[1] .. '\\n' .. oldest[2]
                local time = redis.call('TIME')
                now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
                longest = tonumber(ARGV[13 + 2 * patternCount]) * 1000
                if removed == 0 then
                    local lists, parts, counts, others = cachedSplit(fingerprint, now, longest)
                    if lists then
                        for i = 1, #lists do store(lists[i], parts[i], counts[i]) end
                        for member in string.gmatch(others, '[^\\n]+') do storeOne(member) end
                        fingerprint = nil
                        members = {}
                    end
                end
                if fingerprint then members = redis.call('ZRANGE', KEYS[1], 0, -1) end
            else
                members = {}
            end
        elseif mode == 'bodies' then
            members = {}
        else
            members = {}
            for i = 13 + 2 * patternCount, #ARGV do members[#members + 1] = ARGV[i] end
        end
        local bundles, bundleOrder = {}, {}
        local others = {}
        for _, member in ipairs(members) do
            local bang = string.find(member, '!', 1, true)
            if bang then
                local listName = string.sub(member, 1, bang)
                if readerForm(listName) == 'bundles' then
                    if not bundles[listName] then
                        bundles[listName] = {}
                        bundleOrder[#bundleOrder + 1] = listName
                    end
                    local list = bundles[listName]
                    list[#list + 1] = member
                else
                    others[#others + 1] = member
                    storeOne(member)
                end
            else
                others[#others + 1] = member
                storeOne(member)
            end
        end
        -- One header string per member length (a process's members mostly share one).
        local headers = {}
        local cache, partsToCache = {}, {}
        for index, listName in ipairs(bundleOrder) do
            local list = bundles[listName]
            local parts = {arrayHeader(#list)}
            local k = 1
            for i = 1, #list do
                local member = list[i]
                local length = #member
                local header = headers[length]
                if not header then
                    header = strHeader(length)
                    headers[length] = header
                end
                parts[k + 1] = header
                parts[k + 2] = member
                k = k + 2
            end
            local part = table.concat(parts)
            -- The member list first, as a cached bundle has it (so the reader's table of
            -- lists knows it from this first message on); the message's fields after it.
            if messageParts() then
                store(listName, bundleHead .. string.char(176) .. '__asgi_channel__' .. part .. fields, #list)
            else
                store(listName, localHead .. part, #list)
            end
            if fingerprint then
                cache[#cache + 1] = 'L' .. index
                cache[#cache + 1] = listName
                cache[#cache + 1] = 'C' .. index
                cache[#cache + 1] = #list
                -- The member list first (a map header the send overwrites, the key, the list).
                partsToCache[#partsToCache + 1] = string.char(222, 0, 0, 176) .. '__asgi_channel__' .. part
            end
        end
        -- Past a thousand server processes in one group the split is not cached (Lua's
        -- unpack limit): every send reads the set, as without the cache.
        if fingerprint and #bundleOrder > 1000 then
            fingerprint = nil
            dropCache()
        end
        if fingerprint then
            dropCache()
            redis.call('HSET', KEYS[4], 'fp', fingerprint, 'n', #bundleOrder, 'o', table.concat(others, '\\n'), 'at', now)
            if #cache > 0 then redis.call('HSET', KEYS[4], unpack(cache)) end
            local ttl = redis.call('TTL', KEYS[1])
            if ttl <= 0 then ttl = 86400 end
            redis.call('EXPIRE', KEYS[4], ttl)
            for i, part in ipairs(partsToCache) do redis.call('SET', KEYS[4] .. ':' .. i, part, 'EX', ttl) end
            redis.call('SET', KEYS[4] .. ':n', #partsToCache, 'EX', ttl)
        end
        if mode == 'bodies' then
            for i = 13 + 2 * patternCount, #ARGV, 3 do
                store(ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]))
            end
        end
        if sent > 0 then
            redis.call('INCRBY', KEYS[2], sent)
            redis.call('EXPIRE', KEYS[2], globalStatsExpiry)
        end
        if full > 0 then
            redis.call('INCRBY', KEYS[3], full)
            redis.call('EXPIRE', KEYS[3], globalStatsExpiry)
        end
        local result = {sent, full, reached, missed}
        for _, item in ipairs(refused) do result[#result + 1] = item end
        -- (publish: the position first)
        return result
        """

    /// Registers (or renews) the reader of a process channel as one that reads bundles.
    /// KEYS: the reader key. ARGV: form, seconds to live.
    /// Returns 1 when the key was there (renewed), 0 when it had to be created.
    /// Renews a reader's registration (KEYS[1]) and reads the Redis's birth mark (KEYS[2],
    /// made once, with no expiry, ARGV[3] when missing): {registration existed, birth mark}.
    static let registerReader = LuaScript(
        name: "registerReader",
        source: """
            local existed = redis.call('EXISTS', KEYS[1])
            redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
            redis.call('SET', KEYS[2], ARGV[3], 'NX')
            return {existed, redis.call('GET', KEYS[2])}
            """)
}

extension Scripts {
    /// Redis's clock in milliseconds, for the lease scripts.
    private static let leaseNow = """
        local clock = redis.call('TIME')
        local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
        """

    /// Takes or renews a lease. KEYS: the pool's set, its notes. ARGV: name, note, milliseconds.
    /// Both keys live a day past the last hold: a pool nobody uses any more goes.
    static let holdLease = LuaScript(
        name: "holdLease",
        source: leaseNow + """
            redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
            redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
            redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) + 86400000)
            redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]) + 86400000)
            return 1
            """)

    /// Takes a lease only when there is none (held or lapsed): KEYS and ARGV as `holdLease`.
    /// Returns 1 when taken, 0 when a lease was there.
    static let takeFreeLease = LuaScript(
        name: "takeFreeLease",
        source: leaseNow + """
            if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
            redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
            redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
            redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) + 86400000)
            redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]) + 86400000)
            return 1
            """)

    /// Claims up to ARGV[1] lapsed leases for ARGV[2] milliseconds each. KEYS: the pool's set,
    /// its notes. Returns name, note, name, note, ...
    static let claimLapsedLeases = LuaScript(
        name: "claimLapsedLeases",
        source: leaseNow + """
            local names = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
            local result = {}
            for _, name in ipairs(names) do
                redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), name)
                result[#result + 1] = name
                result[#result + 1] = redis.call('HGET', KEYS[2], name) or ''
            end
            return result
            """)

    /// Gives up a lease. KEYS: the pool's set, its notes. ARGV: name, and "" (whoever holds
    /// it) or "=" and the note it must still have. Returns 1 when released.
    static let releaseLease = LuaScript(
        name: "releaseLeaseIfNote",
        source: """
            if ARGV[2] ~= '' and ('=' .. (redis.call('HGET', KEYS[2], ARGV[1]) or '')) ~= ARGV[2] then return 0 end
            redis.call('ZREM', KEYS[1], ARGV[1])
            redis.call('HDEL', KEYS[2], ARGV[1])
            return 1
            """)
}

/// Converts a shell glob to an anchored Lua pattern for the group-send script.
enum GlobPatternLua {
    static func luaPattern(_ glob: String) -> String {
        var out = "^"
        var inSet = false
        var setStart = false
        for c in glob {
            if inSet {
                if c == "]" && !setStart { out.append("]"); inSet = false; continue }
                if setStart && c == "!" { out.append("^"); setStart = false; continue }
                setStart = false
                if c == "-" { out.append("-") } else if c.isLetter || c.isNumber { out.append(c) } else { out.append("%"); out.append(c) }
                continue
            }
            switch c {
            case "*": out.append(".*")
            case "?": out.append(".")
            case "[": out.append("["); inSet = true; setStart = true
            default:
                if c.isLetter || c.isNumber { out.append(c) } else { out.append("%"); out.append(c) }
            }
        }
        if inSet { return "^" + glob.map { $0.isLetter || $0.isNumber ? String($0) : "%" + String($0) }.joined() + "$" }
        return out + "$"
    }
}
