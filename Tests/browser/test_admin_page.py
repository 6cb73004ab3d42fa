"""The live operations page (`runserver --admin`) in headless Chromium, on the embedded default
layer: 30 sockets in a room, HTTP traffic and a forced drop; the page, its JSON, `/metrics` and
`stats --server` must all show the same numbers. Saves a screenshot as a test artifact.

Run by scripts/test.sh: test_admin_page.py CHAT_BINARY ARTIFACT_DIR
"""
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

import websockets
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))
from ports import free_port, get as fetch  # noqa: E402
from test_browser import browser  # noqa: E402

CHAT, ARTIFACTS = sys.argv[1], sys.argv[2]
TOKEN = "ops-%d" % os.getpid()
SOCKETS = 30


def metric(text, name, **labels):
    """The sum of the series `name` whose labels include `labels`, from the Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        key, value = line.rsplit(" ", 1)
        if all('%s="%s"' % item in key for item in labels.items()):
            total += float(value)
    return total


async def traffic(port):
    sockets = []
    for _ in range(SOCKETS):
        ws = await websockets.connect("ws://127.0.0.1:%d/chat/ops/" % port)
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "history"
        sockets.append(ws)
    for i in range(5):
        await sockets[i].send("ops message %d" % i)
    # Every member gets the five messages: the room is live before the page is looked at.
    for ws in sockets:
        got = 0
        while got < 5:
            if json.loads(await asyncio.wait_for(ws.recv(), 10)).get("type") == "message":
                got += 1
    return sockets


async def close(sockets):
    await asyncio.gather(*(ws.close() for ws in sockets))


def main():
    port, metrics_port = free_port(), free_port()
    workdir = tempfile.mkdtemp(prefix="chat-admin-")
    env = dict(os.environ, CHAT_DATABASE=os.path.join(workdir, "chat.sqlite3"))
    log = open(os.path.join(ARTIFACTS, "admin-runserver.log"), "w")
    server = subprocess.Popen(
        [CHAT, "runserver", "--port", str(port), "--metrics-port", str(metrics_port), "--admin", "--admin-token", TOKEN,
         "--max-body-size", "1000"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    driver = None
    loop = asyncio.new_event_loop()
    try:
        deadline = time.time() + 30
        while True:
            try:
                if fetch(metrics_port, "/healthz")[0] == 200 and fetch(port, "/hello/up")[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise AssertionError("runserver did not start: " + open(log.name).read()[-2000:])
            time.sleep(0.1)
        # A page on a port with a token: nothing without it.
        assert fetch(metrics_port, "/admin/")[0] == 401
        assert fetch(metrics_port, "/admin/stats.json")[0] == 401
        assert fetch(metrics_port, "/admin/stats.json?token=wrong")[0] == 401
        sockets = loop.run_until_complete(traffic(port))
        for i in range(20):
            assert fetch(port, "/hello/%d" % i)[0] == 200
        assert fetch(port, "/poll/", method="POST", body=b"x" * 5000)[0] == 413  # a too_large drop

        status, body = fetch(metrics_port, "/admin/stats.json", headers={"Authorization": "Bearer " + TOKEN})
        assert status == 200, (status, body[:200])
        report = json.loads(body)
        _, prom = fetch(metrics_port, "/metrics")
        prom = prom.decode()
        process, layer = report["process"], report["layer"]
        # The page's numbers are /metrics' numbers.
        assert process["websockets_open"] == SOCKETS == metric(prom, "channels_websockets_open"), process
        assert process["dropped"].get("too_large") == metric(prom, "channels_dropped_total", reason="too_large") == 1, process
        assert process["http_requests"] == metric(prom, "channels_http_requests_total") >= 22, process
        assert process["group_sends"] == metric(prom, "channels_group_sends_total") >= 5, process
        assert process["group_members_reached"] == metric(prom, "channels_group_members_reached_total") >= 5 * SOCKETS, process
        groups = {g["name"]: g["members"] for g in layer["groups"]}
        assert groups.get("chat-ops") == SOCKETS, groups
        assert "websocket.receive" in [c["name"] for c in layer["channels"]], layer["channels"]

        # stats on the embedded layer, through the running server.
        out = subprocess.run([CHAT, "stats", "--server", "http://127.0.0.1:%d" % metrics_port, "--admin-token", TOKEN,
                              "--json"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        stats = json.loads(out.stdout)
        assert stats["groups"].get("chat-ops") == SOCKETS, stats
        refused = subprocess.run([CHAT, "stats", "--server", "http://127.0.0.1:%d" % metrics_port],
                                 capture_output=True, text=True, timeout=30)
        assert refused.returncode != 0 and "401" in refused.stderr, refused.stderr
        # The page is never served off loopback without a token, nor without a metrics port.
        for args, hint in ((["--admin", "--metrics-port", "0", "--metrics-bind", "0.0.0.0"], "--admin-token"),
                           (["--admin"], "--metrics-port")):
            env_no_token = {k: v for k, v in env.items() if k != "CHANNELS_ADMIN_TOKEN"}
            refused = subprocess.run([CHAT, "runserver", "--port", "0", *args], capture_output=True, text=True,
                                     timeout=30, env=env_no_token)
            assert refused.returncode != 0 and hint in refused.stderr, (args, refused.stderr)
        no_layer = subprocess.run([CHAT, "stats"], capture_output=True, text=True, timeout=30)
        assert no_layer.returncode != 0 and "--server" in no_layer.stderr, no_layer.stderr

        driver = browser()
        driver.get("http://127.0.0.1:%d/admin?token=%s" % (metrics_port, TOKEN))
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        wait.until(lambda d: d.find_element(By.ID, "sockets").text == str(SOCKETS))
        wait.until(lambda d: "chat-ops" in d.find_element(By.ID, "groups").text)
        assert str(SOCKETS) in driver.find_element(By.ID, "groups").text
        wait.until(lambda d: "too_large" in d.find_element(By.ID, "reasons").text)
        # The charts draw once the sampler has two points (one every 2 s).
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#c-sockets polyline"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#c-rate polyline"))
        # Close ten sockets: the page follows without a reload.
        loop.run_until_complete(close(sockets[:10]))
        wait.until(lambda d: d.find_element(By.ID, "sockets").text == str(SOCKETS - 10))
        wait.until(lambda d: "%d" % (SOCKETS - 10) in d.find_element(By.ID, "groups").text)
        driver.set_window_size(1200, 1300)
        shot = os.path.join(ARTIFACTS, "admin-page.png")
        driver.save_screenshot(shot)
        assert os.path.getsize(shot) > 10000, "screenshot too small"
        loop.run_until_complete(close(sockets[10:]))
        print("admin page: %d sockets, groups %s, drops %s; screenshot %s" % (
            SOCKETS, groups, process["dropped"], shot), flush=True)
    finally:
        if driver:
            driver.quit()
        loop.close()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    print("admin page test passed", flush=True)


if __name__ == "__main__":
    main()
