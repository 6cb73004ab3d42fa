"""A real browser test of the example's page: two headless Chromium sessions (Debian's
chromium + chromium-driver, driven by Selenium) log in, join one room; one sends, the other
sees it. Then the JavaScript client's recovery: a page's server is SIGKILLed and restarted
while messages are posted through another server; the page reconnects on its own and shows
each message once, in order, and who is online. Saves screenshots as test artifacts.

Run by scripts/test.sh: test_browser.py CHAT_BINARY ARTIFACT_DIR
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import json

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))
from ports import free_port  # noqa: E402

CHAT, ARTIFACTS = sys.argv[1], sys.argv[2]
os.makedirs(ARTIFACTS, exist_ok=True)




def browser():
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,800", "--user-data-dir=" + tempfile.mkdtemp(prefix="chrome-")):
        options.add_argument(arg)
    options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    service = Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def log_in(driver, url, name, password):
    driver.get(url)
    # Registration hashes with PBKDF2 (870,000 rounds) on the debug build, beside the rest of the
    # suite's load: the bound allows for it.
    wait = WebDriverWait(driver, 45)
    wait.until(EC.visibility_of_element_located((By.ID, "username"))).send_keys(name)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "registerbutton").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "me"), name))
    # The socket reconnects with the session cookie after login; wait until it is live.
    wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "live in #"))


def wait_port(port, proc, timeout=30):
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                raise AssertionError("runserver did not start on %d" % port)
            time.sleep(0.1)


def recovery_in_the_browser():
    """Redis, servers A and B (--noworker), one worker. A page on A; A is SIGKILLed; 20
    messages are posted through B; A comes back on its port; the page recovers them."""
    from websockets.sync.client import connect
    workdir = tempfile.mkdtemp(prefix="chat-browser-recovery-")
    redis_port = free_port()
    subprocess.run(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--daemonize", "yes",
                    "--dir", workdir, "--pidfile", workdir + "/redis.pid", "--logfile", workdir + "/redis.log"], check=True)
    layer = "redis://127.0.0.1:%d/0?prefix=browser:" % redis_port
    env = dict(os.environ, CHAT_DATABASE=os.path.join(workdir, "chat.sqlite3"))
    log = open(os.path.join(ARTIFACTS, "browser-recovery.log"), "w")

    def start(port):
        proc = subprocess.Popen([CHAT, "runserver", "--noworker", "--layer", layer, "--port", str(port), "--presence-ttl", "3"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_port(port, proc)
        return proc
    port_a, port_b = free_port(), free_port()
    procs = []
    driver = None
    poster = None
    try:
        for _ in range(100):
            if subprocess.run(["redis-cli", "-p", str(redis_port), "ping"], capture_output=True).stdout.strip() == b"PONG":
                break
            time.sleep(0.05)
        worker = subprocess.Popen([CHAT, "runworker", "--layer", layer], stdout=log, stderr=subprocess.STDOUT, env=env)
        procs.append(worker)
        server_a = start(port_a)
        server_b = start(port_b)
        procs += [server_a, server_b]
        room = "recovery"
        driver = browser()
        log_in(driver, "http://127.0.0.1:%d/#%s" % (port_a, room), "dave", "dave-pass")
        poster = connect("ws://127.0.0.1:%d/chat/%s/" % (port_b, room), open_timeout=15)
        poster.server_frames = True
        frames = []

        def read_until(check, what, timeout=20):
            deadline = time.time() + timeout
            while time.time() < deadline:
                try:
                    frames.append(json.loads(poster.recv(timeout=max(0.05, deadline - time.time()))))
                except TimeoutError:
                    break
                if check():
                    return
            raise AssertionError("the poster timed out waiting for " + what)
        read_until(lambda: any(f.get("type") == "presence" for f in frames), "its presence list")
        poster_name = next(f for f in frames if f.get("type") == "presence")
        online = lambda: [e.text.replace(" (you)", "") for e in driver.find_elements(By.CSS_SELECTOR, "#online div")]
        WebDriverWait(driver, 20).until(lambda d: len(online()) == 2)
        everyone = sorted(online())
        assert "dave" in everyone, everyone
        del poster_name
        server_a.send_signal(signal.SIGKILL)
        server_a.wait(10)
        WebDriverWait(driver, 20).until(EC.text_to_be_present_in_element((By.ID, "status"), "reconnecting"))
        texts = ["while away %d" % i for i in range(20)]
        for text in texts:
            poster.send(text)
        read_until(lambda: sum(1 for f in frames if f.get("type") == "message") >= 20, "its 20 messages back")
        server_a = start(port_a)
        procs.append(server_a)
        WebDriverWait(driver, 30).until(EC.text_to_be_present_in_element((By.ID, "status"), "live in #"))
        WebDriverWait(driver, 20).until(EC.text_to_be_present_in_element((By.ID, "log"), texts[-1]))
        shown = [e.find_element(By.CSS_SELECTOR, ".text").text for e in driver.find_elements(By.CSS_SELECTOR, "#log .msg")]
        got = [t for t in shown if t.startswith("while away")]
        assert got == texts, got
        WebDriverWait(driver, 20).until(lambda d: sorted(online()) == everyone)
        # Live again after the recovery, once.
        poster.send("after the recovery")
        WebDriverWait(driver, 20).until(EC.text_to_be_present_in_element((By.ID, "log"), "after the recovery"))
        time.sleep(0.5)
        shown = [e.find_element(By.CSS_SELECTOR, ".text").text for e in driver.find_elements(By.CSS_SELECTOR, "#log .msg")]
        assert shown.count("after the recovery") == 1 and all(shown.count(t) == 1 for t in texts), shown
        # The page's own channels.js orders one user's presence changes by version (diffs from two
        # servers can cross on the way): a stale leave, or a change older than the list, is ignored.
        present = driver.execute_script("""
            const s = Object.create(ChannelsSocket.prototype);
            Object.assign(s, {options: {}, listeners: {}, position: null, users: new Set(),
                              presenceVersion: 0, userVersions: new Map()});
            s.receive('{"type":"presence","users":["a"],"version":5}');
            s.receive('{"type":"presence_diff","joins":["b"],"leaves":[],"versions":{"b":9}}');
            s.receive('{"type":"presence_diff","joins":[],"leaves":["b"],"versions":{"b":8}}');
            s.receive('{"type":"presence_diff","joins":[],"leaves":["a"],"versions":{"a":4}}');
            s.receive('{"type":"presence_diff","joins":["c"],"leaves":[],"versions":{"c":6}}');
            return Array.from(s.users).sort();
        """)
        assert present == ["a", "b", "c"], "channels.js applied stale presence changes: %s" % present
        path = os.path.join(ARTIFACTS, "browser-recovery.png")
        driver.save_screenshot(path)
        print("screenshot:", path)
        print("PASS browser recovery: server SIGKILLed and restarted, 20 messages posted through another server meanwhile "
              "shown once each, in order; online list %s again; stale presence changes ignored by version" % everyone)
    finally:
        if poster:
            poster.close()
        if driver:
            driver.quit()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        try:
            os.kill(int(open(workdir + "/redis.pid").read()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def main():
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="chat-browser-")
    env = dict(os.environ, CHAT_DATABASE=os.path.join(workdir, "chat.sqlite3"))
    log = open(os.path.join(ARTIFACTS, "browser-runserver.log"), "w")
    server = subprocess.Popen([CHAT, "runserver", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    drivers = []
    try:
        wait_port(port, server)
        room = "browsers"
        url = "http://127.0.0.1:%d/#%s" % (port, room)
        alice, bob = browser(), browser()
        drivers = [alice, bob]
        log_in(alice, url, "alice", "alice-pass")
        log_in(bob, url, "bob", "bob-pass")
        # The room is empty (a fresh database): both pages say so.
        for driver in (alice, bob):
            WebDriverWait(driver, 20).until(EC.text_to_be_present_in_element((By.ID, "log"), "No messages yet"))
        text = "hello from alice at %d" % time.time_ns()
        box = alice.find_element(By.ID, "text")
        box.send_keys(text)
        alice.find_element(By.ID, "send").click()
        for driver, who in ((bob, "bob"), (alice, "alice")):
            WebDriverWait(driver, 20).until(EC.text_to_be_present_in_element((By.ID, "log"), text))
            messages = driver.find_elements(By.CSS_SELECTOR, "#log .msg")
            assert any(text in m.text and "alice" in m.text for m in messages), (who, [m.text for m in messages])
            # The room's first message replaces the "empty room" notice (it used to stay beside it).
            shown = driver.find_element(By.ID, "log").text
            assert "No messages yet" not in shown, (who, shown)
        # A third session that joins later sees the message in the room's history.
        carol = browser()
        drivers.append(carol)
        log_in(carol, url, "carol", "carol-pass")
        WebDriverWait(carol, 20).until(EC.text_to_be_present_in_element((By.ID, "log"), text))
        shown = carol.find_element(By.ID, "log").text
        assert "No messages yet" not in shown and shown.count(text) == 1, shown
        for driver, name in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
            path = os.path.join(ARTIFACTS, "browser-%s.png" % name)
            driver.save_screenshot(path)
            print("screenshot:", path)
        print("PASS browser: two sessions logged in, one sent, the other saw it; a late joiner saw the history")
        recovery_in_the_browser()
        return 0
    finally:
        for d in drivers:
            try:
                d.quit()
            except Exception:
                pass
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        import traceback
        traceback.print_exc()
        print("FAIL browser")
        sys.exit(1)
