"""Settings are parsed strictly: a value that cannot be understood stops start-up."""

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_settings(expression="settings.MARKUP", **env):
    """Import the settings in a fresh interpreter with ``env`` and print ``expression``."""
    clean = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "HOST", "PORT", "APP_URL"}}
    clean.update(env, DJANGO_SETTINGS_MODULE="config.settings")
    code = f"import django; django.setup(); from django.conf import settings; print({expression})"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60)


def test_a_developers_env_file_is_read_by_the_server_and_never_by_the_tests():
    """scripts/run writes .env (a trial credit, say); scripts/test right after must not see it."""
    dotenv, kept = ROOT / ".env", ROOT / ".env.kept-by-test"
    if dotenv.exists():
        dotenv.rename(kept)
    try:
        dotenv.write_text("MARKUP=0.99\nPORT=7777\n")
        assert load_settings(TOKENTILL_DOTENV="on").stdout.strip() == "0.99"  # a server, or manage.py
        # HOST/PORT are the process's own (scripts/run reads them before Python starts), never .env's.
        app_url = load_settings("settings.APP_URL", TOKENTILL_DOTENV="on").stdout.strip()
        assert app_url == "http://127.0.0.1:8000"
        assert load_settings().stdout.strip() == "0.20"  # what the tests' own children inherit: off
        from django.conf import settings

        assert str(settings.MARKUP) == "0.20"  # (and this process never read one)
    finally:
        dotenv.unlink()
        if kept.exists():
            kept.rename(dotenv)


def test_defaults_start_embedded():
    result = load_settings()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0.20"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DEBUG", "maybe"),
        ("MARKUP", "lots"),
        ("MARKUP", "-0.1"),
        ("REFUSAL_MODE", "shout"),
        ("SIGNUP_RATE", "twenty"),
        ("CHECKOUT_RATE", "10/10min"),
        ("PROXY_MAX_BODY_BYTES", "big"),
        ("PAYMENTS_TEST_MODE", "perhaps"),
        ("UPSTREAM_CA_BUNDLE", "/no/such/ca.pem"),
        ("PORT", "eighty"),
        ("PORT", "70000"),
        ("EMAIL_PORT", "smtp"),
        ("EMAIL_PORT", "70000"),
        ("EMAIL_USE_TLS", "maybe"),
        ("EMAIL_USE_SSL", "sometimes"),
        ("EMAIL_TIMEOUT", "0"),
        ("LOW_BALANCE_THRESHOLD", "low"),
        ("UPSTREAM_BREAKER_FAILURES", "many"),
        ("UPSTREAM_KEY_ENCRYPTION_KEY", "not-a-fernet-key"),
    ],
)
def test_it_refuses_values_it_cannot_understand(name, value):
    result = load_settings(**{name: value})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert name in result.stderr


def test_email_goes_to_the_console_by_default_and_over_smtp_once_a_host_is_set():
    assert load_settings("settings.EMAIL_BACKEND").stdout.strip() == "django.core.mail.backends.console.EmailBackend"
    smtp = load_settings(
        "settings.EMAIL_BACKEND, settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_USE_TLS",
        EMAIL_HOST="smtp.example.com",
    )
    assert smtp.stdout.split() == ["django.core.mail.backends.smtp.EmailBackend", "smtp.example.com", "587", "True"]
    ssl = load_settings(
        "settings.EMAIL_USE_TLS, settings.EMAIL_USE_SSL", EMAIL_HOST="smtp.example.com", EMAIL_USE_SSL="true"
    )
    assert ssl.stdout.split() == ["False", "True"]


def test_email_tls_and_ssl_together_are_refused():
    result = load_settings(EMAIL_HOST="smtp.example.com", EMAIL_USE_TLS="true", EMAIL_USE_SSL="true")
    assert result.returncode != 0 and "EMAIL_USE_TLS and EMAIL_USE_SSL are exclusive" in result.stderr


def test_upstream_key_encryption_keys_are_a_list_and_a_bad_one_is_named_not_echoed():
    from cryptography.fernet import Fernet

    new, old = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    result = load_settings("len(settings.UPSTREAM_KEY_ENCRYPTION_KEYS)", UPSTREAM_KEY_ENCRYPTION_KEY=f"{new}, {old}")
    assert result.stdout.strip() == "2", result.stderr

    result = load_settings(UPSTREAM_KEY_ENCRYPTION_KEY=f"{new},{old[:-4]}oops")
    assert "key #2 is not a Fernet key" in result.stderr
    assert old[:-4] not in result.stderr and new not in result.stderr


def test_database_and_redis_urls_switch_backends():
    from django.conf import settings

    # The suite itself runs once per backend; whichever this is, the layers follow REDIS_URL.
    if os.environ.get("REDIS_URL"):
        assert settings.CHANNEL_LAYERS["default"]["BACKEND"].startswith("channels_redis")
    else:
        assert settings.CHANNEL_LAYERS["default"]["BACKEND"] == "channels.layers.InMemoryChannelLayer"


