"""The one bearer check shared by DRF, Ninja, the proxy consumer and the WebSocket.

``authenticate_bearer(token) -> Principal`` or ``AuthFailed(reason, kind)``. An API key (``tt_…``) is
found by its prefix and compared by hash in constant time; anything else is read as a signed
access token naming a token family, which must not be revoked. One query either way (the user and
their wallet joined in), plus a throttled ``last_used_at`` write for keys.

One implementation per database: on PostgreSQL the lookup is one hand-written statement (the
key or token family, its user and their wallet, with the rows' versions), run on the hot path's
async connections from the event loop (``aauthenticate_bearer``) or on Django's connection from
sync code (``authenticate_bearer``) — the same coroutine either way; on SQLite it is the ORM
(in a worker thread from async code). The rules themselves are written once, below.

On PostgreSQL the proxy may also take a principal from ``aauthenticate_bearer(token,
cached=True)``: the rows of a recent lookup, kept in this process, so that a proxied request
makes no authentication statement of its own. Such a principal is not trusted on its word: its
``unchanged`` condition (the key's or token family's row, and the user's, are still the row
versions — PostgreSQL's ``xmin`` — that were read) goes into the request's first write, the hold
or the refusal's record, and when it is false nothing is written and the caller authenticates
afresh (``adb.ConditionFailed``). So revoking a key, disabling a user or changing a key's limits
takes effect on the very next request, exactly as without the cache.
"""

from __future__ import annotations

import hmac
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.core import signing
from django.db import connection
from django.utils import timezone

from infra import adb
from wallet.models import Wallet

from .models import ApiKey, Scope, TokenFamily, User
from .services import ACCESS_SALT, API_KEY_PREFIX, sha256_hex

LAST_USED_RESOLUTION = timedelta(minutes=1)  # don't write a row on every single request
# The wallet rides along in the same query (a join on a unique key): nearly every bearer request
# — above all each proxied one — needs it next, and a second query would cost a round trip.
_WITH_USER = ("user", "user__wallet")


# Why a credential was refused (``AuthFailed.kind``). EXPIRED and REVOKED name a credential
# that was good once: its owner only needs to sign in again, which a client may tell them in
# words (the proxy's assistant-message mode). The others are a client's mistake or a stranger's.
MISSING = "missing"  # no bearer token at all
INVALID = "invalid"  # not one of ours: unknown key, bad signature, malformed
EXPIRED = "expired"  # an access token or API key past its lifetime
REVOKED = "revoked"  # a revoked API key, a signed-out (or reused-refresh) session
DISABLED = "disabled"  # the account is disabled


class AuthFailed(Exception):
    def __init__(self, reason: str, kind: str = INVALID):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind

    @property
    def signed_out(self) -> bool:
        """The credential expired or was revoked: signing in again would cure it."""
        return self.kind in (EXPIRED, REVOKED)


@dataclass
class Principal:
    user: User
    api_key: ApiKey | None = None
    # The login an access token belongs to (None for an API key): what revoking it names.
    token_family_id: uuid.UUID | None = None
    # On the event loop's path: a SQL condition (text, parameters), true while the rows this
    # principal was read from are unchanged — see the module docstring. None on the ORM path.
    unchanged: tuple[str, dict] | None = None

    @property
    def is_operator_key(self) -> bool:
        """An operator API key (``admin`` scope): valid on ``/api/admin/`` only."""
        return self.api_key is not None and self.api_key.has_scope(Scope.ADMIN)

    def has_scope(self, scope: str) -> bool:
        # Desktop tokens act as the user themselves: proxy use only, never billing others.
        if self.api_key is None:
            return scope == Scope.PROXY
        return self.api_key.has_scope(scope)


