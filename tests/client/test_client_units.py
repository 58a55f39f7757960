"""The client package's parts that need no server: the stream tail parser, the spinner, the
installed console script."""

import os
import select
import subprocess
import sys
import time
from pathlib import Path

from tokentill import cli
from tokentill._http import _TailParser


def tail_of(*chunks: bytes) -> list[dict]:
    found: list[dict] = []
    parser = _TailParser(found.append)
    for chunk in chunks:
        parser.feed(chunk)
    return found


def test_the_tail_is_found_whatever_the_chunk_boundaries():
    body = b'data: {"x": 1}\n\n: tokentill {"request_id": "r1", "charge": "0.1", "balance": "2"}\n\ndata: [DONE]\n\n'
    whole = tail_of(body)
    assert whole == [{"request_id": "r1", "charge": "0.1", "balance": "2"}]
    assert tail_of(*(body[i : i + 1] for i in range(len(body)))) == whole
    assert tail_of(body.replace(b"\n", b"\r\n")) == whole


def test_other_comments_and_long_data_lines_are_not_taken_for_the_tail():
    long_line = b"data: " + b"x" * 100_000
    assert tail_of(b": OPENROUTER PROCESSING\n\n", long_line, b"\n\n", b": tokentill not json\n\n") == []
    parser = _TailParser(lambda info: None)
    parser.feed(long_line)
    assert parser._line == b""  # a line that cannot be the tail is skipped, not buffered


def test_the_spinner_only_spins_on_a_terminal(capsys):
    with cli.spinner("Waiting…"):
        pass
    assert capsys.readouterr().err == "Waiting…\n"  # a pipe or a log gets one plain line


def test_on_a_terminal_the_spinner_spins_and_wipes_its_line():

    leader, follower = os.openpty()
    written = ""

    def read_some():
        nonlocal written
        if select.select([leader], [], [], 1)[0]:
            written += os.read(leader, 10_000).decode()

    with open(follower, "w", encoding="utf-8") as terminal:
        with cli.spinner("Waiting…", stream=terminal):
            deadline = time.monotonic() + 30
            while written.count("Waiting…") < 2 and time.monotonic() < deadline:
                read_some()  # until it has been redrawn with a second frame
        read_some()
    os.close(leader)
    frames = [part for part in written.split("\r") if "Waiting…" in part]
    assert len(frames) >= 2 and frames[0] != frames[1]  # a new frame each time
    assert written.endswith("\r\x1b[K")  # and the line is gone when the wait is over


def test_the_console_script_is_installed():
    script = Path(sys.executable).with_name("tokentill")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "login" in done.stdout and "--server" in done.stdout


# The poll interval the fake device endpoint names: a fraction of RFC 8628's whole seconds, which
# the client reads as a number of seconds all the same, so the test waits tenths, not seconds.
INTERVAL = 0.3


class FakeDeviceServer:
    """Just the device endpoints of a Tokentill server, on loopback, answering what the test
    scripts — for the RFC 8628 corners a real server only reaches by timing (slow_down)."""

    def __init__(self, answers: list[tuple[int, dict]]):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.answers, self.polls = list(answers), []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, body):
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/api/auth/device":
                    uri = f"{fake.url}/device"
                    code = {"device_code": "dc", "user_code": "ABCD-EFGH", "verification_uri": uri}
                    code.update(verification_uri_complete=uri + "?code=ABCD-EFGH", expires_in=60, interval=INTERVAL)
                    self.reply(200, code)
                else:
                    fake.polls.append(time.monotonic())
                    self.reply(*fake.answers.pop(0))

            def do_GET(self):  # /api/auth/me
                self.reply(200, {"id": 7, "email": "desk@example.com"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_the_device_flow_waits_longer_after_slow_down(memory_keyring):
    from tokentill import Tokentill

    pending = (400, {"error": "authorization_pending", "detail": "waiting"})
    slow_down = (400, {"error": "slow_down", "detail": "too fast", "interval": 3 * INTERVAL})
    pair = (200, {"access": "a", "refresh": "ttr_r", "expires_in": 900})
    fake = FakeDeviceServer([pending, slow_down, pair])
    client = Tokentill(fake.url, keyring_backend=memory_keyring)
    try:
        account = client.login_in_browser(open_browser=lambda url: None, on_code=lambda code: None)
    finally:
        client.close()
        fake.close()
    assert account.email == "desk@example.com"
    first, second, third = fake.polls
    assert second - first >= INTERVAL and third - second >= 3 * INTERVAL  # the interval, then the one slow_down named
