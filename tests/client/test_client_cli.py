"""The ``tokentill`` command: each subcommand's output and exit code against a live server."""

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
