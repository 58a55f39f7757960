"""Tokentill settings: everything comes from the environment through one ``environ.Env()``.

Parsing is strict: a value that cannot be understood (``DEBUG=maybe``, ``MARKUP=lots``, an unknown
``REFUSAL_MODE``) raises ``ImproperlyConfigured`` at start-up instead of silently meaning something
else. Every integration stays off until its key is set. With no environment at all the server runs
embedded: SQLite (WAL, IMMEDIATE transactions), in-memory channel layer, local-memory cache, and the
built-in demo model instead of an upstream.
"""

import os
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from config.listen import listen_url

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
# Where the server listens: the process environment only, never .env — scripts/run hands HOST and
# PORT to uvicorn from its own environment, so a PORT in .env would move APP_URL but not the server.
# Read before .env is loaded (read_env writes into os.environ).
_LISTEN_HOST, _LISTEN_PORT = os.environ.get("HOST", ""), os.environ.get("PORT", "")
# A developer's .env is for the server they run (scripts/run writes one, with a trial credit that
# changes every new balance). The test suite and the overhead benchmark run on the environment
# they set up, so they never read it: pytest by being the process (it loads these settings before
# any conftest could say so), the servers and scripts they start by TOKENTILL_DOTENV=off.
if os.environ.get("TOKENTILL_DOTENV", "on") != "off" and "pytest" not in sys.modules:
    environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_bool(name: str, default: bool) -> bool:
    """django-environ maps any unknown string to False; we refuse it instead."""
    raw = env.str(name, default=str(default)).strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use true/false)")


def env_decimal(name: str, default: str) -> Decimal:
    raw = env.str(name, default=default).strip()
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a decimal number") from None
    if not value.is_finite() or value < 0:
        raise ImproperlyConfigured(f"{name}={raw!r} must be a finite, non-negative number")
    return value


def env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = env.str(name, default=str(default)).strip()
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name}={raw!r} must be at least {minimum}")
    return value


def env_seconds(name: str, default: str) -> float:
    """A duration in seconds. A float on purpose: it is handed to clocks and sockets, never money."""
    return float(env_decimal(name, default))


def env_choice(name: str, default: str, choices: set[str]) -> str:
    raw = env.str(name, default=default).strip()
    if raw not in choices:
        raise ImproperlyConfigured(f"{name}={raw!r} is not one of {sorted(choices)}")
    return raw


def env_rate(name: str, default: str) -> str:
    raw = env.str(name, default=default).strip()
    count, _, period = raw.partition("/")
    if not count.isdigit() or period not in {"s", "sec", "m", "min", "h", "hour", "d", "day"}:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a rate like 20/h")
    return raw


DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG and env_bool("REQUIRE_SECRET_KEY", False):
        raise ImproperlyConfigured("SECRET_KEY is required")
    # Embedded default only; scripts/run writes a random one into .env on first start.
    SECRET_KEY = "tokentill-insecure-development-key-change-me"
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files for /api/docs/, served as our static files
    "ninja",  # so /v1/docs renders Ninja's bundled Swagger UI (its static files) instead of a CDN's
    "csp",
    "channels",
    "accounts",
    "orgs",
    "wallet",
    "notify",
    "proxy",
    "payments",
    "backoffice",
]

MIDDLEWARE = [
    "infra.middleware.RequestIdMiddleware",
    "infra.middleware.V1MethodNotAllowedMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "infra.context_processors.site",
                "orgweb.context_processors.switcher",
                "csp.context_processors.nonce",
            ],
        },
    },
]

