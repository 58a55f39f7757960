"""A throw-away PgBouncer in transaction mode in front of the test PostgreSQL.

``scripts/test`` starts one for the whole run (``python -m tests.pgbouncer <postgres url>`` prints
``TEST_PGBOUNCER_URL=…`` and serves until terminated); a targeted ``pytest`` run without that
variable gets its own from the ``pgbouncer`` fixture (tests/test_scale.py). Debian's package is
``pgbouncer`` (README, Tests); without the binary the tests that need it skip, unless ``CI=true``.

The pool is deliberately small (``default_pool_size``): a server process's 20 async connections
then really share a few server connections, so a statement that leaned on session state (a
prepared statement, a server-side cursor, a ``SET``) would land on a backend that never saw it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

POOL_SIZE = 4  # server connections per database and user
PREPARED_STATEMENTS_SINCE = (1, 21)  # max_prepared_statements: prepared statements survive transaction pooling


def binary() -> str | None:
    """The pgbouncer executable (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    return shutil.which("pgbouncer", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"]))


def version(executable: str) -> tuple[int, int]:
    out = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=10).stdout
    found = re.search(r"PgBouncer (\d+)\.(\d+)", out)
    if not found:
        raise RuntimeError(f"cannot read pgbouncer's version from {out!r}")
    return int(found[1]), int(found[2])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running(postgres_url: str, executable: str | None = None):
    """PgBouncer (transaction mode) on a free loopback port in front of ``postgres_url``'s server;
    yields the pooled server URL without a database name (``postgres://user@127.0.0.1:port``).
    Every database name is forwarded to the same name on the server."""
    executable = executable or binary()
    if executable is None:
        raise RuntimeError("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    target = urlsplit(postgres_url)
    user = target.username or "postgres"
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="tt-pgbouncer-") as directory:
        lines = [
            "[databases]",
            f"* = host={target.hostname or '127.0.0.1'} port={target.port or 5432}",
            "[pgbouncer]",
            f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =",
            # Trust, as the test PostgreSQL itself: the auth file only names who may connect.
            f"auth_type = trust\nauth_file = {directory}/users.txt",
            "pool_mode = transaction",
            f"default_pool_size = {POOL_SIZE}\nmax_client_conn = 2000",
            "ignore_startup_parameters = extra_float_digits",
        ]
        if version(executable) >= PREPARED_STATEMENTS_SINCE:
            lines.append("max_prepared_statements = 200")
        Path(directory, "pgbouncer.ini").write_text("\n".join(lines) + "\n")
        Path(directory, "users.txt").write_text(f'"{user}" ""\n')
        command = [executable, "-q", f"{directory}/pgbouncer.ini"]
        if os.geteuid() == 0:  # it refuses to run as root
            os.chmod(directory, 0o755)
            for name in ("pgbouncer.ini", "users.txt"):
                os.chmod(Path(directory, name), 0o644)
            command[1:1] = ["-u", "postgres"]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_until_listening(proc, port)
            yield f"postgres://{user}@127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _wait_until_listening(proc: subprocess.Popen, port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"pgbouncer exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not listen on {port} within {timeout:.0f} s") from None
            time.sleep(0.05)


@pytest.fixture(scope="session")
def pgbouncer_url():
    """The pooled server URL (no database name): ``scripts/test``'s PgBouncer, else one of our own.
    Without the binary: a skip, or a failure under ``CI=true`` (as an unreachable PostgreSQL is)."""
    if os.environ.get("TEST_PGBOUNCER_URL"):
        yield os.environ["TEST_PGBOUNCER_URL"].rstrip("/")
        return
    if binary() is None:
        message = "needs pgbouncer (Debian: apt-get install pgbouncer)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " and CI=true")
        pytest.skip(message)
    from django.db import connection

    db = connection.settings_dict
    with running(
        f"postgres://{db.get('USER') or 'postgres'}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}"
    ) as url:
        yield url


def _stop(signum, frame):
    raise SystemExit(0)


def main() -> int:
    """``scripts/test``: start one, print where, serve until SIGTERM (then stop it on the way out)."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with running(sys.argv[1]) as url:
        print(f"TEST_PGBOUNCER_URL={url}", flush=True)
        while True:
            signal.pause()


if __name__ == "__main__":
    sys.exit(main())
