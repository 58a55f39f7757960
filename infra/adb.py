"""The proxy hot path's own async PostgreSQL connections.

Django's ORM is synchronous, so from async code every query is a trip to a worker thread and
back, plus the ORM building its SQL, plus a health-check ``SELECT 1`` each time a connection is
taken up again. For the metered proxy that was most of the CPU a request cost, and under load
the worker threads and the event loop queue for the GIL behind each other. Yet the proxy's hot
path is only a handful of fixed statements per request (authenticate, take the hold, write the
usage record, settle), so on PostgreSQL they run here, from the event loop, on psycopg's async
connections. Everything else in Tokentill — and the hot path on SQLite, where ``native()`` is
false — goes through the ORM in a worker thread (``in_thread``).

* One ``psycopg_pool.AsyncConnectionPool`` per event loop: a server process has one loop for its
  life; tests run a loop per call and close its pool with ``close()``.
* The pool connects with the parameters and type adapters Django's own backend uses
  (``get_connection_params()``), so it reaches the database the ORM reaches and values load as
  the ORM loads them (jsonb as text for ``JSONField``, timestamps in UTC).
* Connections are in autocommit: one statement is its own transaction, and each step of the hot
  path is ONE statement — writes that must commit together are parts of one ``WITH`` (the
  ``insert_statement``/``update_statement`` builders make such parts from model instances).
* Parameters are bound server-side and statements prepared on each connection's first use
  (``PROXY_DB_PREPARE``): for these short statements planning dominated both the client's and
  the server's CPU (figures: the README's Benchmarks).
* Group commit (``fetchone_batched``, for the hold path's statements): statements that wait at
  the same time share one transaction and one commit; a lone one runs exactly as ``fetchone``.
* ``observe()`` lets a caller see every statement sent (the tests pin the hot path's count, as
  ``django_assert_num_queries`` does for ORM code).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import psycopg
import psycopg._queries
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connections, models
from django.db.models import signals
from django.db.models.base import ModelState
from psycopg.types.numeric import Int8Dumper
from psycopg_pool import AsyncConnectionPool

# psycopg converts a statement's placeholders (``%(name)s`` → ``$n``) on every execute, caching
# the conversion only for texts up to 4 KB with up to 50 parameters — a guard against ORMs' endless
# one-off texts. The hot path's statements are a handful of fixed texts just over it (the hold's
# carries the usage record's 39 columns), and re-parsing them was ~6 % of a request's CPU under
# load. Django's own statements share the bounded (128 entries) cache.
psycopg._queries.MAX_CACHED_STATEMENT_LENGTH = max(psycopg._queries.MAX_CACHED_STATEMENT_LENGTH, 8192)
psycopg._queries.MAX_CACHED_STATEMENT_PARAMS = max(psycopg._queries.MAX_CACHED_STATEMENT_PARAMS, 128)

_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncConnectionPool[_Connection]] = (
    weakref.WeakKeyDictionary()
)
_observers: list[Callable[[str], None]] = []


class ConditionFailed(Exception):
    """A statement written to happen only while some rows are unchanged found them changed, and
    did nothing (see ``accounts.auth``: a principal from a recent lookup)."""


def native() -> bool:
    """Is the database PostgreSQL, where the ledger's hold operations and the bearer lookup are
    hand-written statements (run here from the event loop, or on Django's connection from sync
    code)? Otherwise (SQLite) they are the ORM, in a worker thread from async code. The one
    switch between the two implementations."""
    # (The engine from settings, not ``connections["default"].vendor``: that lookup goes through
    # a context-local and is measurable at several calls per request.)
    return settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"


def drive(coroutine):
    """Run a coroutine that never suspends to its end, from sync code, and return its result.

    For logic written once as a coroutine over an injected I/O function (``accounts.auth``'s
    bearer lookup): the event loop passes an async fetch, sync callers a fetch that completes at
    once. A coroutine that does suspend is a bug of the caller's, refused loudly.
    """
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("drive() was given a coroutine that suspends; await it on an event loop instead")


def in_thread(fn):
    """``fn`` run in a worker thread with the ORM, honouring ``CONN_MAX_AGE`` around it.

    Not thread-sensitive: each call is a self-contained unit of work, so requests need not queue
    behind one another on one database thread. Each call does its own connection housekeeping
    (``close_old_connections`` before and after, in the worker thread itself), so whichever
    thread runs the next call finds a connection that is fresh or properly closed.
    """

    def run(*args, **kwargs):
        close_old_connections()
        try:
            return fn(*args, **kwargs)
        finally:
            close_old_connections()

    return sync_to_async(run, thread_sensitive=False)


def _connection_params() -> dict[str, Any]:
    wrapper = connections["default"]
    params = wrapper.get_connection_params()
    # Django's cursor class is a sync one; ours bind server-side (psycopg's default).
    params.pop("cursor_factory", None)
    params["autocommit"] = True
    # Django leaves prepared statements off for transaction-pooling proxies (PgBouncer < 1.21);
    # the hot path's few fixed statements gain most from them, so they have their own switch.
    params["prepare_threshold"] = 0 if settings.PROXY_DB_PREPARE else None
    return params


class _Connection(psycopg.AsyncConnection):
    """A pooled connection that keeps a cursor per statement text.

    psycopg builds a cursor's parameter adapters anew whenever the cursor runs another statement
    than its last (and a new cursor always does), so one cursor per statement lets each of the hot
    path's few statements reuse its adapters (about a quarter less client CPU per statement; the
    README's Benchmarks keep the figures).
    """

    MAX_CURSORS = 64  # far more than the statements the hot path has; a bound all the same

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._statement_cursors: dict[str, list[psycopg.AsyncCursor]] = {}

    def statement_cursor(self, sql: str, nth: int = 0) -> psycopg.AsyncCursor:
        """The cursor for ``sql`` — the ``nth`` one, for a batch that runs it more than once."""
        cursors = self._statement_cursors.get(sql)
        if cursors is None:
            if len(self._statement_cursors) >= self.MAX_CURSORS:
                self._statement_cursors.clear()
            cursors = self._statement_cursors[sql] = []
        while len(cursors) <= nth:
            cursors.append(self.cursor())
        return cursors[nth]


async def _configure(conn: psycopg.AsyncConnection) -> None:
    """What Django does to each new connection: the session time zone, and the role if one is set.

    Also: every Python int is sent as int8. psycopg otherwise picks int2, int4 or int8 by value,
    and a prepared statement is keyed by its parameters' types, so each statement would be
    prepared once per mix of small and large amounts.
    """
    conn.adapters.register_dumper(int, Int8Dumper)
    _returned_at[conn] = time.monotonic()  # just connected: no need to ask it anything yet
    wrapper = connections["default"]
    if wrapper.timezone_name and conn.info.parameter_status("TimeZone") != wrapper.timezone_name:
        await conn.execute(wrapper.ops.set_time_zone_sql(), [wrapper.timezone_name])
    if role := wrapper.settings_dict["OPTIONS"].get("assume_role"):
        await conn.execute(psycopg.sql.SQL("SET ROLE {}").format(psycopg.sql.Identifier(role)))


# A connection idle this long is asked ``SELECT 1`` before it is handed out: a database restart,
# a failover or an idle cut by a load balancer leaves every pooled connection dead, and the next
# request — possibly a settlement — must not be the one to find out. Busy connections skip it.
CHECK_IDLE_AFTER = 2.0  # seconds
_returned_at: weakref.WeakKeyDictionary[psycopg.AsyncConnection, float] = weakref.WeakKeyDictionary()


async def _check(conn: psycopg.AsyncConnection) -> None:
    if time.monotonic() - _returned_at.get(conn, 0.0) > CHECK_IDLE_AFTER:
        await AsyncConnectionPool.check_connection(conn)  # raises when dead: the pool takes another


async def _pool() -> AsyncConnectionPool[_Connection]:
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is None:
        pool = AsyncConnectionPool(
            kwargs=_connection_params(),
            connection_class=_Connection,
            min_size=0,
            max_size=settings.PROXY_DB_POOL_SIZE,
            timeout=settings.PROXY_DB_POOL_TIMEOUT,
            configure=_configure,
            check=_check,
            # Idle connections are closed after a minute, before most load balancers cut them.
            max_idle=60.0,
            # psycopg_pool retries a failed connect with a doubling pause for this long; kept
            # short, the pool starts over on the next request once the database is back instead
            # of sitting out the rest of its backoff.
            reconnect_timeout=2.0,
            name="tokentill-proxy",
            open=False,
        )
        await pool.open()
        _pools[loop] = pool  # only once open: a failed open must not poison this loop
    return pool


@asynccontextmanager
async def connection(wait: float | None = None) -> AsyncIterator[_Connection]:
    """A pooled connection; ``wait``: seconds to wait for a free one (``PROXY_DB_POOL_TIMEOUT`` when
    None), then ``PoolTimeout``."""
    pool = await _pool()
    conn = await pool.getconn(wait)
    try:
        yield conn
    finally:
        _returned_at[conn] = time.monotonic()
        await pool.putconn(conn)


async def close() -> None:
    """Close this event loop's pool (tests, whose loops are short-lived; process shutdown)."""
    pool = _pools.pop(asyncio.get_running_loop(), None)
    if pool is not None:
        await pool.close()