# --- Database --------------------------------------------------------------------------------
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE takes the write lock at BEGIN, so two writers never deadlock upgrading read
    # locks; WAL lets readers run beside the single writer; the timeout queues writers instead
    # of failing them with "database is locked".
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # Tests use a file (not :memory:) so live servers in other threads or processes share it;
    # one per test process so parallel runs never collide.
    DATABASES["default"]["TEST"] = {
        "NAME": env.str("SQLITE_TEST_NAME", default=str(BASE_DIR / "var" / f"test-{os.getpid()}.sqlite3"))
    }
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"].setdefault("CONN_MAX_AGE", env_int("CONN_MAX_AGE", 0))
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# What sits between the processes and PostgreSQL (README, Deploying at scale): "none" (a direct
# connection, or a pooler in session mode) or "transaction" (PgBouncer's pool_mode = transaction,
# where consecutive transactions of one client connection may run on different server
# connections). Under "transaction" nothing may outlive a transaction on the server: Django's
# server-side cursors (.iterator() declares a cursor, the next fetch may find another backend)
# are turned off, Django's statements are never prepared, and the proxy's async connections
# prepare theirs only when PROXY_DB_PREPARE says so (PgBouncer >= 1.21 with max_prepared_statements).
DATABASE_POOLER = env_choice("DATABASE_POOLER", "none", {"none", "transaction"})
if DATABASE_POOLER == "transaction":
    if DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        raise ImproperlyConfigured("DATABASE_POOLER=transaction needs a PostgreSQL DATABASE_URL")
    _pg_options = DATABASES["default"].setdefault("OPTIONS", {})
    if _pg_options.get("assume_role"):
        # SET ROLE is session state: a pooled server connection would keep it for other clients.
        raise ImproperlyConfigured("DATABASE_POOLER=transaction cannot keep a session role (assume_role)")
    DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"] = True
    _pg_options["prepare_threshold"] = None  # Django's default today; pinned so it cannot change under us
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Channel layer and cache -----------------------------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # socket_timeout above channels_redis' 5 s blocking receive (BZPOPMIN): redis-py's
            # default is those same 5 s, so an idle receive timed out reading just as Redis
            # answered it (bench/many_sockets.py saw one every 5-10 s), delaying events by the
            # retry and, before accounts.fanout, dropping the socket.
            "CONFIG": {
                "hosts": [{"address": REDIS_URL, "socket_timeout": 10}],
                "prefix": env.str("REDIS_PREFIX", default="tokentill"),
            },
        }
    }
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": env.str("REDIS_PREFIX", default="tokentill"),
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

AUTH_USER_MODEL = "accounts.User"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "portal:login"
LOGIN_REDIRECT_URL = "portal:home"
LOGOUT_REDIRECT_URL = "portal:login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True

SECURE_CONTENT_TYPE_NOSNIFF = True
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"

# --- Product ---------------------------------------------------------------------------------
LISTEN_HOST = _LISTEN_HOST.strip() or "127.0.0.1"
try:
    LISTEN_PORT = int(_LISTEN_PORT.strip() or "8000")
except ValueError:
    raise ImproperlyConfigured(f"PORT={_LISTEN_PORT!r} is not a port number") from None
if not 0 < LISTEN_PORT < 65536:
    raise ImproperlyConfigured(f"PORT={_LISTEN_PORT!r} is not a port number (1-65535)")
# Unset, APP_URL follows HOST/PORT, so `PORT=9000 scripts/run` links to port 9000; behind a proxy
# set it to the public URL. config.asgi warns at start-up when it names this machine but another port.
APP_URL = env.str("APP_URL", default=listen_url(LISTEN_HOST, LISTEN_PORT)).rstrip("/")
APP_TITLE = env.str("APP_TITLE", default="Tokentill")