def test_a_transaction_pooler_turns_off_everything_that_outlives_a_transaction():
    db = "settings.DATABASES['default']"
    expression = f"{db}['DISABLE_SERVER_SIDE_CURSORS'], {db}['OPTIONS']['prepare_threshold'], settings.PROXY_DB_PREPARE"
    url = "postgres://u@127.0.0.1:6432/tokentill"
    pooled = load_settings(expression, DATABASE_URL=url, DATABASE_POOLER="transaction")
    assert pooled.stdout.split() == ["True", "None", "False"], pooled.stderr
    # PgBouncer >= 1.21 (max_prepared_statements) keeps the proxy's prepared statements correct.
    prepared = load_settings(
        "settings.PROXY_DB_PREPARE", DATABASE_URL=url, DATABASE_POOLER="transaction", PROXY_DB_PREPARE="true"
    )
    assert prepared.stdout.strip() == "True", prepared.stderr
    assert load_settings("settings.PROXY_DB_PREPARE", DATABASE_URL=url).stdout.strip() == "True"
    assert "needs a PostgreSQL DATABASE_URL" in load_settings(DATABASE_POOLER="transaction").stderr
    assert "not one of" in load_settings(DATABASE_URL=url, DATABASE_POOLER="session-ish").stderr


def test_sqlite_runs_with_wal_and_immediate_transactions():
    options = "settings.DATABASES['default']['OPTIONS']"
    result = load_settings(f"{options}['transaction_mode'], 'WAL' in {options}['init_command']")
    assert result.stdout.split() == ["IMMEDIATE", "True"], result.stderr


# --- APP_URL follows where the server listens (issue 11, item 18) --------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"HOST": "0.0.0.0", "PORT": "9123"}, "http://127.0.0.1:9123"),
        ({"PORT": "9123", "APP_URL": "https://credits.example.com/"}, "https://credits.example.com"),
    ],
)
def test_an_unset_app_url_follows_host_and_port(env, expected):
    result = load_settings("settings.APP_URL", **env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("127.0.0.1", 8000, "http://127.0.0.1:8000"),
        ("", 9000, "http://127.0.0.1:9000"),
        ("::", 9000, "http://127.0.0.1:9000"),
        ("::1", 8000, "http://[::1]:8000"),
        ("Tokentill.local", 8080, "http://tokentill.local:8080"),
    ],
)
def test_the_default_app_url_is_where_a_browser_here_reaches_the_server(host, port, expected):
    from config.listen import listen_url

    assert listen_url(host, port) == expected


def start_asgi(**env) -> subprocess.CompletedProcess:
    """Import the ASGI application as a server process does, in a fresh interpreter."""
    clean = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "HOST", "PORT", "APP_URL"}}
    clean.update(env, DJANGO_SETTINGS_MODULE="config.settings")
    code = "import config.asgi"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60)


def test_the_server_warns_once_at_start_up_when_app_url_names_another_port():
    result = start_asgi(PORT="9123", APP_URL="http://127.0.0.1:8000")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "APP_URL" in line]
    assert len(warnings) == 1
    assert "WARNING" in warnings[0] and "port 8000" in warnings[0] and "127.0.0.1:9123" in warnings[0]


def test_the_server_is_quiet_when_app_url_follows_the_port():
    result = start_asgi(PORT="9123")  # the other quiet cases: test_app_url_mismatch_names_this_machine_only
    assert result.returncode == 0, result.stderr
    assert "APP_URL" not in result.stderr


@pytest.mark.parametrize(
    ("app_url", "host", "port", "problem"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1", 8000, None),
        ("http://localhost:8000/", "0.0.0.0", 8000, None),
        ("http://[::1]:8000", "::1", 8000, None),
        ("https://credits.example.com", "127.0.0.1", 8000, None),
        ("http://10.0.0.5:9000", "0.0.0.0", 9000, None),  # another machine's name: not ours to judge
        ("http://127.0.0.1:8000", "127.0.0.1", 9123, "points at port 8000"),
        ("http://localhost", "127.0.0.1", 8000, "points at port 80"),
        ("https://tokentill.local", "tokentill.local", 8000, "points at port 443"),
        ("http://127.0.0.1:8000", "192.168.1.5", 8000, "loopback"),
        ("http://[not a url", "127.0.0.1", 8000, "is not a URL"),
    ],
)
def test_app_url_mismatch_names_this_machine_only(app_url, host, port, problem):
    from config.listen import app_url_mismatch

    found = app_url_mismatch(app_url, host, port)
    assert (found is None) if problem is None else (problem in found)


@pytest.mark.django_db(transaction=True)
def test_a_live_server_started_with_a_port_links_to_that_port(bob):
    from django.conf import settings

    from accounts.services import api_key_create
    from tests.live import live_server

    key = api_key_create(user=bob, name="tools")[1]
    with live_server(SECRET_KEY=settings.SECRET_KEY, LOG_LEVEL="WARNING") as url:
        response = httpx.post(
            f"{url}/v1/user/charge",
            json={"amount": "1.00", "description": "web search"},
            headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "app-url-1"},
            timeout=10,
        )
        port = url.rsplit(":", 1)[1]
        log = (ROOT / "var" / f"server-{port}.log").read_text()

    assert response.status_code == 402
    assert response.json()["topup_url"] == f"{url}/topup"  # not :8000 — PORT decided it
    assert "APP_URL" not in log
