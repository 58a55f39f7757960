"""Tokentill Chat: a small desktop app on the ``tokentill`` client package.

Sign in through the browser, chat with streaming replies, the balance always visible and updated
live, a "Top up" button, and a 402 shown as a friendly prompt that opens the checkout and sends
the message as soon as the money arrives.

    pip install ./clients/python "pywebview[pyside6]"    # or pywebview with GTK where you have it
    python examples/desktop_chat/app.py --server http://127.0.0.1:8000

The page (``ui/``) only draws; every call to Tokentill is here. pywebview runs the methods of
``ChatApp`` that the page calls in worker threads, so they may block; they push what changed back
to the page with ``window.run_js``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import webbrowser
from collections.abc import Callable
from pathlib import Path
from typing import Any

import webview
from tokentill import Charge, InsufficientFunds, LoginFailed, SignedOut, Tokentill, TokentillError, TopupTimeout

UI = Path(__file__).resolve().parent / "ui" / "index.html"
APP_NAME = "Tokentill Chat"


class ChatApp:
    """What the page can ask for (public methods) and the app's state (private attributes:
    pywebview exposes public attributes to the page too)."""

    def __init__(
        self,
        client: Tokentill,
        *,
        model: str = "tokentill/demo",
        open_browser: Callable[[str], Any] = webbrowser.open,
    ):
        self._client = client
        self._model = model
        self._open_browser = open_browser
        self._history: list[dict] = []
        self._pending: str | None = None  # the message a 402 refused, sent again after a top-up
        self._watcher: tuple[asyncio.AbstractEventLoop, asyncio.Task] | None = None
        self._window: Any = None
        client.on_charge(self._charged)

    # --- called by the page ------------------------------------------------------------------

    def state(self) -> dict:
        account = self._client.account
        if account is None:
            return {"account": None, "balance": None}
        try:
            balance = str(self._client.balance().balance)
        except SignedOut:
            return {"account": None, "balance": None}
        self._watch_balance()
        return {"account": account.email, "balance": balance}

    def sign_in(self) -> None:
        try:
            self._client.login_in_browser(
                APP_NAME,
                open_browser=self._open_browser,
                on_code=lambda code: self._push("showCode", code.user_code, code.verification_uri),
            )
        except LoginFailed as failed:
            self._push("setSignInStatus", f"Sign-in failed: {failed}. Try again.")
            return
        self._push("setState", self.state())

    def sign_out(self) -> None:
        self._stop_watching()
        self._client.logout()
        self._history.clear()
        self._push("setState", {"account": None, "balance": None})

    def send(self, text: str) -> None:
        self._push("addUser", text)
        self._complete(text)

    def top_up(self, pack: str | None = None) -> None:
        try:
            balance = self._client.topup(pack, open_browser=self._open_browser, timeout=900)
        except TopupTimeout:
            self._push("setTopupStatus", "No payment arrived yet. Press the button to try again.")
            self._push("showOutOfCredit", "The checkout is still open in your browser.")
            return
        self._push("setBalance", str(balance))
        self._push("hideOutOfCredit")
        if self._pending is not None:
            text, self._pending = self._pending, None
            self._complete(text)

    # --- the model call ----------------------------------------------------------------------

    def _complete(self, text: str) -> None:
        messages = [*self._history, {"role": "user", "content": text}]
        self._push("startAssistant")
        reply = []
        try:
            stream = self._client.openai().chat.completions.create(model=self._model, messages=messages, stream=True)
            for chunk in stream:
                piece = chunk.choices[0].delta.content if chunk.choices else None
                if piece:
                    reply.append(piece)
                    self._push("appendToken", piece)
        except InsufficientFunds as short:
            self._pending = text
            needed = f" This message needs ${short.needed:.2f}." if short.needed is not None else ""
            self._push("showOutOfCredit", f"Your balance is ${short.balance or 0:.2f}.{needed}")
            return
        except SignedOut:
            self._push("setState", {"account": None, "balance": None})
            return
        except Exception as error:  # the network, the server: say so in the chat, keep the app alive
            self._push("failAssistant", f"Something went wrong: {error}")
            return
        self._history = [*messages, {"role": "assistant", "content": "".join(reply)}]
        charge = self._client.last_charge
        self._push("finishAssistant", f"{charge:.6f}" if charge is not None else None)

    def _charged(self, charge: Charge) -> None:
        # The balance after a reply is known at once from the response; the socket confirms it.
        if charge.balance is not None:
            self._push("setBalance", str(charge.balance))

    # --- the live balance --------------------------------------------------------------------

    def _watch_balance(self) -> None:
        if self._watcher is not None:
            return
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()

            async def watch() -> None:
                try:
                    async for event in self._client.watch_balance():
                        self._push("setBalance", str(event.balance))
                except SignedOut:
                    self._push("setState", {"account": None, "balance": None})

            task = loop.create_task(watch())
            self._watcher = (loop, task)
            ready.set()
            try:
                loop.run_until_complete(task)
            except (asyncio.CancelledError, TokentillError):
                pass
            finally:
                loop.close()

        threading.Thread(target=run, name="balance-watcher", daemon=True).start()
        ready.wait()

    def _stop_watching(self) -> None:
        if self._watcher is not None:
            loop, task = self._watcher
            self._watcher = None
            loop.call_soon_threadsafe(task.cancel)

    # --- the window --------------------------------------------------------------------------

    def _push(self, function: str, *args: Any) -> None:
        if self._window is not None:
            self._window.run_js(f"window.app.{function}({', '.join(json.dumps(a) for a in args)})")


def create_window(app: ChatApp, **window_options: Any) -> Any:
    """The app's window (shown by ``webview.start()``)."""
    app._window = webview.create_window(
        APP_NAME, url=str(UI), js_api=app, width=760, height=620, min_size=(480, 420), **window_options
    )
    return app._window


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default=os.environ.get("TOKENTILL_URL") or "http://127.0.0.1:8000")
    parser.add_argument("--model", default="tokentill/demo")
    args = parser.parse_args(argv)
    create_window(ChatApp(Tokentill(args.server, app_name=APP_NAME), model=args.model))
    webview.start()


if __name__ == "__main__":
    main()
