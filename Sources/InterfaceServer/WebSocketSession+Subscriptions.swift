import ASGI
import CoreMetrics
import Logging
import NIOCore
import OrderedCollections

/// What a socket follows: groups with history (recovered after a reconnect, then in offset
/// order) and groups where it is present.
struct SessionSubscriptions {
    var sequencer = PublicationSequencer()
    var retention: [String: HistoryRetention] = [:]
    var gapTimers: [String: Scheduled<Void>] = [:]
    /// When the history reads for a group's gap began failing in a row (the layer busy or
    /// away), and how many failed.
    var gapReadFailures: [String: (since: NIODeadline, count: Int)] = [:]
    /// When each followed group's next tail check is due (looked at by the event loop's tail
    /// wheel), and where its publications stood at the last one
    /// (``PublicationSequencer/progress(_:)``: moved since means not quiet yet).
    var tailDue: [String: NIODeadline] = [:]
    var checkedProgress: [String: PublicationSequencer.Progress] = [:]
    /// Groups where this socket is tracked as present, and as whom.
    var presence: [String: PresenceConnection] = [:]
    /// Each group's latest presence call: the next waits for it (a join and a leave in order).
    var presenceTasks: [String: Task<Void, Never>] = [:]
}

/// The socket's part of history and presence. The application asks through its reply channel
/// (the framework's `follow` and `Presence.track`):
///
/// - `{"follow": {"group", "offset"?, "epoch"?, "size", "ttl"}}`: the server adds the socket to
///   the group, reads the history after the position (or only its top), writes what was missed,
///   then `{"type":"recovered","complete":…,"offset":…,"epoch":"…"}` (or, without a position,
///   `{"type":"position",…}`), then the live publications that came meanwhile, each once, in
///   offset order;
/// - `{"presence": {"group", "user", "meta"}}`: tracks the socket as present (renewed while it
///   is open, left when it closes), writes `{"type":"presence","users":[…],"version":N}` to it and
///   sends a `presence_diff` (with each user's change's version) to the group when the user is new there; `{"presence": {"group", "leave": true}}`
///   stops.
///
/// A publication (`websocket.send` with `publication: {group, offset, epoch}`) of a followed
/// group goes through the ``PublicationSequencer``.
extension WebSocketSession {
    /// Handles a reply that is about subscriptions; false for an ordinary one.
    func subscriptionReply(_ reply: Message) -> Bool {
        // One reply may carry both (an accept with the socket's subscriptions): follow first.
        let follow = reply["follow"]?.mapValue
        let presence = reply["presence"]?.mapValue
        if let follow { self.follow(follow) }
        if let presence { presenceControl(presence) }
        if follow != nil || presence != nil { return true }
        guard let publication = reply["publication"]?.mapValue else { return false }
        var plain = reply
        plain.removeValue(forKey: "publication")
        guard let group = publication["group"]?.stringValue, let offset = publication["offset"]?.intValue, offset > 0,
            let epoch = publication["epoch"]?.stringValue,
            livePublication(
                .init(
                    group: StringInterner.names.intern(group), offset: UInt64(offset), epoch: StringInterner.names.intern(epoch),
                    plain: plain, send: nil))
        else {
            deliverReply(plain)
            return true
        }
        return true
    }

    /// A live publication of a followed group, in offset order through the socket's sequencer;
    /// taken apart once for a hand-over's members (``ReplyPayloads/publication(_:)``, with the
    /// parsed send) or by ``subscriptionReply(_:)`` (without: each message is parsed).
    ///
    /// - Returns: false when the group is not followed (nothing was done).
    @discardableResult
    func livePublication(_ publication: ReplyPayloads.Publication) -> Bool {
        let group = publication.group
        // Per member and publication: no note of activity here (a tail check sees the
        // sequencer's progress), one look-up of the group.
        switch subscriptions.sequencer.step(group, offset: publication.offset, epoch: publication.epoch, message: publication.plain) {
        case .notFollowed:
            return false
        case .next:
            if let send = publication.send {
                deliverParsed(publication.plain, send)
            } else {
                deliverReply(publication.plain)
            }
        case .other(.deliver(let messages)):
            for message in messages {
                if let send = publication.send, message == publication.plain {
                    deliverParsed(message, send)
                } else {
                    deliverReply(message)
                }
            }
        case .other(.deliverThenHold(let messages)):
            for message in messages { deliverReply(message) }
            armGapTimer(group)
        case .other(.hold(let startTimer)):
            if startTimer { armGapTimer(group) }
        case .other(.duplicate):
            ServerMetrics.publicationsDeduplicated.increment()
        }
        return true
    }