@contextmanager
def observe(callback: Callable[[str], None]):
    """Call ``callback(sql)`` for every statement sent while the block runs."""
    _observers.append(callback)
    try:
        yield
    finally:
        _observers.remove(callback)


def _sent(sql: str) -> None:
    for callback in _observers:
        callback(sql)


async def fetchone(
    sql: str, params: dict | list | None = None, *, retry: bool = False, wait: float | None = None
) -> tuple | None:
    """Run one statement that returns rows (its own transaction); its first row, or None.

    ``retry``: the statement may safely run twice (a read, or a write conditional on state the
    first run would have changed), so on a connection found dead it is sent once more on a fresh
    one. Either way a dead connection makes the pool test all its idle ones (see ``_run``).
    ``wait``: how long it may wait for a free connection (``connection``).
    """
    return await _run(sql, params, fetch=True, retry=retry, wait=wait)


async def execute(sql: str, params: dict | list | None = None, *, retry: bool = False) -> None:
    """Run one statement that returns no rows (its own transaction); ``retry`` as for ``fetchone``."""
    await _run(sql, params, fetch=False, retry=retry)


async def _run(sql: str, params, *, fetch: bool, retry: bool, wait: float | None = None):
    attempts = 2 if retry else 1
    for attempt in range(attempts):
        conn = None
        try:
            async with connection(wait) as conn:
                _sent(sql)
                cursor = conn.statement_cursor(sql)
                await cursor.execute(sql, params)
                return await cursor.fetchone() if fetch else None
        except psycopg.OperationalError:  # (PoolTimeout is one too: then there is no connection)
            if conn is None or not conn.broken:
                raise
            # A connection the server closed (a restart, a failover, a terminated backend): its
            # idle siblings are most likely dead too, so the pool tests them all now rather
            # than hand them to the next statements one failure at a time.
            await (await _pool()).check()
            if attempt == attempts - 1:
                raise


