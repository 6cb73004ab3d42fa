import ASGI

/// The JavaScript client, one file with no build step: `ChannelsClient.route()` in the routing serves it
/// (at `/static/channels.js` by default) and a page loads it with `<script src=…>`.
///
/// ```js
/// const socket = new ChannelsSocket("/chat/lobby/", {
///   onMessage: (data) => show(data),                 // JSON frames, parsed
///   onPresence: (users) => showOnline(users),        // the group's present users, kept up to date
///   onRecovered: ({complete}) => { if (!complete) reload(); },
///   onState: (state) => showState(state),            // connecting, open, reconnecting, closed
/// });
/// socket.send({text: "hello"});                      // objects are sent as JSON
/// socket.stream("chat").send({text: "hi"});          // a demultiplexer's {stream, payload}
/// ```
///
/// It reconnects on its own with jittered exponential backoff (0.5 s doubling to 10 s), and
/// comes back with `?offset=&epoch=` (the last position it saw), so the server first writes
/// what it missed (see ``ConsumerContext/follow(_:after:)``); publications already seen are
/// not shown twice.
public enum ChannelsClient {
    /// The route that serves the client at `path` (a regex on the request path).
    public static func route(path: String = "^/static/channels\\.js$") -> RoutingEntry {
        Channels.route("http.request", path: path, method: "^(?:GET|HEAD)$") { context in
            try await context.respond(
                contentType: "text/javascript; charset=utf-8", headers: [("Cache-Control", "public, max-age=300")], script)
        }
    }

    /// The client's source.
    public static let script = #"""
        // swift-channels JavaScript client: reconnect with jittered backoff, recovery from the last
        // position, presence, JSON and the demultiplexer's {stream, payload}. No build step.
        (function (global) {
          "use strict";
          const STATES = ["connecting", "open", "reconnecting", "closed"];

          class ChannelsSocket {
            constructor(path, options) {
              this.options = Object.assign({minDelay: 500, maxDelay: 10000, recover: true}, options || {});
              this.path = path;
              this.position = null;         // {offset, epoch} of the last publication seen
              this.users = new Set();       // present users of the followed group
              this.presenceVersion = 0;     // the version of the last presence list
              this.userVersions = new Map(); // user -> version of the last change applied since
              this.attempt = 0;
              this.state = "connecting";
              this.socket = null;
              this.timer = null;
              this.listeners = {};
              this.open();
            }

            // Listeners by frame type ("message", "presence", ...), besides the options' callbacks.
            on(type, fn) { (this.listeners[type] = this.listeners[type] || []).push(fn); return this; }

            url() {
              let url = this.path;
              if (!/^wss?:/.test(url)) {
                url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + url;
              }
              if (this.options.recover && this.position) {
                url += (url.includes("?") ? "&" : "?") + "offset=" + this.position.offset +
                  "&epoch=" + encodeURIComponent(this.position.epoch);
              }
              return url;
            }

            setState(state) {
              if (this.state === state) return;
              this.state = state;
              if (this.options.onState) this.options.onState(state);
              this.emit("state", state);
            }

            emit(type, data) { for (const fn of this.listeners[type] || []) fn(data); }

            open() {
              const ws = new WebSocket(this.url());
              this.socket = ws;
              ws.onopen = () => { this.attempt = 0; this.setState("open"); if (this.options.onOpen) this.options.onOpen(); };
              ws.onmessage = (event) => this.receive(event.data);
              ws.onclose = (event) => {
                if (this.socket !== ws) return;
                if (this.options.onClose) this.options.onClose(event);
                if (this.state === "closed") return;
                this.setState("reconnecting");
                // Full jitter: anywhere up to the doubled delay, so a server's clients do not come back at once.
                const ceiling = Math.min(this.options.maxDelay, this.options.minDelay * 2 ** this.attempt++);
                const delay = this.options.minDelay / 2 + Math.random() * (ceiling - this.options.minDelay / 2);
                this.timer = setTimeout(() => { this.timer = null; this.setState("connecting"); this.open(); }, delay);
              };
            }

            receive(raw) {
              let data;
              try { data = JSON.parse(raw); } catch (e) { data = {type: "text", text: raw}; }
              if (data && typeof data.offset === "number" && typeof data.epoch === "string" && data.type !== "recovered" && data.type !== "position") {
                const p = this.position;
                if (p && p.epoch === data.epoch && data.offset <= p.offset) return;  // seen already
                this.position = {offset: data.offset, epoch: data.epoch};
              }
              switch (data && data.type) {
                case "position":
                  if (!this.position || this.position.epoch !== data.epoch) this.position = {offset: data.offset, epoch: data.epoch};
                  return;
                case "recovered":
                  if (data.epoch) this.position = {offset: data.offset, epoch: data.epoch};
                  if (this.options.onRecovered) this.options.onRecovered(data);
                  this.emit("recovered", data);
                  return;
                case "presence":
                  this.users = new Set(data.users);
                  // Diffs up to the list's version are in it; later ones are kept per user.
                  this.presenceVersion = data.version || 0;
                  this.userVersions = new Map();
                  this.presenceChanged();
                  return;
                case "presence_diff": {
                  // Diffs from different servers can arrive out of order: a user's change is
                  // applied only when its version is above the last one applied for that user.
                  const versions = data.versions || {};
                  const newer = (u) => {
                    const v = versions[u];
                    if (typeof v !== "number") return true;  // an older server: no versions
                    const last = this.userVersions.has(u) ? this.userVersions.get(u) : this.presenceVersion;
                    if (v <= last) return false;
                    this.userVersions.set(u, v);
                    return true;
                  };
                  for (const u of data.joins) if (newer(u)) this.users.add(u);
                  for (const u of data.leaves) if (newer(u)) this.users.delete(u);
                  this.presenceChanged();
                  return;
                }
              }
              if (data && data.stream !== undefined && data.payload !== undefined) {
                this.emit("stream:" + data.stream, data.payload);
              }
              if (this.options.onMessage) this.options.onMessage(data);
              this.emit(data && data.type ? data.type : "message", data);
            }

            presenceChanged() {
              const users = Array.from(this.users).sort();
              if (this.options.onPresence) this.options.onPresence(users);
              this.emit("presence", users);
            }

            // Sends text as it is and anything else as JSON; false when not connected.
            send(data) {
              if (!this.socket || this.socket.readyState !== 1) return false;
              this.socket.send(typeof data === "string" ? data : JSON.stringify(data));
              return true;
            }

            // A demultiplexer's stream: send({...}) wraps, on(fn) receives its payloads.
            stream(name) {
              return {
                send: (payload) => this.send({stream: name, payload: payload}),
                on: (fn) => this.on("stream:" + name, fn),
              };
            }

            close() {
              this.setState("closed");
              if (this.timer) clearTimeout(this.timer);
              if (this.socket) this.socket.close();
            }
          }
          ChannelsSocket.STATES = STATES;
          global.ChannelsSocket = ChannelsSocket;
        })(typeof window !== "undefined" ? window : globalThis);
        """#
}