    private func follow(_ control: OrderedDictionary<String, ASGIValue>) {
        guard let name = control["group"]?.stringValue, (try? ChannelNames.validateGroup(name)) != nil else {
            server.counters.count(.malformedReplies)
            return
        }
        let group = StringInterner.names.intern(name)
        let retention = HistoryRetention(
            size: Int(control["size"]?.intValue ?? 1000), ttl: .seconds(control["ttl"]?.intValue ?? 300))
        let after: StreamPosition? =
            if let offset = control["offset"]?.intValue, offset >= 0, offset < Int64.max, let epoch = control["epoch"]?.stringValue {
                StreamPosition(offset: UInt64(offset), epoch: epoch)
            } else {
                nil
            }
        // A socket that just joined (its start is the top before it joined): no recovery marker.
        let fresh = control["fresh"]?.boolValue == true
        subscriptions.retention[group] = retention
        server.followers.add(replyChannel, to: group)
        subscriptions.sequencer.startRecovery(group)
        let layer = server.layer
        let channel = replyChannel
        let bound = NIOLoopBound(self, eventLoop: self.channel.eventLoop)
        let loop = self.channel.eventLoop
        Task {
            let result = await WebSocketSession.readForRecovery(layer, group: group, channel: channel, after: after, retention: retention)
            loop.execute { bound.value.recovered(group, after: after, fresh: fresh, result) }
        }
    }

    /// How long a recovery read keeps retrying a layer it cannot reach.
    static let recoveryPatience = Duration.seconds(10)

    /// Joins `group` and reads its history after `after`. A layer that cannot be reached for a
    /// moment (a partition that just healed, a Redis restarting) is retried for up to
    /// `recoveryPatience` before the socket is told its recovery is incomplete.
    static func readForRecovery(
        _ layer: any ChannelLayer, group: String, channel: String, after: StreamPosition?, retention: HistoryRetention
    ) async -> Result<HistorySlice, any Error> {
        guard let history = layer as? any ChannelLayerHistory else {
            return .failure(ChannelLayerError(.invalidConfiguration, "this channel layer keeps no history"))
        }
        let giveUp = ContinuousClock.now + recoveryPatience
        var failures = 0
        while true {
            do {
                try await layer.groupAdd(group, channel: channel)
                let slice = try await history.historyRead(group, after: after, retention: retention)
                guard let after, slice.entries.isEmpty, slice.top.epoch != after.epoch, slice.top.offset > 0 else {
                    return .success(slice)
                }
                // The history began again since the socket's position: what it missed of the old
                // one is gone (the recovery stays incomplete); the new one is written from its
                // start, as a socket that stayed connected gets it (its tail check).
                let fresh = try await history.historyRead(
                    group, after: StreamPosition(offset: 0, epoch: slice.top.epoch), retention: retention)
                guard fresh.top.epoch == slice.top.epoch else { return .success(slice) }
                return .success(HistorySlice(entries: fresh.entries, top: fresh.top, complete: false))
            } catch  where ChannelLayerError.isTransient(error) {
                failures += 1
                let pause = Retry.backoff(after: failures)
                guard ContinuousClock.now + pause < giveUp, (try? await Task.sleep(for: pause)) != nil else { return .failure(error) }
            } catch {
                return .failure(error)
            }
        }
    }

    private func recovered(_ group: String, after: StreamPosition?, fresh: Bool, _ result: Result<HistorySlice, any Error>) {
        switch result {
        case .failure(let error):
            server.logger.warning("a recovery failed", metadata: ["group": "\(group)", "error": "\(error)"])
            subscriptions.sequencer.stop(group)
            subscriptions.checkedProgress[group] = nil
            deliverText("{\"type\":\"recovered\",\"complete\":false}")
        case .success(let slice):
            // Published since the position (for a socket that just joined: since it joined).
            for entry in slice.entries {
                deliverText(Self.publicationText(entry.message, StreamPosition(offset: entry.offset, epoch: slice.top.epoch)))
            }
            let top = "\"offset\":\(slice.top.offset),\"epoch\":\"\(slice.top.epoch)\""
            if fresh || after == nil {
                deliverText("{\"type\":\"position\"," + top + "}")
            } else {
                ServerMetrics.publicationsRecovered.increment(by: slice.entries.count)
                deliverText("{\"type\":\"recovered\",\"complete\":\(slice.complete)," + top + "}")
            }
            let (live, gap) = subscriptions.sequencer.recovered(
                group, top: StreamPosition(offset: slice.top.offset, epoch: StringInterner.names.intern(slice.top.epoch)))
            for message in live { deliverReply(message) }
            if gap { armGapTimer(group) }
            noteActivity(group)
        }
    }