# --- HTTPS and browser security (README, Security) -------------------------------------------
# Served over HTTPS (APP_URL says so), browsers are told to keep to it (HSTS, a year) and to send
# the session and CSRF cookies over HTTPS only. Each is overridable. Django's SecurityMiddleware
# sends HSTS only on requests that arrived over HTTPS: behind a proxy that terminates TLS, uvicorn
# learns that from X-Forwarded-Proto (FORWARDED_ALLOW_IPS, README Operations).
_HTTPS = APP_URL.startswith("https://")
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 365 * 24 * 3600 if _HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", _HTTPS)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", _HTTPS)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
# The Content-Security-Policy: every page's scripts, styles, images and fonts come from this
# origin (the portal, admin and both API docs ship theirs as static files), nothing may frame a
# page, and no plugin runs. It is sent over HTTP too — it needs no TLS, and the browser tests
# check the pages under it — unless CSP=off; CSP=report-only sends it as
# Content-Security-Policy-Report-Only (violations reported, nothing blocked).
CSP_MODE = env_choice("CSP", "on", {"on", "off", "report-only"})
_CSP_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],  # Swagger UI draws its icons as data: SVGs
        "font-src": ["'self'"],
        "connect-src": ["'self'"],  # fetch() and /ws/events on this origin ('self' covers ws: and wss:)
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "frame-ancestors": ["'none'"],
        # No form-action: the top-up form's answer redirects to the payment provider's checkout,
        # and browsers apply form-action to that redirect.
    }
}
CONTENT_SECURITY_POLICY = _CSP_POLICY if CSP_MODE == "on" else None
CONTENT_SECURITY_POLICY_REPORT_ONLY = _CSP_POLICY if CSP_MODE == "report-only" else None
MARKUP = env_decimal("MARKUP", "0.20")
MIN_BALANCE = env_decimal("MIN_BALANCE", "0.05")
LOW_BALANCE_THRESHOLD = env_decimal("LOW_BALANCE_THRESHOLD", "1.00")
SIGNUP_TRIAL_CREDIT = env_decimal("SIGNUP_TRIAL_CREDIT", "0")
SIGNUP_RATE = env_rate("SIGNUP_RATE", "20/h")
LOGIN_RATE = env_rate("LOGIN_RATE", "10/min")
# Checkouts a user may start (API and portal together); each is a call to the provider's API.
CHECKOUT_RATE = env_rate("CHECKOUT_RATE", "10/h")
ACCESS_TOKEN_TTL = env_int("ACCESS_TOKEN_TTL", 15 * 60, minimum=30)  # seconds
REFRESH_TOKEN_TTL = env_int("REFRESH_TOKEN_TTL", 30 * 24 * 3600, minimum=60)  # seconds
# Browser sign-in for apps (accounts/device.py) and one-time web links (accounts/weblinks.py).
DEVICE_CODE_TTL = env_int("DEVICE_CODE_TTL", 600, minimum=60)  # seconds a device/user code pair lives
# Seconds an app waits between token polls (RFC 8628's interval; slow_down adds 5 each time).
DEVICE_POLL_INTERVAL = env_int("DEVICE_POLL_INTERVAL", 5, minimum=1)
WEB_LINK_TTL = env_int("WEB_LINK_TTL", 120, minimum=10)  # seconds a one-time web link lives
DEVICE_CODE_RATE = env_rate("DEVICE_CODE_RATE", "30/h")  # new device codes per client address
DEVICE_POLL_RATE = env_rate("DEVICE_POLL_RATE", "60/min")  # token polls per client address
DEVICE_USER_CODE_RATE = env_rate("DEVICE_USER_CODE_RATE", "10/h")  # wrong user codes per user, per address

