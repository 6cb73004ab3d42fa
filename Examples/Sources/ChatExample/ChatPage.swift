/// The web page of the example: log in, pick a room, see its history and who is online, send
/// and receive live messages. The socket is the framework's JavaScript client
/// (`/static/channels.js`): it reconnects on its own and recovers what was missed meanwhile.
/// Plain HTML, CSS and JavaScript.
enum ChatPage {
    static let html = #"""
        <!doctype html>
        <html lang="en">
        <head>
        <meta charset="utf-8">
        <meta name="viewport" content="width=device-width, initial-scale=1">
        <title>swift-channels chat</title>
        <style>
          :root { --bg:#0b1020; --panel:#121a2e; --panel2:#0f1628; --line:#1e2a44; --text:#e6e9f2; --muted:#8a96b3;
                  --accent:#f97316; --accent2:#fb923c; --ok:#22c55e; --bad:#ef4444; }
          * { box-sizing:border-box; }
          html, body { height:100%; }
          body { margin:0; font:15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; background:var(--bg); color:var(--text); }
          header { display:flex; align-items:center; gap:12px; padding:12px 22px; border-bottom:1px solid var(--line);
                   background:linear-gradient(180deg, #10182c, var(--bg)); }
          header .logo { width:28px; height:28px; border-radius:8px; background:linear-gradient(135deg, var(--accent), #ec4899); }
          header h1 { font-size:17px; margin:0; font-weight:650; letter-spacing:.01em; }
          .pill { display:flex; align-items:center; gap:8px; padding:4px 10px; border:1px solid var(--line); border-radius:999px;
                  color:var(--muted); font-size:13px; }
          .dot { width:9px; height:9px; border-radius:50%; background:var(--bad); }
          .dot.on { background:var(--ok); box-shadow:0 0 8px var(--ok); }
          .spacer { flex:1; }
          #me { font-size:14px; color:var(--muted); }
          #me b { color:var(--text); }
          button { font:inherit; cursor:pointer; }
          .ghost { background:transparent; border:1px solid var(--line); color:var(--text); border-radius:8px; padding:6px 12px; }
          .ghost:hover { border-color:var(--muted); }
          .primary { background:var(--accent); color:#1a0d02; border:0; border-radius:10px; padding:10px 18px; font-weight:650; }
          .primary:hover { background:var(--accent2); }
          main { display:grid; grid-template-columns:230px 1fr; height:calc(100vh - 57px); }
          aside { border-right:1px solid var(--line); padding:18px 14px; background:var(--panel2); }
          #online { margin:0 0 18px 6px; font-size:14px; color:var(--muted); }
          #online div { padding:2px 0; }
          aside h2 { font-size:11px; letter-spacing:.1em; text-transform:uppercase; color:var(--muted); margin:0 0 8px 6px; }
          aside .room { display:block; width:100%; text-align:left; padding:8px 10px; margin:2px 0; border:0; border-radius:8px;
                        background:transparent; color:var(--text); }
          aside .room.active { background:var(--line); font-weight:600; }
          aside .room:hover { background:#18223a; }
          aside form { margin-top:14px; display:flex; gap:6px; }
          aside input { flex:1; min-width:0; }
          section { display:flex; flex-direction:column; min-height:0; }
          #roomtitle { padding:14px 24px 6px; font-weight:650; font-size:16px; }
          #roomtitle span { color:var(--muted); font-weight:400; font-size:13px; margin-left:8px; }
          #log { flex:1; overflow-y:auto; padding:8px 24px 20px; }
          .msg { display:flex; gap:12px; margin:0 0 12px; max-width:760px; }
          .avatar { flex:none; width:34px; height:34px; border-radius:50%; display:grid; place-items:center; font-weight:700;
                    color:#fff; font-size:14px; text-transform:uppercase; }
          .bubble { background:var(--panel); border:1px solid var(--line); border-radius:4px 14px 14px 14px; padding:8px 14px; min-width:120px; }
          .msg.mine .bubble { border-color:#7c3a10; background:#1d1712; }
          .meta { font-size:12px; color:var(--muted); }
          .tools button { margin-left:8px; font-size:11px; padding:0 4px; background:none; border:1px solid var(--muted); border-radius:4px; color:var(--muted); cursor:pointer; }
          .meta .who { color:var(--accent2); font-weight:650; font-size:13.5px; margin-right:6px; }
          .text { white-space:pre-wrap; word-wrap:break-word; }
          .system { color:var(--muted); font-size:13px; text-align:center; margin:10px 0 14px; }
          .mention { border-left:3px solid #ec4899; padding-left:10px; }
          #composer { display:flex; gap:10px; padding:14px 24px 18px; border-top:1px solid var(--line); }
          input { background:var(--panel); color:var(--text); border:1px solid var(--line); border-radius:10px; padding:10px 12px; font:inherit; outline:none; }
          input:focus { border-color:var(--accent); }
          #text { flex:1; }
          #overlay { position:fixed; inset:0; background:rgba(5,8,18,.78); display:none; place-items:center; backdrop-filter:blur(3px); }
          #overlay.open { display:grid; }
          .card { width:min(380px, 92vw); background:var(--panel); border:1px solid var(--line); border-radius:16px; padding:26px;
                  box-shadow:0 20px 60px rgba(0,0,0,.45); }
          .card h2 { margin:0 0 4px; font-size:20px; }
          .card p { margin:0 0 18px; color:var(--muted); font-size:14px; }
          .card label { display:block; font-size:13px; color:var(--muted); margin:10px 0 4px; }
          .card input { width:100%; }
          .card .row { display:flex; gap:10px; margin-top:18px; align-items:center; }
          #loginerror { color:var(--bad); font-size:13px; min-height:18px; margin-top:8px; }
          @media (max-width:700px) { main { grid-template-columns:1fr; } aside { display:none; } }
        </style>
        </head>
        <body>
        <header>
          <div class="logo"></div><h1>swift-channels chat</h1>
          <div class="pill"><span id="dot" class="dot"></span><span id="status">connecting…</span></div>
          <div class="spacer"></div>
          <span id="me">guest</span>
          <button id="loginopen" class="ghost">Log in</button>
          <button id="logout" class="ghost" style="display:none">Log out</button>
        </header>
        <main>
          <aside>
            <h2>Online</h2>
            <div id="online"></div>
            <h2>Rooms</h2>
            <div id="rooms"></div>
            <form id="newroom"><input id="roomname" placeholder="new room" pattern="[A-Za-z0-9_-]{1,50}"><button class="ghost">+</button></form>
          </aside>
          <section>
            <div id="roomtitle"># lobby</div>
            <div id="log"></div>
            <form id="composer"><input id="text" autocomplete="off" placeholder="Message… (@name to mention)"><button id="send" class="primary">Send</button></form>
          </section>
        </main>
        <div id="overlay">
          <form class="card" id="loginform">
            <h2>Welcome</h2>
            <p>Log in, or pick a name and password and create an account.</p>
            <label for="username">User name</label><input id="username" autocomplete="username" required>
            <label for="password">Password</label><input id="password" type="password" autocomplete="current-password" required>
            <div id="loginerror"></div>
            <div class="row"><button id="loginbutton" class="primary" type="submit">Log in</button>
              <button id="registerbutton" class="ghost" type="button">Create account</button>
              <button id="guest" class="ghost" type="button">Continue as guest</button></div>
          </form>
        </div>
        <script src="/static/channels.js"></script>
        <script>
        const rooms = ["lobby", "random", "swift"];
        let room = location.hash.slice(1) || "lobby";
        let me = null, socket = null;
        const $ = (id) => document.getElementById(id);
        const log = $("log");

        function esc(s) { return String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;"}[c])); }
        function color(name) { let h = 0; for (const c of name) h = (h * 31 + c.charCodeAt(0)) % 360; return "hsl(" + h + ",55%,45%)"; }
        function time(at) { return at ? new Date(at * 1000).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"}) : ""; }
        function key(m) { return (m.user || "") + "|" + (m.at || "") + "|" + m.text; }
        function system(text, id) {
          const div = document.createElement("div"); div.className = "system"; div.textContent = text;
          if (id) div.id = id;
          log.appendChild(div); log.scrollTop = log.scrollHeight;
        }
        function message(m, mention) {
          const div = document.createElement("div");
          div.className = "msg" + (me && m.user === me ? " mine" : "") + (mention ? " mention" : "");
          div.dataset.key = key(m);
          if (m.id) div.dataset.id = m.id;
          const empty = $("empty"); if (empty) empty.remove();  // the room is not empty any more
          const who = m.user || "anonymous";
          div.innerHTML = '<div class="avatar" style="background:' + color(who) + '">' + esc(who[0]) + '</div>' +
            '<div class="bubble"><div class="meta"><span class="who">' + esc(who) + '</span>' + esc(time(m.at)) +
            (mention ? ' · mentioned you in #' + esc(m.room) : '') + '</div><div class="text">' + esc(m.text) + '</div></div>';
          if (me && m.user === me && m.id && !mention) {
            // Data binding: the author edits or deletes; every open page of the room follows.
            const tools = document.createElement("span"); tools.className = "tools";
            const edit = document.createElement("button"); edit.textContent = "edit";
            edit.onclick = () => { const text = prompt("Edit your message", div.querySelector(".text").textContent);
              if (text && text.trim()) socket.stream("messages").send({action: "update", pk: m.id, data: {text: text}}); };
            const del = document.createElement("button"); del.textContent = "delete";
            del.onclick = () => socket.stream("messages").send({action: "delete", pk: m.id});
            tools.append(edit, del); div.querySelector(".meta").appendChild(tools);
          }
          log.appendChild(div); log.scrollTop = log.scrollHeight;
        }
        function bound(p) {
          if (p.error) { system("Not changed: " + p.error); return; }
          const div = log.querySelector('.msg[data-id="' + Number(p.pk) + '"]');
          if (!div) return;
          if (p.action === "delete") div.remove();
          else if (p.action === "update") div.querySelector(".text").textContent = p.data.text;
        }
        function renderRooms() {
          const box = $("rooms"); box.innerHTML = "";
          for (const r of rooms) {
            const b = document.createElement("button"); b.className = "room" + (r === room ? " active" : "");
            b.textContent = "# " + r; b.onclick = () => join(r); box.appendChild(b);
          }
          $("roomtitle").innerHTML = "# " + esc(room) + "<span>" + (me ? "as " + esc(me) : "as a guest") + "</span>";
        }
        function status(on, text) { $("dot").className = on ? "dot on" : "dot"; $("status").textContent = text; }
        function showUser() {
          $("me").innerHTML = me ? "signed in as <b>" + esc(me) + "</b>" : "guest";
          $("loginopen").style.display = me ? "none" : "";
          $("logout").style.display = me ? "" : "none";
          renderRooms();
        }
        function showHistory(messages) {
          // Messages that arrived before the history stay, after it, and are not shown twice.
          const live = Array.from(log.querySelectorAll(".msg"));
          const shown = new Set(live.map(d => d.dataset.key));
          const past = messages.filter(m => !shown.has(key(m)));
          log.innerHTML = "";
          if (past.length) { system("Recent messages in #" + room); past.forEach(m => message(m)); }
          if (past.length || live.length) system("— you joined —");
          else system("No messages yet in #" + room + ". Say hello!", "empty");
          live.forEach(d => log.appendChild(d));
        }
        function showOnline(users) {
          $("online").innerHTML = users.map(u => "<div>" + esc(u) + (u === me ? " (you)" : "") + "</div>").join("");
        }
        function connect() {
          socket = new ChannelsSocket("/chat/" + room + "/", {
            onState: (state) => {
              if (state === "open") status(true, "live in #" + room);
              else if (state === "reconnecting") status(false, "reconnecting…");
              else if (state === "connecting") status(false, "connecting…");
            },
            onPresence: showOnline,
            onRecovered: async (result) => {
              // Too much was missed (or the server lost its history): reload the room.
              if (!result.complete) {
                const r = await fetch("/api/rooms/" + room + "/messages/");
                log.innerHTML = "";
                showHistory((await r.json()).messages);
              }
            },
            onMessage: (data) => {
              if (data.stream === "messages" && data.payload) bound(data.payload);
              else if (data.type === "history") showHistory(data.messages);
              else if (data.type === "mention") { if (data.room !== room) message(data, true); }
              else if (data.type === "message" || data.type === "text") message(data);
            },
          });
        }
        function join(r) {
          room = r; location.hash = r; renderRooms();
          const old = socket; socket = null;
          if (old) old.close();
          log.innerHTML = ""; $("online").innerHTML = ""; status(false, "connecting…");
          connect();
        }
        $("composer").onsubmit = (e) => {
          e.preventDefault();
          const input = $("text");
          if (input.value.trim() && socket && socket.send(input.value)) input.value = "";
        };
        $("newroom").onsubmit = (e) => {
          e.preventDefault();
          const name = $("roomname").value.trim();
          if (/^[A-Za-z0-9_-]{1,50}$/.test(name)) { if (!rooms.includes(name)) rooms.push(name); $("roomname").value = ""; join(name); }
        };
        $("loginopen").onclick = () => { $("overlay").className = "open"; $("username").focus(); };
        $("guest").onclick = () => { $("overlay").className = ""; };
        // Every POST carries the CSRF token (the server checks it against its cookie and the session).
        let csrf = null;
        const csrfToken = async () => {
          if (!csrf) { const r = await fetch("/api/csrf/", {credentials: "same-origin"}); csrf = (await r.json()).csrf_token; }
          return csrf;
        };
        const post = async (path, body) => {
          const r = await fetch(path, {method: "POST", body, credentials: "same-origin", headers: {"X-CSRFToken": await csrfToken()}});
          const data = await r.json();
          if (data.csrf_token) csrf = data.csrf_token;
          return [r, data];
        };
        const signIn = async (path) => {
          $("loginerror").textContent = "";
          const body = new URLSearchParams({username: $("username").value, password: $("password").value});
          try {
            const [r, data] = await post(path, body);
            if (!r.ok) { $("loginerror").textContent = data.error || "login failed"; return; }
            me = data.user; $("overlay").className = ""; $("password").value = ""; showUser(); join(room);
          } catch (err) { $("loginerror").textContent = "the server did not answer"; }
        };
        $("loginform").onsubmit = (e) => { e.preventDefault(); signIn("/api/login/"); };
        $("registerbutton").onclick = () => signIn("/api/register/");
        $("logout").onclick = async () => {
          await post("/api/logout/", "");
          me = null; showUser(); join(room);
        };
        (async () => {
          if (!rooms.includes(room)) rooms.push(room);
          try { const r = await fetch("/api/me/", {credentials: "same-origin"}); me = (await r.json()).user; } catch {}
          showUser();
          if (!me) $("overlay").className = "open";
          join(room);
        })();
        </script>
        </body>
        </html>
        """#
}
