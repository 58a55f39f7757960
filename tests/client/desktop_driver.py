"""Drives the desktop example (``examples/desktop_chat/app.py``) in a real window, as a user would,
in a process of its own (Qt wants the main thread and one application per process):

1. starts signed in (a password sign-in into an in-memory keyring, never the real one), sends a
   message and waits for the streamed reply and its cost;
2. the wallet is emptied from outside (a tool charge), the live balance shows $0.00;
3. the next message is refused (402): the out-of-credit prompt appears; a screenshot is taken;
4. "Top up and continue": the app opens a one-time link (here: followed with httpx, and the
   payment provider's signed webhook posted, as Lemon Squeezy would), the balance event arrives,
   and the refused message is sent again by itself and answered.

Writes what the page showed at each step to ``--out`` (JSON) for the test to assert on.

    python -m tests.client.desktop_driver --server URL --email E --password P --user-id N \
        --variant 412233 --out results.json --screenshot var/desktop_chat.png
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import keyring
import webview
from tokentill import Tokentill

from tests.client.memory_keyring import MemoryKeyring
from tests.fake_payment_apis import ls_order, ls_signature

APP = Path(__file__).resolve().parents[2] / "examples" / "desktop_chat" / "app.py"
TIMEOUT = 30.0  # seconds for any one thing to show up on the page

GRAB = """
import sys
from PySide6.QtGui import QGuiApplication
app = QGuiApplication([])
x, y, w, h = (int(v) for v in sys.argv[2:6])
image = app.primaryScreen().grabWindow(0, x, y, w, h)
sys.exit(0 if image.save(sys.argv[1]) else 1)
"""


def load_app():
    spec = importlib.util.spec_from_file_location("desktop_chat_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait_for(window, expression: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        value = window.evaluate_js(expression)
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"the page never showed: {expression}")
        time.sleep(0.1)


def text(window, selector: str) -> str:
    return window.evaluate_js(f"(document.querySelector({json.dumps(selector)}) || {{}}).textContent || ''")


def screenshot(window, path: str) -> None:
    """The window as the screen shows it, grabbed from the X server by a separate Qt process."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    geometry = [str(max(window.x, 0)), str(max(window.y, 0)), str(window.width), str(window.height)]
    subprocess.run([sys.executable, "-c", GRAB, path, *geometry], check=True, timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--server", "--email", "--password", "--user-id", "--variant", "--out", "--screenshot", "--model"):
        parser.add_argument(name, required=name != "--model")
    args = parser.parse_args()

    keyring.set_keyring(MemoryKeyring())
    client = Tokentill(args.server, app_name="Tokentill Chat")
    client.login_with_password(args.email, args.password)
    paid = []

    def pay_in_the_browser(url: str) -> None:
        # What the user's browser does: the one-time link signs it in and lands on the top-up page…
        with httpx.Client(follow_redirects=True) as browser:
            landed = browser.get(url)
        paid.append({"landed": str(landed.url), "status": landed.status_code})
        # …and once they pay, Lemon Squeezy's signed webhook credits the wallet.
        order = ls_order(user_id=args.user_id, variant_id=int(args.variant), total_cents=1000, order_id=7001)
        body = json.dumps(order).encode()
        headers = {"X-Event-Name": "order_created", "X-Signature": ls_signature(body)}
        headers["Content-Type"] = "application/json"
        httpx.post(args.server + "/webhooks/lemonsqueezy", content=body, headers=headers).raise_for_status()

    chat = load_app()
    app = chat.ChatApp(client, model=args.model or "openai/gpt-4o-mini", open_browser=pay_in_the_browser)
    window = chat.create_window(app)
    results: dict = {}

    def drive() -> None:
        try:
            signed_in = "!document.getElementById('chat').hidden"
            wait_for(window, f"{signed_in} && document.getElementById('balance').dataset.value")
            results["account"] = text(window, "#account")
            results["balance_before"] = text(window, "#balance")

            window.evaluate_js("app.sendMessage('Say pong')")
            wait_for(window, "document.querySelectorAll('#messages li.assistant .cost').length === 1")
            results["reply"] = window.evaluate_js(
                "document.querySelector('#messages li.assistant').firstChild.textContent"
            )
            results["cost"] = text(window, "#messages li.assistant .cost")
            results["balance_after_reply"] = text(window, "#balance")

            client.charge(client.balance().available, "everything left", idempotency_key="drain")
            wait_for(window, "document.getElementById('balance').textContent === '$0.00'")

            window.evaluate_js("app.sendMessage('And again')")
            wait_for(window, "!document.getElementById('out-of-credit').hidden")
            results["prompt"] = text(window, "#out-of-credit")
            results["assistant_messages_when_refused"] = window.evaluate_js(
                "document.querySelectorAll('#messages li.assistant').length"
            )
            screenshot(window, args.screenshot)

            window.evaluate_js("document.getElementById('topup-continue').click()")
            wait_for(window, "document.querySelectorAll('#messages li.assistant .cost').length === 2")
            results["prompt_hidden_after_topup"] = window.evaluate_js("document.getElementById('out-of-credit').hidden")
            results["second_reply"] = window.evaluate_js(
                "document.querySelectorAll('#messages li.assistant')[1].firstChild.textContent"
            )
            results["balance_after_topup"] = text(window, "#balance")
            results["paid"] = paid
        except Exception as error:  # reported to the test, which fails with it
            results["error"] = f"{type(error).__name__}: {error}"
        finally:
            window.destroy()

    webview.start(drive, gui=os.environ.get("PYWEBVIEW_GUI") or None)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