UPSTREAM_BASE_URL = env.str("UPSTREAM_BASE_URL", default="https://openrouter.ai/api/v1").rstrip("/")
UPSTREAM_API_KEY = env.str("UPSTREAM_API_KEY", default="")
# "openrouter" reports usage.cost; "openai" (vLLM, Ollama, llama.cpp, OpenAI) is priced from the
# price table. Default follows the URL so pointing UPSTREAM_BASE_URL at vLLM just works.
UPSTREAM_KIND = env_choice(
    "UPSTREAM_KIND",
    "openrouter" if "openrouter.ai" in UPSTREAM_BASE_URL else "openai",
    {"openrouter", "openai", "anthropic"},
)
# How /v1/responses reaches the upstream: "native" forwards it to the upstream's own /responses
# (OpenRouter's, or an OpenAI-compatible server that has one), "translate" turns it into a chat
# completion, which every OpenAI-compatible server speaks (docs/api.md).
UPSTREAM_RESPONSES = env_choice(
    "UPSTREAM_RESPONSES", "native" if UPSTREAM_KIND == "openrouter" else "translate", {"native", "translate"}
)
UPSTREAM_CONNECT_TIMEOUT = env_seconds("UPSTREAM_CONNECT_TIMEOUT", "10")
UPSTREAM_READ_TIMEOUT = env_seconds("UPSTREAM_READ_TIMEOUT", "300")
UPSTREAM_MAX_CONNECTIONS = env_int("UPSTREAM_MAX_CONNECTIONS", 200, minimum=1)
# PEM certificates trusted for the upstream besides the public ones (a vLLM or Ollama server
# behind a private CA, or its self-signed certificate).
UPSTREAM_CA_BUNDLE = env.str("UPSTREAM_CA_BUNDLE", default="")
if UPSTREAM_CA_BUNDLE and not Path(UPSTREAM_CA_BUNDLE).is_file():
    raise ImproperlyConfigured(f"UPSTREAM_CA_BUNDLE={UPSTREAM_CA_BUNDLE!r} is not a file")


def env_fernet_keys(name: str) -> list[str]:
    """Comma-separated Fernet keys, newest first: the first encrypts, every one decrypts (so a
    key can be rotated in without losing what the older one encrypted)."""
    from cryptography.fernet import Fernet

    keys = [part.strip() for part in env.str(name, default="").split(",") if part.strip()]
    for index, key in enumerate(keys, 1):
        try:
            Fernet(key)
        except ValueError:
            # Never echo the value: it is a secret, even when malformed.
            raise ImproperlyConfigured(
                f"{name}: key #{index} is not a Fernet key (32 url-safe base64-encoded bytes; generate one with "
                '`python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"`)'
            ) from None
    return keys


# Upstreams staff add in the admin keep their API keys encrypted with these (proxy/keyvault.py).
UPSTREAM_KEY_ENCRYPTION_KEYS = env_fernet_keys("UPSTREAM_KEY_ENCRYPTION_KEY")
# Circuit breaker per upstream and process: this many consecutive failures before any output open
# it for UPSTREAM_BREAKER_COOLDOWN seconds (0 = never open), then one probe request may close it.
UPSTREAM_BREAKER_FAILURES = env_int("UPSTREAM_BREAKER_FAILURES", 5)
UPSTREAM_BREAKER_COOLDOWN = env_seconds("UPSTREAM_BREAKER_COOLDOWN", "30")
PROXY_MAX_BODY_BYTES = env_int("PROXY_MAX_BODY_BYTES", 1024 * 1024, minimum=1024)
PROXY_MIN_OUTPUT_TOKENS = env_int("PROXY_MIN_OUTPUT_TOKENS", 256, minimum=1)
PROXY_DEFAULT_MAX_OUTPUT = env_int("PROXY_DEFAULT_MAX_OUTPUT", 4096, minimum=1)
# Seconds each process keeps a model's price before reading the table again (0 = every request).
PROXY_PRICE_CACHE_SECONDS = env_int("PROXY_PRICE_CACHE_SECONDS", 10)
# On PostgreSQL the proxy's hot path runs its few statements on async connections from the event
# loop (infra/adb.py); there is no ORM fallback to choose: one implementation per database.
if env.str("PROXY_ASYNC_DB", default="true").strip().lower() not in {"1", "true", "yes", "on"}:
    raise ImproperlyConfigured("PROXY_ASYNC_DB=false is no longer supported: remove it (see the README)")