# --- group commit ------------------------------------------------------------------------------------
#
# Every billed request commits twice (the hold, the settlement), and on one process the commits —
# not the statements — were the ceiling. So the hold path's statements (``wallet.pg.arun``) go
# through a batcher: a statement that finds no flight in progress runs at once, alone, exactly as
# ``fetchone`` would (autocommit, one round trip: concurrency 1 pays nothing); statements that
# arrive while a flight is in progress wait for it, and the moment it returns they all go as the
# next flight, in ONE transaction sent in one round trip (psycopg's pipeline mode), one commit.
# No timer: a batch is what queued while the last one ran.


BATCH_MAX = 64  # statements in one transaction: bounds how long a batch holds its wallet rows


@dataclass
class BatchStats:
    """What the batcher did in this process: flights sent, statements in them, and how many
    flights took more than one statement (``batches``: ``batched`` statements)."""

    flights: int = 0
    statements: int = 0
    batches: int = 0
    batched: int = 0
    rerun: int = 0  # batches whose transaction failed and whose statements ran again one by one


stats = BatchStats()


@dataclass
class _Pending:
    sql: str
    params: dict | list | None
    retry: bool
    order: int
    future: asyncio.Future
    wait: float | None = None  # for a free connection (``connection``); None: the pool's own


class _Batcher:
    def __init__(self, limit: int) -> None:
        self.limit = limit  # flights in progress at once (``PROXY_DB_BATCH_FLIGHTS``)
        self.queue: list[_Pending] = []
        self.flights = 0
        self.tasks: set[asyncio.Task] = set()

    async def fetchone(self, sql: str, params, retry: bool, order: int, wait: float | None) -> tuple | None:
        if self.flights < self.limit and not self.queue:
            # Nothing in progress: this statement is the flight, in the caller's own task.
            self.flights += 1
            stats.flights, stats.statements = stats.flights + 1, stats.statements + 1
            try:
                return await _run(sql, params, fetch=True, retry=retry, wait=wait)
            finally:
                self.flights -= 1
                self._next()
        future = asyncio.get_running_loop().create_future()
        self.queue.append(_Pending(sql, params, retry, order, future, wait))
        return await future

    def _next(self) -> None:
        """Send what queued meanwhile as the next flight (a task of its own: no caller waits for
        another caller's flight but through its own future)."""
        # A caller cancelled while it waited takes its statement with it: it was never sent.
        self.queue = [pending for pending in self.queue if not pending.future.done()]
        if not self.queue or self.flights >= self.limit:
            return
        batch, self.queue = self.queue[:BATCH_MAX], self.queue[BATCH_MAX:]
        self.flights += 1
        task = asyncio.get_running_loop().create_task(self._flight(batch))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _flight(self, batch: list[_Pending]) -> None:
        stats.flights, stats.statements = stats.flights + 1, stats.statements + len(batch)
        try:
            if len(batch) == 1:
                await _settle_one(batch[0])
            else:
                stats.batches, stats.batched = stats.batches + 1, stats.batched + len(batch)
                await _run_batch(batch)
        except Exception as error:  # not the database's (those are each caller's): everyone's
            for pending in batch:
                _resolve(pending, error=error)
        finally:
            for pending in batch:  # (only if this task itself was cancelled: a loop shutting down)
                if not pending.future.done():
                    pending.future.cancel()
            self.flights -= 1
            self._next()


_batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Batcher] = weakref.WeakKeyDictionary()


async def fetchone_batched(
    sql: str, params: dict | list | None = None, *, retry: bool = False, order: int = 0, wait: float | None = None
) -> tuple | None:
    """``fetchone``, group-committed with whatever other such statements wait at the same time.

    Each caller gets its own statement's first row, or its own statement's error: a batch whose
    transaction fails (a statement's error, a deadlock, a serialization failure) is rolled back
    and its statements run again one by one, each in autocommit, so only the culprit fails. A
    batch whose connection dies — its commit's outcome unknown — runs again only the statements
    that may run twice (``retry``); the others fail as ``fetchone`` would have. ``order`` (the
    wallet's id) sorts a batch's statements, so two batches (two processes) lock the rows they
    share in the same order and cannot deadlock on them. ``wait``: how long the statement may wait
    for a free connection (``connection``); a batch waits as long as its most patient statement.
    """
    loop = asyncio.get_running_loop()
    batcher = _batchers.get(loop)
    if batcher is None:
        batcher = _batchers[loop] = _Batcher(settings.PROXY_DB_BATCH_FLIGHTS)
    if not batcher.limit:  # group commit off: every statement alone, as ``fetchone``
        return await _run(sql, params, fetch=True, retry=retry, wait=wait)
    return await batcher.fetchone(sql, params, retry, order, wait)


def _resolve(pending: _Pending, row: tuple | None = None, error: BaseException | None = None) -> None:
    if pending.future.done():  # its caller was cancelled meanwhile (the statement ran all the same)
        return
    if error is not None:
        pending.future.set_exception(error)
    else:
        pending.future.set_result(row)


async def _settle_one(pending: _Pending) -> None:
    """One statement on its own, in autocommit, its row or error to its caller."""
    try:
        row = await _run(pending.sql, pending.params, fetch=True, retry=pending.retry, wait=pending.wait)
    except Exception as error:
        _resolve(pending, error=error)
    else:
        _resolve(pending, row)