    /// Tail checks. A publication whose group send never reached this socket (its channel was
    /// full: group sends are at most once) shows as a gap when a later one arrives; one at the
    /// end of a burst would not. So once a followed group has been quiet for
    /// ``tailQuiet``, and every ``tailIdle`` after, the socket compares what it has with the
    /// history's top (one read per group and server, ``HistoryTops``) and reads what it lacks.
    /// The checks are due times looked at by the event loop's tail wheel each ``tailQuiet``
    /// (``ServerContext/tailWheel(on:)``), not a timer per socket.
    static let tailQuiet = TimeAmount.seconds(1)
    static let tailIdle = TimeAmount.seconds(30)

    /// The server's own word to a socket (``GroupKeeper``): it was put back into `group`'s
    /// member set, so what was published meanwhile reached it nowhere; its tail check runs once
    /// the group has been quiet for ``tailQuiet``.
    static let tailCheckControl = "__tail_check"

    func checkTailSoon(_ group: String) {
        guard case .open(attached: true) = machine.state, subscriptions.sequencer.follows(group) else { return }
        let soon = NIODeadline.now() + Self.tailQuiet
        if let due = subscriptions.tailDue[group], due <= soon { return }
        armTailCheck(group, in: Self.tailQuiet)
    }

    /// Arms the group's first tail check (later ones re-arm themselves).
    private func noteActivity(_ group: String) {
        if subscriptions.tailDue[group] == nil { armTailCheck(group, in: Self.tailQuiet) }
    }

    private func armTailCheck(_ group: String, in delay: TimeAmount) {
        subscriptions.tailDue[group] = .now() + delay
        if tailPlace == nil { server.tailWheel(on: channel.eventLoop).add(self) }
    }

    /// The wheel's turn (each ``tailQuiet``): the checks due within half a turn run now (a check
    /// is at most half a turn early, never a turn late); a socket with none left leaves the wheel.
    /// A group waiting for its idle check (``tailIdle``) that was published to since its last
    /// check is looked at now too, so a publication lost at the end of its next burst is caught
    /// up once that burst is quiet, not up to 30 s later (a live publication does not re-arm the
    /// check itself: that was a dictionary write per member and publication).
    func tailTick() {
        let now = NIODeadline.now()
        let soon = now + .nanoseconds(Self.tailQuiet.nanoseconds / 2)
        var due: [String] = []
        for (group, at) in subscriptions.tailDue
        where at <= soon
            || (at > now + Self.tailQuiet && subscriptions.sequencer.progress(group) != subscriptions.checkedProgress[group])
        {
            due.append(group)
        }
        for group in due {
            subscriptions.tailDue[group] = nil
            tailCheck(group)
        }
        if subscriptions.tailDue.isEmpty || !channel.isActive { server.tailWheel(on: channel.eventLoop).remove(self) }
    }

