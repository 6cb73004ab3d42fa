extension AdminPage {
    /// The operations page: one file, no outside scripts; it reads `stats.json` every two seconds.
    static let html = #"""
        <!doctype html>
        <html lang="en">
        <head>
        <meta charset="utf-8">
        <meta name="viewport" content="width=device-width, initial-scale=1">
        <title>channels · operations</title>
        <style>
          :root { --fg:#1d2430; --muted:#6b7687; --line:#e3e7ee; --bg:#f6f8fb; --card:#fff; --a:#2f6fde; --b:#16a37f; --bad:#d9473a; }
          * { box-sizing: border-box; }
          body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color:var(--fg); background:var(--bg); }
          header { display:flex; align-items:baseline; gap:16px; padding:14px 22px; background:var(--card); border-bottom:1px solid var(--line); }
          header h1 { font-size:17px; margin:0; }
          header .where, header .state { color:var(--muted); }
          header .state.stale { color:var(--bad); font-weight:600; }
          main { padding:18px 22px; display:grid; gap:16px; grid-template-columns:repeat(auto-fit, minmax(280px, 1fr)); }
          .card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 14px; }
          .card h2 { font-size:12px; text-transform:uppercase; letter-spacing:.06em; color:var(--muted); margin:0 0 6px; }
          .big { font-size:28px; font-weight:600; }
          .big small { font-size:13px; color:var(--muted); font-weight:400; margin-left:6px; }
          svg { width:100%; height:70px; display:block; }
          .wide { grid-column:1 / -1; }
          table { width:100%; border-collapse:collapse; font-variant-numeric:tabular-nums; }
          th, td { text-align:right; padding:4px 8px; border-bottom:1px solid var(--line); }
          th:first-child, td:first-child { text-align:left; font-family:ui-monospace, monospace; }
          th { color:var(--muted); font-weight:500; font-size:12px; }
          td.warn { color:var(--bad); font-weight:600; }
          .empty { color:var(--muted); font-style:italic; }
          .legend span { margin-right:10px; color:var(--muted); } .legend i { display:inline-block; width:10px; height:3px; margin-right:4px; vertical-align:middle; }
        </style>
        </head>
        <body>
        <header><h1>channels · operations</h1><span class="where" id="where"></span><span class="state" id="state">loading…</span></header>
        <main>
          <section class="card"><h2>WebSockets open</h2><div class="big" id="sockets">–</div><svg id="c-sockets" viewBox="0 0 300 70" preserveAspectRatio="none"></svg></section>
          <section class="card"><h2>Messages / s</h2><div class="big" id="rate">–<small>sent + received</small></div><svg id="c-rate" viewBox="0 0 300 70" preserveAspectRatio="none"></svg>
            <div class="legend"><span><i style="background:var(--a)"></i>sent</span><span><i style="background:var(--b)"></i>received</span></div></section>
          <section class="card"><h2>Queued in the layer</h2><div class="big" id="pending">–</div><svg id="c-pending" viewBox="0 0 300 70" preserveAspectRatio="none"></svg></section>
          <section class="card"><h2>Drops / s</h2><div class="big" id="drops">–<small>total</small></div><svg id="c-drops" viewBox="0 0 300 70" preserveAspectRatio="none"></svg></section>
          <section class="card"><h2>HTTP</h2><table><tbody id="http"></tbody></table></section>
          <section class="card"><h2>Drops by reason</h2><table><thead><tr><th>reason</th><th>total</th></tr></thead><tbody id="reasons"></tbody></table></section>
          <section class="card wide"><h2>Channels</h2><table><thead><tr><th>channel</th><th>queued</th><th>oldest (s)</th><th>sent</th><th>full</th></tr></thead><tbody id="channels"></tbody></table></section>
          <section class="card wide"><h2>Groups</h2><table><thead><tr><th>group</th><th>members</th></tr></thead><tbody id="groups"></tbody></table></section>
        </main>
        <script>
        const token = new URLSearchParams(location.search).get("token");
        const url = "stats.json" + (token ? "?token=" + encodeURIComponent(token) : "");
        const $ = id => document.getElementById(id);
        const fmt = n => n >= 1e6 ? (n / 1e6).toFixed(1) + "M" : n >= 1e4 ? (n / 1e3).toFixed(1) + "k" : String(Math.round(n * 10) / 10);
        const esc = s => String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;"}[c]));
        function rates(h, key) {
          const out = [];
          for (let i = 1; i < h.length; i++) { const dt = h[i].time - h[i - 1].time; out.push(dt > 0 ? Math.max(0, (h[i][key] - h[i - 1][key]) / dt) : 0); }
          return out;
        }
        function chart(id, series, colors) {
          const svg = $(id), w = 300, hgt = 66;
          const max = Math.max(1, ...series.flat());
          svg.innerHTML = series.map((s, k) => {
            if (s.length < 2) return "";
            const pts = s.map((v, i) => (i * w / (s.length - 1)).toFixed(1) + "," + (hgt - v / max * (hgt - 4) + 2).toFixed(1)).join(" ");
            return `<polyline fill="none" stroke="${colors[k]}" stroke-width="2" points="${pts}"/>`;
          }).join("") + `<text x="298" y="11" text-anchor="end" font-size="10" fill="#6b7687">max ${fmt(max)}</text>`;
        }
        function rows(id, list, empty) {
          $(id).innerHTML = list.length ? list.join("") : `<tr><td class="empty" colspan="5">${empty}</td></tr>`;
        }
        async function refresh() {
          try {
            const r = await fetch(url, {cache: "no-store"});
            if (!r.ok) throw new Error("HTTP " + r.status);
            const d = await r.json(), p = d.process, h = d.history, l = d.layer;
            $("where").textContent = l.location || "";
            $("state").textContent = "updated " + new Date(d.time * 1000).toLocaleTimeString();
            $("state").className = "state";
            const sent = rates(h, "sent"), recv = rates(h, "received"), drops = rates(h, "dropped");
            const total = o => Object.values(o).reduce((a, b) => a + b, 0);
            $("sockets").textContent = fmt(p.websockets_open);
            $("rate").firstChild.textContent = fmt((sent.at(-1) || 0) + (recv.at(-1) || 0));
            $("pending").textContent = fmt(l.channels.reduce((a, c) => a + c.messages_pending, 0));
            $("drops").firstChild.textContent = fmt(drops.at(-1) || 0);
            $("drops").lastChild.textContent = fmt(total(p.dropped)) + " total";
            chart("c-sockets", [h.map(s => s.websockets_open)], ["var(--a)"]);
            chart("c-rate", [sent, recv], ["var(--a)", "var(--b)"]);
            chart("c-pending", [h.map(s => s.pending)], ["var(--a)"]);
            chart("c-drops", [drops], ["var(--bad)"]);
            rows("http", [
              `<tr><td>requests</td><td>${fmt(p.http_requests)}</td></tr>`,
              `<tr><td>in flight</td><td>${fmt(p.http_requests_in_flight)}</td></tr>`,
              `<tr><td>group sends</td><td>${fmt(p.group_sends)}</td></tr>`,
              `<tr><td>members reached</td><td>${fmt(p.group_members_reached)}</td></tr>`,
              `<tr><td>consumer errors</td><td>${fmt(p.consumer_errors)}</td></tr>`,
              `<tr><td>layer errors</td><td>${fmt(total(p.layer_errors))}</td></tr>`,
              `<tr><td>delayed: delivered / late</td><td>${fmt(p.delay_delivered)} / ${fmt(p.delay_late)}</td></tr>`], "");
            rows("reasons", Object.entries(p.dropped).filter(([, v]) => v > 0).sort((a, b) => b[1] - a[1])
              .map(([k, v]) => `<tr><td>${esc(k)}</td><td class="warn">${fmt(v)}</td></tr>`), "nothing dropped");
            rows("channels", l.channels.map(c => `<tr><td>${esc(c.name)}</td><td class="${c.messages_pending > 100 ? "warn" : ""}">${c.messages_pending}</td>` +
              `<td class="${c.messages_max_age > 5 ? "warn" : ""}">${c.messages_max_age.toFixed(1)}</td><td>${c.messages_count}</td><td>${c.channel_full_count}</td></tr>`), "no channels");
            rows("groups", l.groups.map(g => `<tr><td>${esc(g.name)}</td><td>${g.members}</td></tr>`), "no groups");
            document.body.dataset.ready = "1";
          } catch (e) {
            $("state").textContent = "not answering: " + e.message;
            $("state").className = "state stale";
          }
        }
        refresh();
        setInterval(refresh, 2000);
        </script>
        </body>
        </html>
        """#
}