async def _run_batch(batch: list[_Pending]) -> None:
    batch = sorted(batch, key=lambda pending: pending.order)  # stable: arrival order within a wallet
    waits = [pending.wait for pending in batch if pending.wait is not None]
    wait = max([*waits, settings.PROXY_DB_POOL_TIMEOUT]) if waits else None  # the most patient one's
    conn = None
    try:
        async with connection(wait) as conn:
            cursors = []
            try:
                # BEGIN, the statements, COMMIT: queued in pipeline mode and sent with one Sync at
                # the pipeline's end — one round trip; the rows come back with the commit's answer.
                # (Not ``conn.transaction()``: in a pipeline its commit is a Sync of its own, and
                # the pipeline's exit another round trip.)
                async with conn.pipeline():
                    await conn.statement_cursor("BEGIN").execute("BEGIN")
                    seen: dict[str, int] = {}
                    for pending in batch:
                        _sent(pending.sql)
                        nth = seen[pending.sql] = seen.get(pending.sql, -1) + 1
                        cursor = conn.statement_cursor(pending.sql, nth)
                        await cursor.execute(pending.sql, pending.params)
                        cursors.append(cursor)
                    await conn.statement_cursor("COMMIT").execute("COMMIT")
            except psycopg.Error:
                # A statement failed: the server skipped the rest up to the Sync, COMMIT included,
                # and left the transaction open and aborted.
                if not conn.broken and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    await conn.execute("ROLLBACK")
                raise
            rows = [await cursor.fetchone() for cursor in cursors]
    except psycopg.Error as error:
        if conn is None:  # no connection to be had (PoolTimeout): nothing was sent
            for pending in batch:
                _resolve(pending, error=error)
            return
        stats.rerun += 1
        if conn.broken:  # its idle siblings are most likely dead too (see ``_run``)
            await (await _pool()).check()
        for pending in batch:
            if conn.broken and not pending.retry:
                # The connection died with the commit in flight: it may have committed. A
                # statement that must not run twice fails, as it would have run alone.
                _resolve(pending, error=error)
            else:
                # Rolled back (a statement's error, a deadlock, a serialization failure — the
                # transaction is all or nothing), or safe to repeat: each again, on its own.
                await _settle_one(pending)
        return
    for pending, row in zip(batch, rows, strict=True):
        _resolve(pending, row)


# --- rows and model instances -------------------------------------------------------------------


@lru_cache(maxsize=1)
def _preparer():
    """A wrapper of the default database that is never connected, for what converting values
    needs from one (``ops``: JSON adapters, casts). Not ``connections["default"]``: on the event
    loop that is a context-local, and each request runs in a context of its own, so the first
    lookup in every request built a whole new ``DatabaseWrapper`` — measurable on each request."""
    return connections.create_connection("default")


def columns(model, alias: str) -> str:
    """The select list for every concrete field of ``model``, as ``load`` reads it back."""
    return ", ".join(f'{alias}."{field.column}"' for field in model._meta.concrete_fields)


@lru_cache(maxsize=64)
def _loaders(model) -> tuple[list[str], list]:
    """The attribute names ``columns`` selects, and the fields whose values need converting."""
    fields = model._meta.concrete_fields
    return [field.attname for field in fields], [(i, f) for i, f in enumerate(fields) if hasattr(f, "from_db_value")]


def load(model, row: tuple, start: int = 0, *, converted: bool = False):
    """A model instance from ``row[start:]`` as selected by ``columns``, converted as the ORM does
    (``converted``: the row has been through ``convert`` already); returns ``(instance, index
    after its columns)``, or ``(None, …)`` for an outer join's NULLs."""
    names, converters = _loaders(model)
    end = start + len(names)
    values = list(row[start:end])
    if values[0] is None:  # the primary key: nothing joined
        return None, end
    if converters and not converted:
        _convert(values, converters)
    return from_db(model, names, values), end


def from_db(model, names: list[str], values: list):
    """``model.from_db("default", names, values)`` for a full row: the instance's attributes set
    from the row as ``Model.__init__``'s positional path sets them, without its per-field loop
    (the principal's key, user and wallet are loaded so on every request). The ORM's own path
    when something listens to the model's init signals."""
    if _signalled(model) or len(names) != len(model._meta.concrete_fields):
        return model.from_db("default", names, values)
    instance = model.__new__(model)
    state = instance._state = ModelState()
    state.adding, state.db = False, "default"
    instance.__dict__.update(zip(names, values, strict=True))
    return instance


def _signalled(model) -> bool:
    return signals.pre_init.has_listeners(model) or signals.post_init.has_listeners(model)


