"""Settings are parsed strictly: a value that cannot be understood stops start-up."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_settings(expression="settings.MARKUP", **env):
    """Import the settings in a fresh interpreter with ``env`` and print ``expression``."""
    clean = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    clean.update(env, DJANGO_SETTINGS_MODULE="config.settings")
    code = f"import django; django.setup(); from django.conf import settings; print({expression})"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60)


def test_a_developers_env_file_is_read_by_the_server_and_never_by_the_tests():
    """scripts/run writes .env (a trial credit, say); scripts/test right after must not see it."""
    dotenv, kept = ROOT / ".env", ROOT / ".env.kept-by-test"
    if dotenv.exists():
        dotenv.rename(kept)
    try:
        dotenv.write_text("MARKUP=0.99\n")
        assert load_settings(TOKENTILL_DOTENV="on").stdout.strip() == "0.99"  # a server, or manage.py
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
        ("UPSTREAM_BREAKER_FAILURES", "many"),
        ("UPSTREAM_KEY_ENCRYPTION_KEY", "not-a-fernet-key"),
    ],
)
def test_it_refuses_values_it_cannot_understand(name, value):
    result = load_settings(**{name: value})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert name in result.stderr


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


def test_sqlite_runs_with_wal_and_immediate_transactions():
    options = "settings.DATABASES['default']['OPTIONS']"
    result = load_settings(f"{options}['transaction_mode'], 'WAL' in {options}['init_command']")
    assert result.stdout.split() == ["IMMEDIATE", "True"], result.stderr