    private func tailCheck(_ group: String) {
        guard subscriptions.sequencer.follows(group), let history = server.layer as? any ChannelLayerHistory else { return }
        let progress = subscriptions.sequencer.progress(group)
        if progress == nil || progress != subscriptions.checkedProgress[group] {
            // Still flowing (or recovering): a loss now shows as a gap; look once it is quiet.
            subscriptions.checkedProgress[group] = progress
            armTailCheck(group, in: Self.tailQuiet)
            return
        }
        let retention = subscriptions.retention[group] ?? HistoryRetention(size: 1000, ttl: .seconds(300))
        let tops = server.historyTops
        let bound = NIOLoopBound(self, eventLoop: channel.eventLoop)
        let loop = channel.eventLoop
        // Armed now: the check below is in flight, and a publication meanwhile brings it
        // forward (``tailTick()``).
        armTailCheck(group, in: Self.tailIdle)
        Task {
            guard let top = await tops.top(group, retention: retention, history: history) else { return }
            let start: StreamPosition? = try? await loop.submit { bound.value.subscriptions.sequencer.behind(group, top: top) }.get()
            guard let start else { return }
            // A read that failed, or found the history begun again since (another epoch: its
            // entries are not of `start`'s), is left to the next check.
            guard let slice = try? await history.historyRead(group, after: start, retention: retention),
                slice.top.epoch == start.epoch
            else { return }
            let found = slice.entries
            loop.execute {
                let session = bound.value
                // Built as the live frames are: the publication's text (with offset and epoch).
                let entries = found.map { entry -> (offset: UInt64, message: Message) in
                    (
                        entry.offset,
                        [
                            "text": .string(
                                WebSocketSession.publicationText(entry.message, StreamPosition(offset: entry.offset, epoch: start.epoch)))
                        ]
                    )
                }
                let skippedBefore = session.subscriptions.sequencer.skipped
                let messages = session.subscriptions.sequencer.fillTail(group, from: start, found: entries)
                for message in messages { session.deliverReply(message) }
                if !messages.isEmpty { ServerMetrics.publicationsCaughtUp.increment(by: messages.count) }
                let skipped = session.subscriptions.sequencer.skipped - skippedBefore
                if skipped > 0 { ServerMetrics.publicationsSkipped.increment(by: skipped) }
            }
        }
    }

    /// The frame text of a history entry (`{"data": <JSON object text>}`).
    static func publicationText(_ entry: Message, _ position: StreamPosition) -> String {
        PublicationText.make(data: entry["data"]?.stringValue ?? "{}", position: position)
    }

    /// How long a gap's history reads may keep failing before what it misses is skipped: as
    /// long as the server keeps its sockets through a cut-off from the layer (`cutOffTimeout`,
    /// 30 s), so a Redis restart (a second or two of refused connections) skips nothing. Five
    /// failures in a row (2.5 s) had skipped publications a restart with AOF kept.
    var gapReadPatience: Duration { server.configuration.cutOffTimeout ?? .seconds(30) }

    /// A read that failed is not a history without the entries: the gap timer is armed again
    /// (true), every gap timeout (500 ms), for ``gapReadPatience``, before what is missing is
    /// skipped (false, logged).
    private func readGapAgain(_ group: String) -> Bool {
        let now = NIODeadline.now()
        var failures = subscriptions.gapReadFailures[group] ?? (now, 0)
        failures.count += 1
        subscriptions.gapReadFailures[group] = failures
        if now - failures.since < TimeAmount(gapReadPatience) {
            armGapTimer(group)
            return true
        }
        server.logger.warning(
            "the history read for a gap kept failing (the layer busy or away)",
            metadata: ["group": "\(group)", "attempts": "\(failures.count)"])
        return false
    }

    private func armGapTimer(_ group: String) {
        guard subscriptions.gapTimers[group] == nil else { return }
        let bound = NIOLoopBound(self, eventLoop: channel.eventLoop)
        subscriptions.gapTimers[group] = channel.eventLoop.scheduleTask(in: .milliseconds(500)) {
            bound.value.fillGap(group)
        }
    }

    private func fillGap(_ group: String) {
        subscriptions.gapTimers[group] = nil
        guard let start = subscriptions.sequencer.gapStart(group), let history = server.layer as? any ChannelLayerHistory else {
            subscriptions.gapReadFailures[group] = nil  // the gap filled itself meanwhile
            return
        }
        let retention = subscriptions.retention[group] ?? HistoryRetention(size: 1000, ttl: .seconds(300))
        let bound = NIOLoopBound(self, eventLoop: channel.eventLoop)
        let loop = channel.eventLoop
        Task {
            // nil: the read failed (not a history without the entries).
            let slice = try? await history.historyRead(group, after: start, retention: retention)
            let read = slice?.entries
            // What the read could see: the history's top then (a gap past it came after the read).
            let through = slice.flatMap { $0.top.epoch == start.epoch ? $0.top.offset : nil }
            loop.execute {
                let session = bound.value
                if read == nil, session.readGapAgain(group) { return }
                session.subscriptions.gapReadFailures[group] = nil
                let found = read ?? []
                let messages = found.map { entry -> Message in
                    [
                        "text": .string(
                            WebSocketSession.publicationText(entry.message, StreamPosition(offset: entry.offset, epoch: start.epoch)))
                    ]
                }
                let skippedBefore = session.subscriptions.sequencer.skipped
                let (filled, gapLeft) = session.subscriptions.sequencer.fillGap(
                    group, found: zip(found, messages).map { ($0.0.offset, $0.1) }, through: through)
                for message in filled { session.deliverReply(message) }
                if gapLeft { session.armGapTimer(group) }
                let skipped = session.subscriptions.sequencer.skipped - skippedBefore
                if skipped > 0 {
                    ServerMetrics.publicationsSkipped.increment(by: skipped)
                    session.server.logger.warning(
                        "publications missing from the history were skipped", metadata: ["group": "\(group)", "count": "\(skipped)"])
                }
            }
        }
    }

