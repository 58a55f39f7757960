"""The ``tokentill`` command: each subcommand's output and exit code against a live server."""

import subprocess
import sys
from pathlib import Path

import pytest
from tokentill import cli

from tests.client.conftest import PASSWORD
from tests.conftest import make_user

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def tokentill(server, memory_keyring, capsys, real_passwords):
    """Run ``tokentill --server <live server> ARGS…`` in-process: (exit code, stdout, stderr)."""

    def run(*args: str):
        code = cli.main(["--server", server, *args], keyring_backend=memory_keyring)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_login_with_a_password_then_balance_usage_and_logout(tokentill, monkeypatch, memory_keyring):
    make_user("alice@example.com", balance="12.50")
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt: PASSWORD)  # the terminal's hidden prompt
    code, out, _ = tokentill("login", "--password", "--email", "alice@example.com")
    assert (code, out) == (cli.OK, "Signed in as alice@example.com\n")

    code, out, _ = tokentill("balance")
    assert code == cli.OK
    assert "Balance:   $12.50" in out and "Available: $12.50  (ok)" in out

    code, out, _ = tokentill("usage")
    assert (code, out) == (cli.OK, "No usage yet.\n")

    code, out, _ = tokentill("logout")
    assert (code, out) == (cli.OK, "Signed out alice@example.com\n")
    assert memory_keyring.entries == {}

    code, _, err = tokentill("balance")
    assert code == cli.NOT_SIGNED_IN and "tokentill login" in err


def test_a_wrong_password_exits_not_signed_in(tokentill, monkeypatch):
    make_user("alice@example.com")
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt: "wrong")
    code, _, err = tokentill("login", "--password", "--email", "alice@example.com")
    assert code == cli.NOT_SIGNED_IN and "invalid email or password" in err


def test_an_unreachable_server_is_a_clear_failure(memory_keyring, capsys):
    make_user("alice@example.com")
    code = cli.main(["--server", "http://127.0.0.1:9", "balance"], keyring_backend=memory_keyring)
    # Not signed in to that server at all: said before any connection is tried.
    assert code == cli.NOT_SIGNED_IN
    capsys.readouterr()


def test_the_spinner_only_spins_on_a_terminal(capsys):
    with cli.spinner("Waiting…"):
        pass
    assert capsys.readouterr().err == "Waiting…\n"  # a pipe or a log gets one plain line


def test_the_console_script_is_installed():
    script = Path(sys.executable).with_name("tokentill")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "login" in done.stdout and "--server" in done.stdout


def test_on_a_terminal_the_spinner_spins_and_wipes_its_line():
    import os
    import select
    import time

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
