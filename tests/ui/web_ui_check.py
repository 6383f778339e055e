#!/usr/bin/env python3
"""Drives llamapool's web page in a real browser (Debian's headless Chromium through
chromedriver and Selenium) against a running router with two ready workers and an API key.

    web_ui_check.py BASE_URL API_KEY SCREENSHOT [SCREENSHOT...]

Run by tests/tests/web_ui.rs, which starts the router. Prints one line per step and `ok` at
the end; any failed check raises with what was expected and what the page showed. The
screenshot of the whole page is written to every SCREENSHOT path.
"""

import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# The machine has no internet: nothing in Chromium may try to reach it.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1440,1000",
    "--force-device-scale-factor=1",
    "--lang=en-US",
]

base, key, shots = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3:]
started = time.monotonic()


def step(text):
    print(f"[{time.monotonic() - started:5.1f}s] {text}", flush=True)


def api(path):
    request = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def wait_for(what, check, timeout=30.0, every=0.05, show=None):
    """Polls `check` until it returns something truthy; fails naming `what` and the last
    value (or what `show` returns then)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as e:  # the page may be between two renders
            last = e
        else:
            if last:
                return last
        time.sleep(every)
    if show is not None:
        last = show()
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


profile = tempfile.mkdtemp(prefix="llamapool-chromium-")
options = webdriver.ChromeOptions()
options.binary_location = CHROMIUM
for flag in FLAGS + [f"--user-data-dir={profile}"]:
    options.add_argument(flag)
options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
# The admin buttons ask for confirmation: leave the dialog open for the test to accept.
options.set_capability("unhandledPromptBehavior", "ignore")
driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
driver.set_script_timeout(10)


def js(script, *args):
    return driver.execute_script(script, *args)


def rows():
    """The worker table as the page shows it."""
    return js(
        """return [...document.querySelectorAll('#workers-body tr[data-worker-id]')].map(tr => ({
             id: tr.dataset.workerId,
             placement: tr.children[1].textContent,
             shape: tr.querySelector('.c-shape').textContent,
             state: tr.querySelector('.c-state .pill').textContent,
             restarts: tr.querySelector('.c-restarts').textContent,
             inflight: tr.querySelector('.c-inflight').textContent }));"""
    )


def last_answer():
    return js(
        """const all = document.querySelectorAll('#messages .msg-assistant');
           const m = all[all.length - 1];
           return m ? {state: m.dataset.state, text: m.querySelector('.text').textContent,
                       meta: m.querySelector('.meta').textContent} : null;"""
    )


def set_field(element_id, value):
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def ask(prompt, max_tokens, temperature=0):
    """Types a message with these settings and sends it; records the answer's length after
    every change of the page (window.__lengths: [ms, length])."""
    set_field("temperature", temperature)
    set_field("max-tokens", max_tokens)
    js(
        """window.__lengths = [];
           const box = document.getElementById('messages');
           if (window.__observer) window.__observer.disconnect();
           window.__observer = new MutationObserver(() => {
             const all = box.querySelectorAll('.msg-assistant');
             const m = all[all.length - 1];
             if (m) window.__lengths.push([performance.now(), m.querySelector('.text').textContent.length]);
           });
           window.__observer.observe(box, {subtree: true, childList: true, characterData: true});"""
    )
    set_field("prompt", prompt)
    driver.find_element(By.ID, "send").click()


def accept_confirm():
    def alert():
        try:
            return driver.switch_to.alert
        except NoAlertPresentException:
            return None

    wait_for("the confirmation dialog", alert, timeout=5).accept()


def admin(worker, action):
    driver.find_element(By.CSS_SELECTOR, f'tr[data-worker-id="{worker}"] button[data-action="{action}"]').click()
    accept_confirm()


try:
    # 1. Without the key: the page loads (it is open) and asks for the key.
    driver.get(base + "/")
    wait_for(
        "the page to ask for the API key",
        lambda: "API key" in driver.find_element(By.ID, "notice").text
        and driver.find_element(By.ID, "notice").is_displayed(),
    )
    assert driver.title == "llamapool", driver.title
    step("without a key the page asks for one")

    # 2. With the key: both workers, ready, with their CPUs; the model's name.
    set_field("api-key", key)
    workers = wait_for(
        "two ready workers in the table",
        lambda: (r := rows()) and len(r) == 2 and all(w["state"] == "ready" for w in r) and r,
    )
    assert [w["id"] for w in workers] == ["0", "1"], workers
    assert "CPU 0" in workers[0]["placement"] and "CPU 1" in workers[1]["placement"], workers
    assert all(" thr" in w["shape"] for w in workers), workers
    wait_for("the model name", lambda: driver.find_element(By.ID, "model").text == "smol")
    assert not driver.find_element(By.ID, "notice").is_displayed()
    step(f"two workers listed: {workers}")

    # 3. The key is kept (localStorage) across a reload and used again.
    driver.refresh()
    wait_for("the workers after a reload", lambda: len(rows()) == 2)
    assert driver.find_element(By.ID, "api-key").get_attribute("value") == key
    step("the key survives a reload")

    # 4. A chat answer streams in: its text grows over time, then it finishes with stats.
    ask("Write a short story about a lighthouse keeper.", 64)
    answer = wait_for(
        "the answer to finish",
        lambda: (a := last_answer()) and a["state"] == "done" and a,
        timeout=60,
        show=last_answer,
    )
    lengths = js("return window.__lengths")
    grew = sorted({n for _, n in lengths if n > 0})
    assert answer["text"], answer
    assert len(grew) >= 3, f"the text arrived in {len(grew)} steps ({lengths}), not streamed"
    assert grew[-1] == len(answer["text"]), (grew, answer)
    spread = max(t for t, n in lengths if n == grew[-1]) - min(t for t, n in lengths if n == grew[0])
    assert spread > 0, lengths
    assert "tok/s" in answer["meta"] and "TTFT" in answer["meta"], answer
    assert "worker 0" in answer["meta"] or "worker 1" in answer["meta"], answer
    step(f"streamed {len(answer['text'])} characters in {len(grew)} steps over {spread:.0f} ms: {answer['meta']}")

    # 5. Stop: a long generation is cut, the text stops growing, the server frees the slot.
    driver.find_element(By.ID, "clear").click()
    # At temperature 0 SmolLM2 counts on to max_tokens (900 tokens, several seconds).
    ask("List the numbers from 1 to 500, separated by commas.", 900)
    wait_for(
        "the long answer to start",
        lambda: (a := last_answer()) and a["state"] == "streaming" and len(a["text"]) > 20,
        timeout=60,
        show=last_answer,
    )
    busy = api("/workers")["workers"]
    assert sum(w["in_flight"] for w in busy) == 1, busy
    assert driver.find_element(By.ID, "stop").is_enabled()
    driver.find_element(By.ID, "stop").click()
    stopped = wait_for(
        "the answer to stop",
        lambda: (a := last_answer()) and a["state"] == "stopped" and a,
        timeout=5,
        show=last_answer,
    )
    time.sleep(1.5)
    after = last_answer()
    assert after["text"] == stopped["text"], "the text kept growing after Stop"
    assert "stopped" in after["meta"], after
    assert not driver.find_element(By.ID, "stop").is_enabled()
    assert driver.find_element(By.ID, "send").is_enabled()
    wait_for(
        "the server to free the slot",
        lambda: all(w["in_flight"] == 0 and not w["running"] for w in api("/workers")["workers"]),
        timeout=10,
    )
    step(f"stopped after {len(after['text'])} characters; the slot is free again")

    # 6. Admin: drain worker 1, then restart it.
    admin(1, "drain")
    wait_for("worker 1 to show draining", lambda: rows()[1]["state"] == "draining")
    assert api("/workers")["workers"][1]["state"] == "draining"
    admin(1, "restart")
    wait_for(
        "worker 1 to be back after the restart",
        lambda: (r := rows()[1])["state"] == "ready" and r["restarts"] == "1",
        timeout=90,
    )
    wait_for("the restart notice", lambda: "restarted" in driver.find_element(By.ID, "notice").text, timeout=5)
    step("drain and restart of worker 1 from the page")

    # 7. A last answer for the picture; the charts have points by now.
    driver.find_element(By.ID, "clear").click()
    ask("In two sentences, why run several small model workers instead of one big one?", 80, 0.7)
    wait_for(
        "the last answer",
        lambda: (a := last_answer()) and a["state"] == "done",
        timeout=60,
        show=last_answer,
    )

    # 8. Load from other clients shows in the live view: four requests, two per worker.
    def load():
        body = {
            "messages": [{"role": "user", "content": "Write a 3000-word article about the ocean."}],
            "max_tokens": 400,
            "ignore_eos": True,
        }
        request = urllib.request.Request(
            base + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        try:
            urllib.request.urlopen(request, timeout=120).read()
        except Exception:
            pass  # the router goes away with the test

    for _ in range(4):
        threading.Thread(target=load, daemon=True).start()
    wait_for(
        "the four requests in the table",
        lambda: [r["inflight"] for r in rows()] == ["2", "2"],
        timeout=10,
        show=rows,
    )
    wait_for("the slots in use", lambda: js("return document.getElementById('t-slots').textContent") == "4/8", timeout=10)
    time.sleep(3)  # two more polls: the throughput chart shows the load
    wait_for("a throughput point above zero", lambda: js("return document.getElementById('t-tps').textContent") not in ("–", "0", "0.0"), timeout=10)
    lines = js("return document.querySelectorAll('#chart-tps path.line').length")
    assert lines >= 1, "the throughput chart has no line"
    dots = js("return document.querySelectorAll('#chart-ttft circle').length")
    assert dots >= 1, "the TTFT chart has no point"

    # No script errors, no blocked resources (Content-Security-Policy); the 401s of step 1
    # are expected.
    errors = [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and "401" not in e["message"]
    ]
    assert not errors, errors

    # The whole page: the window grows to the page's height (plus the window's own frame).
    height = js("return Math.ceil(document.querySelector('main').getBoundingClientRect().bottom)")
    frame = js("return window.outerHeight - window.innerHeight")
    driver.set_window_size(1440, max(600, height) + frame)
    time.sleep(0.5)  # the charts redraw for the new size
    for path in shots:
        assert driver.save_screenshot(path), path
    size = js("return [window.innerWidth, window.innerHeight]")
    step(f"screenshot ({size[0]}x{size[1]}) saved to {', '.join(shots)}")
    print("ok", flush=True)
finally:
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)