def bearer_from_header(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate_bearer(token: str | None) -> Principal:
    """The bearer check for sync callers (DRF, Ninja, the WebSocket): the same lookup as the event
    loop's on PostgreSQL, run on Django's connection; the ORM on SQLite."""
    if adb.native():
        return adb.drive(_apg_principal(token, fetch=_fetch_here, on_loop=False))
    if not token:
        raise AuthFailed("missing bearer token", MISSING)
    if token.startswith(API_KEY_PREFIX):
        return _orm_key_principal(token)
    return _orm_family_principal(token)


def _checked_key(key: ApiKey | None, token_hash: str, now: datetime) -> ApiKey:
    """The key, unless it is missing, does not match, is revoked or expired, or its user is
    disabled: then AuthFailed."""
    if key is None or not hmac.compare_digest(key.key_hash, token_hash):
        raise AuthFailed("invalid API key")
    if key.revoked_at is not None:
        raise AuthFailed("this API key has been revoked", REVOKED)
    if key.expires_at is not None and key.expires_at <= now:
        raise AuthFailed("this API key has expired", EXPIRED)
    if not key.user.is_active:
        raise AuthFailed("this account is disabled", DISABLED)
    return key


def _touch_due(key: ApiKey, now: datetime) -> bool:
    """Is the key's ``last_used_at`` stale enough to be written?"""
    return key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION


def _access_token_family(token: str) -> uuid.UUID:
    """The token family id a valid access token names."""
    try:
        payload = signing.loads(token, salt=ACCESS_SALT, max_age=settings.ACCESS_TOKEN_TTL)
    except signing.SignatureExpired:
        raise AuthFailed("access token expired", EXPIRED) from None
    except signing.BadSignature:
        raise AuthFailed("invalid access token") from None
    try:
        return uuid.UUID(str(payload.get("f")))
    except ValueError:  # a signed token naming no valid family id: cannot happen unless our key leaked
        raise AuthFailed("invalid access token") from None


# --- SQLite: the ORM ----------------------------------------------------------------------------


def _one(queryset):
    """The row a lookup by a unique key found, or None."""
    return next(iter(queryset.order_by()[:1]), None)


def _orm_key_principal(token: str) -> Principal:
    # The prefix is unique: no ORDER BY (``first()`` would sort by the model's ordering).
    found = _one(ApiKey.objects.select_related(*_WITH_USER).filter(prefix=token[: ApiKey.PREFIX_LENGTH]))
    now = timezone.now()
    key = _checked_key(found, sha256_hex(token), now)
    if _touch_due(key, now):
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return Principal(user=key.user, api_key=key)


def _orm_family_principal(token: str) -> Principal:
    family = _one(
        TokenFamily.objects.select_related(*_WITH_USER).filter(
            pk=_access_token_family(token), revoked_at__isnull=True, user__is_active=True
        )
    )
    if family is None:
        raise AuthFailed("this session has been revoked", REVOKED)
    return Principal(user=family.user, token_family_id=family.pk)


# --- PostgreSQL: one statement ------------------------------------------------------------------
#
# The lookup is written once, as a coroutine over a ``fetch(sql, params)``: on the event loop it
# fetches on the hot path's async connections, and sync callers drive the very same coroutine
# with a fetch on Django's connection that never suspends (``adb.drive``).

# The ORM's select_related(*_WITH_USER) above, as one statement, with the versions of the rows
# the principal depends on last. (S608: the identifiers come from model
# metadata; every value is a bound parameter.)
_KEY_SQL = (
    f"SELECT {adb.columns(ApiKey, 'k')}, {adb.columns(User, 'u')}, {adb.columns(Wallet, 'w')}, "  # noqa: S608
    "k.xmin::text, u.xmin::text "
    f'FROM "{ApiKey._meta.db_table}" k JOIN "{User._meta.db_table}" u ON u.id = k.user_id '
    f'LEFT JOIN "{Wallet._meta.db_table}" w ON w.user_id = u.id WHERE k.prefix = %s LIMIT 1'
)
_FAMILY_SQL = (
    f"SELECT {adb.columns(TokenFamily, 'f')}, {adb.columns(User, 'u')}, {adb.columns(Wallet, 'w')}, "  # noqa: S608
    "f.xmin::text, u.xmin::text "
    f'FROM "{TokenFamily._meta.db_table}" f JOIN "{User._meta.db_table}" u ON u.id = f.user_id '
    f'LEFT JOIN "{Wallet._meta.db_table}" w ON w.user_id = u.id '
    "WHERE f.id = %s AND f.revoked_at IS NULL AND u.is_active LIMIT 1"
)
# A row is converted once when fetched (``adb.convert``: JSON parsed), so loading the principal
# from a recent lookup costs no conversion; its instances share the row's converted values.
_KEY_MODELS = (ApiKey, User, Wallet)
_FAMILY_MODELS = (TokenFamily, User, Wallet)
# Only the version that was read is touched: a key changed since (say, revoked) is read again.
_TOUCH_SQL = (
    f'UPDATE "{ApiKey._meta.db_table}" SET last_used_at = %s WHERE id = %s AND xmin::text = %s '  # noqa: S608
    "RETURNING xmin::text"
)


# The ``unchanged`` conditions: the row of the key (or token family) and of its user, as read.
def _unchanged_sql(model) -> str:
    return (
        f'EXISTS (SELECT FROM "{model._meta.db_table}" p JOIN "{User._meta.db_table}" u ON u.id = p.user_id '
        "WHERE p.id = %(auth_id)s AND p.xmin::text = %(auth_row)s AND u.xmin::text = %(auth_user_row)s)"
    )


_KEY_UNCHANGED = _unchanged_sql(ApiKey)
_FAMILY_UNCHANGED = _unchanged_sql(TokenFamily)

# Recent lookups' rows, by the key's hash or the token family's id (most recent last). Each entry
# is one key or signed-in session; a key's entry is replaced when its last_used_at is written.
_recent: OrderedDict[str, tuple] = OrderedDict()
RECENT_MAX = 10_000
_ATTEMPTS = 3  # reads of a key that keeps changing under its last_used_at write, before giving up


def _remember(ident: str, row: tuple, user: User) -> None:
    if not User.wallet.is_cached(user):  # no wallet yet: the proxy creates one, so look it up again
        return
    _recent[ident] = row
    _recent.move_to_end(ident)
    if len(_recent) > RECENT_MAX:
        _recent.popitem(last=False)


def _recalled(ident: str) -> tuple | None:
    row = _recent.get(ident)
    if row is not None:
        _recent.move_to_end(ident)
    return row


def _forget(ident: str) -> None:
    _recent.pop(ident, None)


def _user_with_wallet(row: tuple, start: int) -> User:
    user, end = adb.load(User, row, start, converted=True)
    wallet, _ = adb.load(Wallet, row, end, converted=True)
    if wallet is not None:
        user.wallet = wallet  # as select_related("user__wallet") caches it
    return user


def _unchanged(condition: str, ident, row_version: str, user_version: str) -> tuple[str, dict]:
    return condition, {"auth_id": ident, "auth_row": row_version, "auth_user_row": user_version}


async def _fetch_on_loop(sql: str, params: list) -> tuple | None:
    return await adb.fetchone(sql, params, retry=True)  # reads, and a write conditional on what it read


async def _fetch_here(sql: str, params: list) -> tuple | None:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


async def aauthenticate_bearer(token: str | None, *, cached: bool = False) -> Principal:
    """``authenticate_bearer`` on the event loop. ``cached``: the proxy's path, which may answer
    from a recent lookup because it checks the principal's ``unchanged`` condition when it writes
    (see the module docstring); nobody else may pass it."""
    if not adb.native():
        return await adb.in_thread(authenticate_bearer)(token)
    return await _apg_principal(token, fetch=_fetch_on_loop, on_loop=True, cached=cached)


async def _apg_principal(token: str | None, *, fetch, on_loop: bool, cached: bool = False) -> Principal:
    """The PostgreSQL lookup. ``on_loop``: running on the event loop, which alone keeps the
    recent lookups (a plain dict, never touched from worker threads)."""
    if not token:
        raise AuthFailed("missing bearer token", MISSING)
    if token.startswith(API_KEY_PREFIX):
        return await _apg_key(token, fetch, on_loop, cached)
    family_id = _access_token_family(token)
    ident = f"family:{family_id}"
    row = _recalled(ident) if cached else None
    if row is None:
        row = await fetch(_FAMILY_SQL, [family_id])
        if row is None:
            if on_loop:
                _forget(ident)
            raise AuthFailed("this session has been revoked", REVOKED)
        row = adb.convert(row, _FAMILY_MODELS)
    _, end = adb.load(TokenFamily, row, converted=True)
    user = _user_with_wallet(row, end)
    if on_loop:
        _remember(ident, row, user)
    return Principal(
        user=user, token_family_id=family_id, unchanged=_unchanged(_FAMILY_UNCHANGED, family_id, *row[-2:])
    )


async def _apg_key(token: str, fetch, on_loop: bool, cached: bool) -> Principal:
    token_hash = sha256_hex(token)
    ident = f"key:{token_hash}"
    for _ in range(_ATTEMPTS):
        row = _recalled(ident) if cached else None
        if row is None:
            row = await fetch(_KEY_SQL, [token[: ApiKey.PREFIX_LENGTH]])
            if row is not None:
                row = adb.convert(row, _KEY_MODELS)
        found: ApiKey | None = None
        if row is not None:
            found, end = adb.load(ApiKey, row, converted=True)
            found.user = _user_with_wallet(row, end)
        key_version, user_version = row[-2:] if row is not None else (None, None)
        now = timezone.now()
        try:
            key = _checked_key(found, token_hash, now)
        except AuthFailed:
            if on_loop:
                _forget(ident)
            raise
        if _touch_due(key, now):
            if on_loop:
                _forget(ident)  # its last_used_at is about to change: read it again next time
            touched = await fetch(_TOUCH_SQL, [now, key.pk, key_version])
            if touched is None:  # the key changed since it was read: read it again
                cached = False
                continue
            key.last_used_at, key_version = now, touched[0]
        elif on_loop and row is not None:  # (a key was found: it is the row's)
            _remember(ident, row, key.user)
        return Principal(
            user=key.user, api_key=key, unchanged=_unchanged(_KEY_UNCHANGED, key.pk, key_version, user_version)
        )
    raise adb.ConditionFailed("the API key kept changing while it was read")
