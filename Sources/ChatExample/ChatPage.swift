/// The web page of the example: pick a room, send and receive live messages, reconnect
/// with backoff when the socket drops.
enum ChatPage {
    static let html = #"""
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>swift-channels chat</title>
<style>
  :root { --bg:#0f172a; --panel:#111827; --line:#1f2937; --text:#e5e7eb; --muted:#94a3b8; --accent:#f97316; }
  * { box-sizing: border-box; }
  body { margin:0; font:15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; background:var(--bg); color:var(--text); }
  header { display:flex; align-items:center; gap:12px; padding:14px 24px; border-bottom:1px solid var(--line); }
  header h1 { font-size:18px; margin:0; font-weight:600; }
  header .dot { width:10px; height:10px; border-radius:50%; background:#ef4444; }
  header .dot.on { background:#22c55e; }
  header .status { color:var(--muted); font-size:13px; }
  main { display:grid; grid-template-columns: 220px 1fr; height: calc(100vh - 57px); }
  aside { border-right:1px solid var(--line); padding:16px; }
  aside h2 { font-size:12px; letter-spacing:.08em; text-transform:uppercase; color:var(--muted); margin:0 0 8px; }
  aside button { display:block; width:100%; text-align:left; padding:8px 10px; margin:2px 0; border:0; border-radius:8px;
    background:transparent; color:var(--text); cursor:pointer; font:inherit; }
  aside button.active, aside button:hover { background:var(--line); }
  aside form { margin-top:12px; display:flex; gap:6px; }
  aside input { flex:1; min-width:0; }
  section { display:flex; flex-direction:column; min-height:0; }
  #log { flex:1; overflow-y:auto; padding:20px 24px; }
  .msg { margin:0 0 10px; padding:10px 14px; background:var(--panel); border:1px solid var(--line); border-radius:12px; max-width:720px; }
  .msg .who { color:var(--accent); font-weight:600; margin-right:8px; }
  .system { color:var(--muted); font-style:italic; margin:0 0 10px; }
  #composer { display:flex; gap:10px; padding:16px 24px; border-top:1px solid var(--line); }
  input { background:var(--panel); color:var(--text); border:1px solid var(--line); border-radius:8px; padding:10px 12px; font:inherit; }
  #text { flex:1; }
  .send { background:var(--accent); color:#111; border:0; border-radius:8px; padding:10px 18px; font-weight:600; cursor:pointer; }
</style>
</head>
<body>
<header><span id="dot" class="dot"></span><h1>swift-channels chat</h1><span id="status" class="status">connecting…</span></header>
<main>
  <aside>
    <h2>Rooms</h2>
    <div id="rooms"></div>
    <form id="newroom"><input id="roomname" placeholder="new room" pattern="[A-Za-z0-9_-]{1,50}"><button class="send">+</button></form>
  </aside>
  <section>
    <div id="log"></div>
    <form id="composer"><input id="text" autocomplete="off" placeholder="Say something…"><button class="send">Send</button></form>
  </section>
</main>
<script>
const rooms = ["lobby", "random", "swift"];
let room = location.hash.slice(1) || "lobby";
let socket = null, retry = 0, timer = null;
const log = document.getElementById("log");

function line(html, cls) {
  const div = document.createElement("div");
  div.className = cls; div.innerHTML = html; log.appendChild(div); log.scrollTop = log.scrollHeight;
}
function esc(s) { return s.replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;"}[c])); }
function renderRooms() {
  const box = document.getElementById("rooms"); box.innerHTML = "";
  for (const r of rooms) {
    const b = document.createElement("button"); b.textContent = "# " + r;
    if (r === room) b.className = "active";
    b.onclick = () => join(r); box.appendChild(b);
  }
}
function status(on, text) {
  document.getElementById("dot").className = on ? "dot on" : "dot";
  document.getElementById("status").textContent = text;
}
function connect() {
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/chat/" + room + "/";
  socket = new WebSocket(url);
  socket.onopen = () => { retry = 0; status(true, "connected to #" + room); };
  socket.onmessage = (event) => {
    let data; try { data = JSON.parse(event.data); } catch { data = {user: "?", text: event.data}; }
    line('<span class="who">' + esc(data.user || "anonymous") + '</span>' + esc(data.text || ""), "msg");
  };
  socket.onclose = () => {
    status(false, "disconnected, retrying…");
    const delay = Math.min(10000, 500 * 2 ** retry++);
    timer = setTimeout(connect, delay);
  };
}
function join(r) {
  room = r; location.hash = r; log.innerHTML = ""; renderRooms();
  line("joined #" + esc(r), "system");
  if (timer) clearTimeout(timer);
  if (socket) { socket.onclose = null; socket.close(); }
  connect();
}
document.getElementById("composer").onsubmit = (e) => {
  e.preventDefault();
  const input = document.getElementById("text");
  if (input.value && socket && socket.readyState === 1) { socket.send(input.value); input.value = ""; }
};
document.getElementById("newroom").onsubmit = (e) => {
  e.preventDefault();
  const name = document.getElementById("roomname").value.trim();
  if (/^[A-Za-z0-9_-]{1,50}$/.test(name)) { if (!rooms.includes(name)) rooms.push(name); join(name); }
};
if (!rooms.includes(room)) rooms.push(room);
join(room);
</script>
</body>
</html>
"""#
}
