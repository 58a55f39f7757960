"""The desktop example in a real window (pywebview on Qt WebEngine, under Xvfb) against the live
server: a streamed reply with its cost, the live balance, a 402 as a friendly prompt, and the top-up
that sends the refused message again by itself. The window's screenshot is saved to
``var/desktop_chat.png`` (the README's picture is one of these)."""

import json
import os
import select
import shutil
import subprocess
import sys
import time

import pytest

from tests.client.conftest import PASSWORD
from tests.conftest import make_user
from tests.fake_upstream import StreamReply, stream_of, usage
from tests.live import BASE_DIR

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.desktop]

SCREENSHOT = BASE_DIR / "var" / "desktop_chat.png"


@pytest.fixture(scope="module")
def display():
    """An X server in memory for the module's windows; its display name."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        reason = "Xvfb is not installed (scripts/ensure-gui installs it as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"the desktop test cannot run on CI: {reason}")
        pytest.skip(reason)
    read, write = os.pipe()
    proc = subprocess.Popen(
        [xvfb, "-displayfd", str(write), "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
        pass_fds=(write,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    # Xvfb writes "<number>\n" once it accepts connections. The read end stays open while it
    # runs: closed early, a write it has not finished fails and Xvfb exits ("Cannot write display
    # number to fd").
    number, deadline = b"", time.monotonic() + 30
    while not number.endswith(b"\n") and time.monotonic() < deadline:
        if select.select([read], [], [], 1)[0]:
            chunk = os.read(read, 32)
            if not chunk:
                break
            number += chunk
    if not number.strip():
        proc.kill()
        os.close(read)
        pytest.fail("Xvfb did not report a display within 30 s")
    yield f":{number.decode().strip()}"
    proc.terminate()
    proc.wait(timeout=10)
    os.close(read)


@pytest.fixture
def starter_pack(db):
    from payments.models import CreditPack
    from payments.seed import seed_packs

    seed_packs(CreditPack)  # transactional tests flush the seeded rows
    CreditPack.objects.filter(slug="starter").update(lemonsqueezy_variant_id="412233")
    return CreditPack.objects.get(slug="starter")


def test_chat_run_out_top_up_and_continue_in_a_real_window(
    display, server, fake_upstream, price, starter_pack, tmp_path, real_passwords
):
    alice = make_user("alice@example.com", balance="0.50")
    u = usage(20, 3, cost="0.000012")
    replies = StreamReply(stream_of("Po", "ng", ".", u=u)), StreamReply(stream_of("Again", "!", u=u))
    fake_upstream.script("chat", *replies)
    out = tmp_path / "results.json"
    env = {
        **os.environ,
        "DISPLAY": display,
        "PYWEBVIEW_GUI": "qt",
        "QT_QPA_PLATFORM": "xcb",
        "QTWEBENGINE_CHROMIUM_FLAGS": "--disable-gpu",
        "TOKENTILL_DOTENV": "off",
    }
    if os.geteuid() == 0:
        env["QTWEBENGINE_DISABLE_SANDBOX"] = "1"  # Chromium's sandbox refuses to run as root
    command = [sys.executable, "-m", "tests.client.desktop_driver", "--server", server]
    command += ["--email", alice.email, "--password", PASSWORD, "--user-id", str(alice.pk), "--variant", "412233"]
    command += ["--out", str(out), "--screenshot", str(SCREENSHOT)]
    done = subprocess.run(command, cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=240)
    assert out.exists(), done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert "error" not in results, (results, done.stderr[-3000:])

    assert results["account"] == "alice@example.com"
    assert results["balance_before"] == "$0.50"
    assert results["reply"] == "Pong."
    assert results["cost"] == "cost $0.000014"
    assert results["balance_after_reply"] == "$0.50"  # 0.4999856: the display rounds to cents

    assert "You're out of credit." in results["prompt"] and "Your balance is $0.00" in results["prompt"]
    assert results["assistant_messages_when_refused"] == 1  # the refused reply left no empty bubble
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert results["paid"][0]["landed"].endswith("/topup") and results["paid"][0]["status"] == 200
    assert results["prompt_hidden_after_topup"] is True
    assert results["second_reply"] == "Again!"
    assert results["balance_after_topup"] == "$10.00"