PROXY_DB_POOL_SIZE = env_int("PROXY_DB_POOL_SIZE", 20, minimum=1)  # async connections per process
PROXY_DB_POOL_TIMEOUT = env_seconds("PROXY_DB_POOL_TIMEOUT", "10")  # wait for a free one, then fail
# A settlement (closing a request's hold) waits this long for one instead: giving up leaves a
# finished request unbilled until reconcile_holds (HOLD_TTL), where a refused admission is a 503.
PROXY_DB_SETTLE_TIMEOUT = env_seconds("PROXY_DB_SETTLE_TIMEOUT", "60")
# Prepared statements on those connections. Off by default behind a transaction pooler (PgBouncer
# < 1.21 hands a prepared statement's name to whichever server connection runs the next
# transaction, which has never heard of it); PgBouncer >= 1.21 with max_prepared_statements > 0
# tracks them per server connection, so PROXY_DB_PREPARE=true is correct there.
PROXY_DB_PREPARE = env_bool("PROXY_DB_PREPARE", DATABASE_POOLER != "transaction")
# Group commit (infra/adb.py, the README's "Group commit"): hold and settlement statements that
# wait at the same time share one transaction; this many such flights at once per process, 0 = off.
PROXY_DB_BATCH_FLIGHTS = env_int("PROXY_DB_BATCH_FLIGHTS", 1)
# Token counts (POST /v1/messages/count_tokens) one user may ask for per minute: they are free.
COUNT_TOKENS_RPM = env_int("COUNT_TOKENS_RPM", 60, minimum=1)
REFUSAL_MODE = env_choice("REFUSAL_MODE", "error", {"error", "assistant_message"})
HOLD_TTL = env_int("HOLD_TTL", 15 * 60, minimum=30)  # seconds before reconcile_holds may act
RUN_MAX_STEPS = env_int("RUN_MAX_STEPS", 0)  # 0 = unlimited steps per X-Tokentill-Run
RUN_MAX_SPEND = env_decimal("RUN_MAX_SPEND", "0")  # 0 = unlimited spend per run
# Honest holds (a price row's own fields override each): prompt tokens the hold assumes per
# non-text part — an image by its declared detail, an audio part, a file or document part — and
# USD a request may settle above its hold before the rest is the operator's loss.
HOLD_IMAGE_TOKENS = env_int("HOLD_IMAGE_TOKENS", 2000)
HOLD_IMAGE_LOW_TOKENS = env_int("HOLD_IMAGE_LOW_TOKENS", 200)
HOLD_AUDIO_TOKENS = env_int("HOLD_AUDIO_TOKENS", 4000)
HOLD_FILE_TOKENS = env_int("HOLD_FILE_TOKENS", 20000)
HOLD_OVERRUN_CAP = env_decimal("HOLD_OVERRUN_CAP", "0.05")

LEMONSQUEEZY_API_KEY = env.str("LEMONSQUEEZY_API_KEY", default="")
LEMONSQUEEZY_STORE_ID = env.str("LEMONSQUEEZY_STORE_ID", default="")
LEMONSQUEEZY_WEBHOOK_SECRET = env.str("LEMONSQUEEZY_WEBHOOK_SECRET", default="")
LEMONSQUEEZY_API_URL = env.str("LEMONSQUEEZY_API_URL", default="https://api.lemonsqueezy.com")
STRIPE_API_KEY = env.str("STRIPE_API_KEY", default="")
STRIPE_WEBHOOK_SECRET = env.str("STRIPE_WEBHOOK_SECRET", default="")
STRIPE_API_BASE = env.str("STRIPE_API_BASE", default="")  # tests point this at a loopback fake
# Pack → provider product ids, applied at seed time to packs whose id is still empty (never over
# ids staff typed into the admin).
LEMONSQUEEZY_VARIANT_STARTER = env.str("LEMONSQUEEZY_VARIANT_STARTER", default="")
LEMONSQUEEZY_VARIANT_PRO = env.str("LEMONSQUEEZY_VARIANT_PRO", default="")
STRIPE_PRICE_STARTER = env.str("STRIPE_PRICE_STARTER", default="")
STRIPE_PRICE_PRO = env.str("STRIPE_PRICE_PRO", default="")
PAYMENTS_TEST_MODE = env_bool("PAYMENTS_TEST_MODE", False)
LEMONSQUEEZY_FEE_PERCENT = env_decimal("LEMONSQUEEZY_FEE_PERCENT", "5")
LEMONSQUEEZY_FEE_FIXED = env_decimal("LEMONSQUEEZY_FEE_FIXED", "0.50")
STRIPE_FEE_PERCENT = env_decimal("STRIPE_FEE_PERCENT", "2.9")
STRIPE_FEE_FIXED = env_decimal("STRIPE_FEE_FIXED", "0.30")
STAFF_ALERT_EMAILS = env.list("STAFF_ALERT_EMAILS", default=[])