    private func presenceControl(_ control: OrderedDictionary<String, ASGIValue>) {
        guard let group = control["group"]?.stringValue, (try? ChannelNames.validateGroup(group)) != nil,
            let presence = server.layer as? any ChannelLayerPresence
        else {
            server.counters.count(.malformedReplies)
            return
        }
        if control["leave"]?.boolValue == true {
            leavePresence(group, presence: presence)
            return
        }
        guard let user = control["user"]?.stringValue, !user.isEmpty else {
            server.counters.count(.malformedReplies)
            return
        }
        let connection = PresenceConnection(connection: replyChannel, user: user, meta: control["meta"]?.stringValue ?? "{}")
        subscriptions.presence[group] = connection
        server.presence.track(connection, in: group)
        let bound = NIOLoopBound(self, eventLoop: channel.eventLoop)
        let loop = channel.eventLoop
        let server = self.server
        let ttl = server.configuration.presenceTTL
        let previous = subscriptions.presenceTasks[group]
        subscriptions.presenceTasks[group] = Task {
            await previous?.value
            // Retried until answered: a join whose outcome is unknown would never be told.
            guard
                let change = await WebSocketSession.retrying(
                    "join", group: group, server: server,
                    {
                        try await presence.presenceJoin(
                            group, connection: connection.connection, user: user, meta: connection.meta, ttl: ttl)
                    })
            else { return }
            if change.changed { server.tellPresence(group, user: user, joined: true, version: change.version) }
            if let read = await server.presenceLists.list(group, from: presence) {
                loop.execute { bound.value.deliverText(read.text) }
            }
        }
    }

    /// Leaves `group`'s presence, after this socket's join there is done (a leave that overtook
    /// its join would be undone by it), retried until answered.
    private func leavePresence(_ group: String, presence: any ChannelLayerPresence) {
        guard let connection = subscriptions.presence.removeValue(forKey: group) else { return }
        server.presence.untrack(connection.connection, in: group)
        let server = self.server
        let previous = subscriptions.presenceTasks.removeValue(forKey: group)
        Task {
            await previous?.value
            let change = await WebSocketSession.retrying("leave", group: group, server: server) {
                try await presence.presenceLeave(group, connection: connection.connection, user: connection.user)
            }
            if let change, change.changed {
                server.tellPresence(group, user: connection.user, joined: false, version: change.version)
            }
        }
    }

    /// Runs a presence call until it is answered (backing off up to 5 s between tries, for at
    /// most two minutes: then the entry's expiry is the last word).
    private static func retrying<T: Sendable>(
        _ what: String, group: String, server: ServerContext, _ call: @Sendable () async throws -> T
    ) async -> T? {
        var backoff = Backoff(first: .milliseconds(200), cap: .seconds(5))
        let deadline = ContinuousClock.now + .seconds(120)
        while true {
            do {
                return try await call()
            } catch {
                guard ContinuousClock.now < deadline else {
                    server.logger.warning(
                        "a presence \(what) failed; the entry expires", metadata: ["group": "\(group)", "error": "\(error)"])
                    return nil
                }
                try? await Task.sleep(for: backoff.next())
            }
        }
    }

    /// The socket is gone: it leaves every presence it was in, and stops following.
    func subscriptionsEnded() {
        for group in subscriptions.retention.keys { server.followers.remove(replyChannel, from: group) }
        for timer in subscriptions.gapTimers.values { timer.cancel() }
        subscriptions.gapTimers = [:]
        subscriptions.tailDue = [:]
        if tailPlace != nil { server.tailWheel(on: channel.eventLoop).remove(self) }
        guard !subscriptions.presence.isEmpty, let presence = server.layer as? any ChannelLayerPresence else { return }
        for group in subscriptions.presence.keys.sorted() { leavePresence(group, presence: presence) }
    }
}
