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
