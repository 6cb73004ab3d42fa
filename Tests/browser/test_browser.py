"""A real browser test of the example's page: two headless Chromium sessions (Debian's
chromium + chromium-driver, driven by Selenium) log in, join one room; one sends, the other
sees it. Saves screenshots of both windows as test artifacts.

Run by scripts/test.sh: test_browser.py CHAT_BINARY ARTIFACT_DIR
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

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
    wait = WebDriverWait(driver, 20)
    wait.until(EC.visibility_of_element_located((By.ID, "username"))).send_keys(name)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "registerbutton").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "me"), name))
    # The socket reconnects with the session cookie after login; wait until it is live.
    wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "live in #"))


def main():
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="chat-browser-")
    env = dict(os.environ, CHAT_DATABASE=os.path.join(workdir, "chat.sqlite3"))
    log = open(os.path.join(ARTIFACTS, "browser-runserver.log"), "w")
    server = subprocess.Popen([CHAT, "runserver", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    drivers = []
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise AssertionError("runserver did not start")
                time.sleep(0.1)
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