# --- Email (users' notifications, staff alerts) ------------------------------------------------
# Sent by the delivery worker (manage.py deliver_webhooks), never from a request: a mail outage
# delays an email, it never fails a payment. With EMAIL_HOST set mail goes out over SMTP;
# without it, to the console (the worker's output).
EMAIL_HOST = env.str("EMAIL_HOST", default="").strip()
EMAIL_PORT = env_int("EMAIL_PORT", 587, minimum=1)
if EMAIL_PORT > 65535:
    raise ImproperlyConfigured(f"EMAIL_PORT={EMAIL_PORT} is not a port number (1-65535)")
EMAIL_HOST_USER = env.str("EMAIL_HOST_USER", default="")
EMAIL_HOST_PASSWORD = env.str("EMAIL_HOST_PASSWORD", default="")
EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL", False)  # implicit TLS (port 465)
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", bool(EMAIL_HOST) and not EMAIL_USE_SSL)  # STARTTLS (587)
if EMAIL_USE_TLS and EMAIL_USE_SSL:
    raise ImproperlyConfigured("EMAIL_USE_TLS and EMAIL_USE_SSL are exclusive: STARTTLS (587) or implicit TLS (465)")
EMAIL_TIMEOUT = env_int("EMAIL_TIMEOUT", 20, minimum=1)  # seconds, per SMTP operation
EMAIL_BACKEND = env.str(
    "EMAIL_BACKEND",
    default="django.core.mail.backends.smtp.EmailBackend"
    if EMAIL_HOST
    else "django.core.mail.backends.console.EmailBackend",
)
EMAIL_HOST = EMAIL_HOST or "localhost"  # Django's own default, for an SMTP backend chosen by name
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="tokentill@localhost")

# --- DRF / schema ----------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.BearerAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_THROTTLE_RATES": {
        "signup": SIGNUP_RATE,
        "login": LOGIN_RATE,
        "checkout": CHECKOUT_RATE,
        "device_code": DEVICE_CODE_RATE,
        "device_poll": DEVICE_POLL_RATE,
        "device_user_code": DEVICE_USER_CODE_RATE,
    },
    # Throttles key on REMOTE_ADDR only. Left unset, DRF would key on the raw X-Forwarded-For,
    # which any client can forge to get a fresh allowance per request; the server (uvicorn)
    # already replaces the address with the forwarded one when the peer is a trusted proxy
    # (FORWARDED_ALLOW_IPS).
    "NUM_PROXIES": 0,
    "EXCEPTION_HANDLER": "infra.drf.api_exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Tokentill account API",
    "DESCRIPTION": "Accounts, keys, wallet, usage and top-ups. The OpenAI-compatible API is at /v1.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # /api/docs/ loads Swagger UI from drf-spectacular-sidecar's files (pinned in requirements),
    # never from a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Ledger kinds and request statuses appear in several components (a user's and an
    # organization's entries and usage): one named enum each, not a name made from a hash.
    "ENUM_NAME_OVERRIDES": {
        "EntryKindEnum": "wallet.models.EntryKind",
        "UsageRecordStatusEnum": "proxy.models.UsageStatus",
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    # psycopg's pool logs every checkout at INFO: a line (and its CPU) per proxied statement.
    "loggers": {"httpx": {"level": "WARNING"}, "httpcore": {"level": "WARNING"}, "psycopg.pool": {"level": "WARNING"}},
}