def convert(row: tuple, models: tuple) -> tuple:
    """``row`` — the ``columns`` of each of ``models`` one after another, then anything else —
    with every value converted as ``load`` converts it, for a caller that keeps a row and loads
    instances from it many times (``load(…, converted=True)``): the conversion (JSON parsed, the
    connection looked up) is then paid once per row, not once per instance. The instances loaded
    from one converted row share its converted values (a JSON field's dict): treat them as read-only."""
    values, start = list(row), 0
    for model in models:
        names, converters = _loaders(model)
        if values[start] is not None and converters:
            part = values[start : start + len(names)]
            _convert(part, converters)
            values[start : start + len(names)] = part
        start += len(names)
    return tuple(values)


def _convert(values: list, converters: list) -> None:
    wrapper = _preparer()
    for index, field in converters:
        if values[index] is not None:
            values[index] = field.from_db_value(values[index], None, wrapper)


# Field types whose attribute value psycopg already adapts exactly as the ORM's preparation would
# leave it (PostgreSQL backend, USE_TZ; aware datetimes, as ``timezone.now()`` makes): for them
# the ORM's per-field ``get_db_prep_save`` round is skipped — on a 30-column usage record it was
# most of the cost of writing one. Everything else (JSON, auto_now dates, anything unknown) still
# goes through the ORM's preparation.
_AS_IS = (
    models.CharField,
    models.TextField,
    models.IntegerField,
    models.BooleanField,
    models.DecimalField,
    models.DateTimeField,
    models.UUIDField,
    models.ForeignKey,
)


@lru_cache(maxsize=64)
def _plan(model, names: tuple[str, ...] | None) -> tuple[list, list]:
    """The fields (all but the primary key, or ``names``), and whether each needs the ORM's
    preparation."""
    meta = model._meta
    if names is None:
        fields = [field for field in meta.concrete_fields if not field.primary_key]
    else:
        fields = [meta.get_field(name) for name in names]
    slow = [
        not isinstance(field, _AS_IS) or getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False)
        for field in fields
    ]
    return fields, slow


def _marks(fields, prefix: str) -> list[str]:
    """Each field's placeholder, cast to its column type — a parameter in an ``INSERT … SELECT``
    list has no column to take its type from."""
    wrapper = connections["default"]
    return [f"%({prefix}{i})s::{_cast(field, wrapper)}" for i, field in enumerate(fields)]


def _cast(field, wrapper) -> str:
    # A cast to varchar(n) would silently cut an over-long value where the ORM's INSERT refuses
    # it: cast character columns to plain varchar and let the column's own length check apply.
    if isinstance(field, models.CharField):
        return wrapper.ops.cast_char_field_without_max_length
    return field.cast_db_type(wrapper)


@lru_cache(maxsize=64)
def _names(prefix: str, count: int) -> tuple[str, ...]:
    """The parameters' names, ``<prefix><n>`` (as ``_marks`` writes them)."""
    return tuple(f"{prefix}{i}" for i in range(count))


def _params(instance, fields, slow, prefix: str, add: bool) -> dict:
    wrapper = _preparer()
    values = [
        field.get_db_prep_save(field.pre_save(instance, add), wrapper) if needs else getattr(instance, field.attname)
        for field, needs in zip(fields, slow, strict=True)
    ]
    return dict(zip(_names(prefix, len(fields)), values, strict=True))


# The SQL text depends only on the model, the fields and the names chosen, so it is built once
# (and psycopg prepares it once per connection); each call only prepares the values.
# (S608 below: identifiers come from model metadata; every value is a bound parameter.)


@lru_cache(maxsize=64)
def _insert_sql(model, prefix: str, source: str | None) -> str:
    meta = model._meta
    fields, _ = _plan(model, None)
    marks = ", ".join(_marks(fields, prefix))
    names = ", ".join(f'"{field.column}"' for field in fields)
    rows = f"SELECT {marks} FROM {source}" if source else f"VALUES ({marks})"  # noqa: S608
    return f'INSERT INTO "{meta.db_table}" ({names}) {rows} RETURNING "{meta.pk.column}"'


@lru_cache(maxsize=64)
def _update_sql(
    model, names: tuple[str, ...], prefix: str, condition: str | None, expressions: tuple[tuple[str, str], ...] = ()
) -> str:
    meta = model._meta
    fields, _ = _plan(model, names)
    marks = _marks(fields, prefix)
    pairs = [(field.column, mark) for field, mark in zip(fields, marks, strict=True)]
    pairs += [(meta.get_field(name).column, sql) for name, sql in expressions]
    assignments = ", ".join(f'"{column}" = {value}' for column, value in pairs)
    where = f'"{meta.pk.column}" = %({prefix}pk)s' + (f" AND {condition}" if condition else "")
    return f'UPDATE "{meta.db_table}" SET {assignments} WHERE {where} RETURNING "{meta.pk.column}"'  # noqa: S608


def insert_statement(instance: models.Model, *, prefix: str = "v", source: str | None = None) -> tuple[str, dict]:
    """``INSERT … RETURNING pk`` for an unsaved instance, every column prepared as the ORM would.

    With ``source`` (a CTE name) the row is inserted once per row of ``source`` — used inside a
    ``WITH`` to insert only if an earlier part of the statement succeeded. Parameters are named
    ``<prefix><n>`` so the statement can join others in one ``WITH``.
    """
    model = type(instance)
    fields, slow = _plan(model, None)
    return _insert_sql(model, prefix, source), _params(instance, fields, slow, prefix, add=True)


def update_statement(
    instance: models.Model,
    field_names: list[str],
    *,
    prefix: str = "v",
    condition: str | None = None,
    expressions: tuple[tuple[str, str], ...] = (),
) -> tuple[str, dict]:
    """``UPDATE … SET <fields> WHERE pk [AND condition] RETURNING pk`` for a saved instance,
    values prepared as the ORM would; parameters named as for ``insert_statement``.
    ``expressions`` — ``(field name, SQL)`` pairs — set more fields to values the surrounding
    statement computes."""
    model, names = type(instance), tuple(field_names)
    fields, slow = _plan(model, names)
    params = {**_params(instance, fields, slow, prefix, add=False), f"{prefix}pk": instance.pk}
    return _update_sql(model, names, prefix, condition, expressions), params


@lru_cache(maxsize=64)
def _blank(model) -> tuple[dict, tuple[tuple[str, Callable], ...], dict[str, tuple[str, str]], frozenset[str]]:
    """What ``new`` starts an instance of ``model`` from: every concrete field's constant default
    (by attribute name), the fields whose default is a callable (called per instance, as the ORM
    does), each foreign key's attribute name and its target's (the column it copies from the
    related instance: its primary key unless ``to_field`` says otherwise) by field name, and every
    attribute name."""
    fixed: dict[str, Any] = {}
    computed = []
    for field in model._meta.concrete_fields:
        if field.has_default() and callable(field.default):
            computed.append((field.attname, field.default))
        else:
            fixed[field.attname] = field.get_default()
    relations = {
        field.name: (field.attname, field.target_field.attname)
        for field in model._meta.concrete_fields
        if field.is_relation
    }
    return fixed, tuple(computed), relations, frozenset(field.attname for field in model._meta.concrete_fields)


def new(model, /, **values):
    """An unsaved instance, as ``model(**values)`` builds it — every field its value or its
    default, a related instance given by field name cached as the ORM caches it — without
    ``Model.__init__``'s walk over every field and keyword (the proxy builds a usage record and a
    hold on every request: ~5 % of a request's CPU went to it). Names are field names or
    attribute names (``user`` or ``user_id``); anything else is a ``TypeError``. A model whose
    ``pre_init``/``post_init`` signals have listeners is built by ``Model.__init__`` after all."""
    if _signalled(model):
        return model(**values)
    fixed, computed, relations, attnames = _blank(model)
    instance = model.__new__(model)
    state = instance._state = ModelState()
    data = instance.__dict__
    data.update(fixed)
    for attname, default in computed:
        if attname not in values:
            data[attname] = default()
    for name, value in values.items():
        related = relations.get(name)
        if related is not None:
            attname, target = related
            data[attname] = None if value is None else getattr(value, target)
            state.fields_cache[name] = value
        elif name in attnames:
            data[name] = value
        else:
            raise TypeError(f"{model.__name__} has no field named {name!r}")
    return instance


def saved(instance, pk) -> None:
    """Mark an instance written by raw SQL as the ORM marks one it saved."""
    instance.pk = pk
    instance._state.adding, instance._state.db = False, "default"
