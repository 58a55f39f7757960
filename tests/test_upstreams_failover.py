"""Several upstreams: per-model routing, failover before any output, circuit breakers and
concurrency limits — through the live ASGI app, against two fake upstreams on loopback (and a
dead port, and a server that hangs up on every connection).

The upstreams are staff-added rows (``alpha``, ``beta``) of the OpenAI-compatible kind, so a
charge is the price table's (each upstream has its own price for the same model) and shows
which upstream's price was used; the default upstream (the settings one) is the first fake.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from decimal import Decimal

import pytest
from cryptography.fernet import Fernet
from django.db import connection

from accounts.services import api_key_create
from core.pricing import charge_nanos, cost_usd, hold_nanos
from core.usage import Usage, estimate_tokens
from infra import adb
from proxy import routing, upstream
from proxy.models import CostSource, ModelPrice, Upstream, UsageRecord, UsageStatus
from proxy.selectors import rates_for
from proxy.upstreams import upstream_save
from tests.fake_upstream import (  # noqa: F401  (fixtures)
    DONE,
    Reply,
    StreamReply,
    _proxy_call,
    call,
    chunk,
    close_loop_resources,
    completion,
    fake_upstream,
    fake_upstream_server,
    second_upstream_server,
    sse,
    stream_of,
    usage,
)
from wallet.models import Entry, EntryKind, Hold, HoldStatus, Wallet

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"
MODEL = "acme/sonnet"
START = 10_000_000_000  # alice's opening balance, nanodollars
ALPHA_KEY = "sk-alpha-0123456789abcdefWXYZ"
BETA_KEY = "sk-beta-0123456789abcdefQRST"


def ask(model: str = MODEL, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Say pong"}], "max_tokens": 100, **extra}


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def vault(settings):
    settings.UPSTREAM_KEY_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]


@pytest.fixture
def fakes(fake_upstream, second_upstream_server, vault):
    """(first, second): the first is also the default upstream, as an OpenRouter one."""
    second_upstream_server.reset()
    return fake_upstream, second_upstream_server


@pytest.fixture
def token(alice):
    return api_key_create(user=alice, name="agent")[1]


def add_upstream(name: str, url: str, *, key: str, kind: str = "openai", **fields) -> Upstream:
    return upstream_save(row=Upstream(name=name, kind=kind, base_url=url, **fields), api_key=key)


def serve(model: str, at: Upstream | None, *, priority: int, prompt: str, completion: str) -> ModelPrice:
    return ModelPrice.objects.create(
        model=model,
        upstream=at,
        priority=priority,
        prompt=Decimal(prompt),
        completion=Decimal(completion),
        default_max_output=1000,
    )


def refused_url() -> str:
    """A port nothing listens on: every connection is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


class HangsUp:
    """An upstream that is down: it accepts every connection and closes it at once, counting
    them — so a test can see that nobody even tried while a breaker was open."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.accepted = 0
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/v1"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self):
        self.server.close()


@pytest.fixture
def hangs_up():
    door = HangsUp()
    yield door
    door.close()


@dataclass
class Pair:
    first: object  # the fake behind alpha (and the default upstream)
    second: object  # the fake behind beta
    alpha: Upstream
    beta: Upstream
    cheap: ModelPrice  # MODEL at alpha, tried first
    dear: ModelPrice  # MODEL at beta, three times the price


@pytest.fixture
def pair(fakes):
    first, second = fakes
    alpha = add_upstream("alpha", first.url, key=ALPHA_KEY)
    beta = add_upstream("beta", second.url, key=BETA_KEY)
    cheap = serve(MODEL, alpha, priority=0, prompt="1.00", completion="2.00")
    dear = serve(MODEL, beta, priority=1, prompt="3.00", completion="6.00")
    return Pair(first, second, alpha, beta, cheap, dear)


def move(row: Upstream, url: str, **fields) -> None:
    """Staff edit an upstream (its key kept)."""
    row.base_url = url
    for name, value in fields.items():
        setattr(row, name, value)
    upstream_save(row=row)


def charged_at(price: ModelPrice, prompt: int = 100, completion: int = 20) -> int:
    rates = rates_for(price)
    return charge_nanos(cost_usd(rates, Usage(prompt, completion)), markup=rates.markup, min_charge=rates.min_charge)


def held_at(price: ModelPrice, body: dict | None = None) -> int:
    """The hold for ``body`` at ``price``: the prompt estimated from the body's size (as sent)."""
    prompt_tokens = estimate_tokens(len(json.dumps(body or ask()).encode()))
    return hold_nanos(rates_for(price), prompt_tokens=prompt_tokens, max_output=100)


def usd(nanos: int) -> str:
    return f"{Decimal(nanos).scaleb(-9):.9f}"


def assert_charged_once(user, record: UsageRecord, amount: int) -> None:
    """One hold, settled once, one ledger entry of ``amount`` — never a second charge."""
    assert record.charge == amount
    (hold,) = Hold.objects.filter(request_id=record.request_id)
    assert hold.status == HoldStatus.SETTLED
    (entry,) = Entry.objects.filter(wallet__user=user, kind=EntryKind.USAGE)
    assert entry.amount == -amount
    assert Wallet.objects.get(user=user).balance == START - amount
    assert amount <= record.hold_amount  # the failover never settled above its hold


def nothing_charged(user, record: UsageRecord) -> None:
    assert record.charge == 0
    assert Hold.objects.get(request_id=record.request_id).status == HoldStatus.RELEASED
    assert not Entry.objects.filter(wallet__user=user, kind=EntryKind.USAGE).exists()
    assert Wallet.objects.get(user=user).balance == START


def latest() -> UsageRecord:
    return UsageRecord.objects.order_by("-created_at", "-id").first()


# --- routing -----------------------------------------------------------------------------------


def test_each_model_goes_to_its_own_upstream_with_that_upstreams_key(fakes, token):
    first, second = fakes
    alpha = add_upstream("alpha", first.url, key=ALPHA_KEY)
    beta = add_upstream("beta", second.url, key=BETA_KEY, kind="anthropic")
    serve("acme/a", alpha, priority=0, prompt="1", completion="2")
    serve("acme/b", beta, priority=0, prompt="3", completion="6")
    first.script("chat", Reply(body=completion(u=usage(100, 20))))
    second.script("chat", Reply(body=completion(u=usage(100, 20))))

    assert call(CHAT, ask("acme/a"), token=token).status == 200
    assert call(CHAT, ask("acme/b"), token=token).status == 200

    (to_alpha,) = first.calls("chat")
    (to_beta,) = second.calls("chat")
    assert (to_alpha.json["model"], to_alpha.headers["authorization"]) == ("acme/a", f"Bearer {ALPHA_KEY}")
    assert "x-api-key" not in to_alpha.headers
    assert "usage" not in to_alpha.json  # OpenAI-compatible: not OpenRouter's usage switch
    # An Anthropic upstream: its key also where Anthropic's own API reads it, with the API version.
    assert to_beta.json["model"] == "acme/b"
    assert (to_beta.headers["x-api-key"], to_beta.headers["anthropic-version"]) == (BETA_KEY, "2023-06-01")
    assert dict(UsageRecord.objects.values_list("model", "upstream")) == {"acme/a": "alpha", "acme/b": "beta"}


def test_the_first_choice_serves_while_it_is_healthy_and_is_billed_at_its_own_price(pair, token, alice):
    pair.first.script("chat", Reply(body=completion(u=usage(100, 20))))

    response = call(CHAT, ask(), token=token)

    assert response.status == 200 and not pair.second.requests
    record = UsageRecord.objects.get()
    assert (record.upstream, record.error, record.price_id) == ("alpha", "", pair.cheap.pk)
    # Held for the dearest candidate (beta), settled at the one that served (alpha).
    assert record.hold_amount == held_at(pair.dear) > held_at(pair.cheap)
    assert_charged_once(alice, record, charged_at(pair.cheap))
    assert response.headers["x-tokentill-charge"] == usd(charged_at(pair.cheap))


def test_a_model_whose_upstreams_are_all_disabled_is_not_served(pair, token):
    Upstream.objects.filter(pk__in=[pair.alpha.pk, pair.beta.pk]).update(enabled=False)

    response = call(CHAT, ask(), token=token)

    assert response.status == 400 and response.error["code"] == "model_not_found"
    assert not pair.first.requests and not pair.second.requests


def test_the_usage_api_names_the_upstream_that_served(pair, token, alice_client):
    pair.first.script("chat", Reply(body=completion(u=usage(100, 20))))
    call(CHAT, ask(), token=token)

    (row,) = alice_client.get("/api/usage").json()["results"]
    assert row["upstream"] == "alpha"


# --- failover before any output ------------------------------------------------------------------


def answer(stream: bool):
    return StreamReply(stream_of("Po", "ng", u=usage(100, 20))) if stream else Reply(body=completion(u=usage(100, 20)))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_dead_first_upstream_is_failed_over_and_charged_once_at_the_seconds_price(pair, token, alice, stream):
    move(pair.alpha, refused_url())
    pair.second.script("chat", answer(stream))

    response = call(CHAT, ask(stream=stream), token=token)

    assert response.status == 200
    text = response.body.decode() if stream else response.json()["choices"][0]["message"]["content"]
    assert "Po" in text
    record = UsageRecord.objects.get()
    assert (record.upstream, record.status, record.price_id) == ("beta", UsageStatus.OK, pair.dear.pk)
    assert record.error.startswith("failed over from alpha: The upstream model is unreachable (ConnectError)")
    assert record.hold_amount == held_at(pair.dear, ask(stream=stream))
    assert_charged_once(alice, record, charged_at(pair.dear))
    if stream:
        assert response.tokentill()["charge"] == usd(charged_at(pair.dear))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_first_upstream_that_times_out_before_any_output_is_failed_over(pair, token, alice, stream):
    move(pair.alpha, pair.first.url, read_timeout=0.3)
    # Whole: no status line in time. Stream: the status line at once, then not a byte in time.
    pair.first.script("chat", StreamReply([1.0, *stream_of("late")]) if stream else Reply(body=completion(), delay=1.0))
    pair.second.script("chat", answer(stream))

    response = call(CHAT, ask(stream=stream), token=token)

    assert response.status == 200
    assert len(pair.first.calls("chat")) == 1 and len(pair.second.calls("chat")) == 1
    record = UsageRecord.objects.get()
    assert record.upstream == "beta"
    assert record.error.startswith("failed over from alpha: The upstream model timed out.")
    assert_charged_once(alice, record, charged_at(pair.dear))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_5xx_before_any_output_is_failed_over(pair, token, alice, stream):
    pair.first.script("chat", Reply(503, {"error": {"message": "overloaded", "code": 503}}))
    pair.second.script("chat", answer(stream))

    response = call(CHAT, ask(stream=stream), token=token)

    assert response.status == 200
    record = UsageRecord.objects.get()
    assert (record.upstream, record.error) == ("beta", "failed over from alpha: upstream HTTP 503: overloaded")
    assert_charged_once(alice, record, charged_at(pair.dear))


def test_the_default_upstream_is_a_candidate_like_any_other(fakes, token, alice):
    first, _ = fakes
    alpha = add_upstream("alpha", refused_url(), key=ALPHA_KEY)
    serve(MODEL, alpha, priority=0, prompt="1", completion="2")
    serve(MODEL, None, priority=1, prompt="3", completion="6")  # the settings upstream, second
    first.script("chat", Reply(body=completion(u=usage(100, 20, cost="0.0005"))))

    response = call(CHAT, ask(), token=token)

    assert response.status == 200
    (sent,) = first.calls("chat")
    assert sent.headers["authorization"] == "Bearer sk-or-v1-server-secret"  # the settings key
    assert sent.json["usage"] == {"include": True}  # the default is OpenRouter here: its usage switch
    record = UsageRecord.objects.get()
    assert (record.upstream, record.cost_source) == ("default", CostSource.UPSTREAM)
    assert record.error.startswith("failed over from alpha: ")
    assert_charged_once(alice, record, 600_000)  # OpenRouter's reported cost × 1.2


def test_when_every_candidate_fails_the_last_failure_is_answered_and_nothing_is_charged(pair, token, alice):
    pair.first.script("chat", Reply(500, {"error": {"message": "alpha broke"}}))
    pair.second.script("chat", Reply(502, {"error": {"message": "beta broke"}}))

    response = call(CHAT, ask(), token=token)

    assert response.status == 502 and response.error["code"] == "upstream_error"
    record = UsageRecord.objects.get()
    assert record.status == UsageStatus.UPSTREAM_ERROR and record.upstream == "beta"
    assert record.error == "failed over from alpha: upstream HTTP 500: alpha broke; then upstream HTTP 502: beta broke"
    nothing_charged(alice, record)


def test_a_4xx_is_the_clients_answer_and_is_not_failed_over(pair, token, alice):
    pair.first.script("chat", Reply(400, {"error": {"message": "max_tokens is too large"}}))

    response = call(CHAT, ask(), token=token)

    assert response.status == 400 and response.error["code"] == "upstream_invalid_request"
    assert "max_tokens is too large" in response.error["message"]
    assert not pair.second.requests
    record = UsageRecord.objects.get()
    assert record.upstream == "alpha" and "failed over" not in record.error
    nothing_charged(alice, record)
    assert routing.breaker("alpha").snapshot().failures == 0  # it answered: alive


def test_a_5xx_after_the_stream_started_is_not_retried_and_is_billed_as_before(pair, token, alice):
    broken = {
        **chunk(""),
        "error": {"code": 502, "message": "Upstream connection dropped"},
        "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
    }
    pair.first.script("chat", StreamReply([sse(chunk("", role="assistant")), sse(chunk("Hello there")), sse(broken)]))

    response = call(CHAT, ask(stream=True), token=token)

    assert response.status == 200 and "Hello there" in response.body.decode()
    assert not pair.second.requests  # output had reached the client: no second attempt
    record = UsageRecord.objects.get()
    assert (record.upstream, record.status) == ("alpha", UsageStatus.UPSTREAM_ERROR)
    assert "failed over" not in record.error
    # As any cut stream is billed: what was relayed, at alpha's price (an estimate: no usage came).
    assert record.cost_source == CostSource.ESTIMATE and record.price_id == pair.cheap.pk
    assert record.charge > 0
    assert_charged_once(alice, record, record.charge)


# --- circuit breaker ---------------------------------------------------------------------------


def wait_for(state: str, name: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while routing.breaker(name).snapshot().state != state:
        assert time.monotonic() < deadline, f"{name}'s breaker never became {state}"
        time.sleep(0.02)


def test_the_breaker_opens_skips_the_dead_upstream_then_lets_one_probe_close_it(pair, token, settings, hangs_up):
    # The cool-down is read from the settings on every look (proxy.routing.breaker): a long one
    # while the open breaker is checked, none when the test wants the probe — no race with the
    # clock on a loaded machine.
    settings.UPSTREAM_BREAKER_FAILURES, settings.UPSTREAM_BREAKER_COOLDOWN = 2, 60
    move(pair.alpha, hangs_up.url)
    pair.second.script("chat", *[answer(False) for _ in range(5)])

    for _ in range(2):  # two failures in a row, each failed over to beta
        assert call(CHAT, ask(), token=token).status == 200
    assert hangs_up.accepted == 2
    assert routing.breaker("alpha").snapshot().state == "open"

    assert call(CHAT, ask(), token=token).status == 200  # alpha skipped: not even a connection
    assert hangs_up.accepted == 2
    assert (latest().upstream, latest().error) == ("beta", "")  # nothing failed: alpha was not tried

    settings.UPSTREAM_BREAKER_COOLDOWN = 0
    wait_for("half_open", "alpha")  # the cool-down is over: the next request is the probe
    assert call(CHAT, ask(), token=token).status == 200  # the probe fails, over to beta again
    assert hangs_up.accepted == 3
    settings.UPSTREAM_BREAKER_COOLDOWN = 60
    assert routing.breaker("alpha").snapshot().state == "open"

    move(pair.alpha, pair.first.url)  # alpha is back
    pair.first.script("chat", answer(False), answer(False))
    settings.UPSTREAM_BREAKER_COOLDOWN = 0
    wait_for("half_open", "alpha")
    assert call(CHAT, ask(), token=token).status == 200  # the probe succeeds …
    assert routing.breaker("alpha").snapshot().state == "closed"
    assert call(CHAT, ask(), token=token).status == 200  # … and alpha serves again
    assert len(pair.first.calls("chat")) == 2
    assert list(UsageRecord.objects.order_by("-created_at", "-id").values_list("upstream", flat=True)[:2]) == [
        "alpha",
        "alpha",
    ]


def test_an_open_breaker_on_the_only_candidate_fails_fast_with_503(fakes, token, alice, settings, hangs_up):
    settings.UPSTREAM_BREAKER_FAILURES, settings.UPSTREAM_BREAKER_COOLDOWN = 1, 30
    alpha = add_upstream("alpha", hangs_up.url, key=ALPHA_KEY)
    serve(MODEL, alpha, priority=0, prompt="1", completion="2")
    assert call(CHAT, ask(), token=token).status == 502  # the failure that opens it
    assert hangs_up.accepted == 1

    response = call(CHAT, ask(), token=token)

    assert response.status == 503 and response.error["code"] == "upstream_unavailable"
    assert 1 <= int(response.headers["retry-after"]) <= 30
    assert hangs_up.accepted == 1  # failed fast: no connection attempted
    record = latest()
    assert (record.status, record.http_status, record.upstream) == (UsageStatus.UPSTREAM_ERROR, 503, "")
    assert "circuit open (alpha)" in record.error
    assert Hold.objects.get(request_id=record.request_id).status == HoldStatus.RELEASED
    assert Wallet.objects.get(user=alice).balance == START


def test_readyz_and_the_dashboard_show_each_upstreams_breaker(pair, token, settings, hangs_up, client, staff):
    settings.UPSTREAM_BREAKER_FAILURES, settings.UPSTREAM_BREAKER_COOLDOWN = 1, 60
    move(pair.alpha, hangs_up.url)
    pair.second.script("chat", answer(False))
    assert call(CHAT, ask(), token=token).status == 200

    ready = client.get("/readyz")
    assert ready.status_code == 200  # a dead upstream is not this process's fault
    upstreams = ready.json()["upstreams"]
    assert upstreams["alpha"]["breaker"] == "open" and upstreams["alpha"]["failures"] == 1
    assert 0 < upstreams["alpha"]["retry_in"] <= 60
    assert upstreams["beta"]["breaker"] == "closed" and upstreams["default"]["breaker"] == "closed"
    assert ready.json()["checks"]["upstream"] == "ok"

    client.force_login(staff)
    html = client.get("/admin/").content.decode()
    breaker_cell = html.split('data-breaker="alpha">')[1].split("</td>")[0]
    assert "open" in breaker_cell and "probe in" in breaker_cell
    assert "closed" in html.split('data-breaker="beta">')[1].split("</td>")[0]
    assert "Circuit breaker not closed for alpha" in html


# --- concurrency limit -------------------------------------------------------------------------


def _while_one_is_streaming(first_body: dict, second_body: dict, token: str, fake):
    """Start a slow stream, wait until the upstream has it, then send another request; both
    through the ASGI app on one event loop (one process's limits)."""
    from asgiref.sync import async_to_sync

    from config.asgi import application

    def send(body):
        raw = json.dumps(body).encode()
        return _proxy_call(application, CHAT, raw, [raw], token, None, None, 10, "POST")

    async def run():
        try:
            slow = asyncio.ensure_future(send(first_body))
            deadline = time.monotonic() + 10
            while not fake.calls("chat"):
                assert time.monotonic() < deadline, "the slow stream never reached the upstream"
                await asyncio.sleep(0.01)
            second = await send(second_body)
            return await slow, second
        finally:
            await close_loop_resources()

    return async_to_sync(run)()


SLOW = [*stream_of("slow")[:2], 0.5, *stream_of("ly", u=usage(100, 20))[1:]]


def test_an_upstream_at_its_concurrency_limit_passes_the_request_to_the_next(pair, token):
    move(pair.alpha, pair.first.url, max_concurrency=1)
    pair.first.script("chat", StreamReply(SLOW))
    pair.second.script("chat", answer(False))

    slow, second = _while_one_is_streaming(ask(stream=True), ask(), token, pair.first)

    assert (slow.status, second.status) == (200, 200)
    assert len(pair.first.calls("chat")) == 1 and len(pair.second.calls("chat")) == 1
    served = {record.upstream: record for record in UsageRecord.objects.all()}
    assert set(served) == {"alpha", "beta"}
    assert served["beta"].error.startswith("failed over from alpha: upstream alpha has 1 requests in flight")
    assert routing.breaker("alpha").snapshot().failures == 0  # busy is not broken
    assert routing.limiter("alpha").in_flight == 0  # every place given back


def test_with_no_other_candidate_a_busy_upstream_is_a_503_upstream_busy(fakes, token, alice):
    first, _ = fakes
    alpha = add_upstream("alpha", first.url, key=ALPHA_KEY, max_concurrency=1)
    serve(MODEL, alpha, priority=0, prompt="1", completion="2")
    first.script("chat", StreamReply(SLOW))

    slow, second = _while_one_is_streaming(ask(stream=True), ask(), token, first)

    assert slow.status == 200
    assert second.status == 503 and second.json()["error"]["code"] == "upstream_busy"
    assert second.headers["retry-after"] == "1"
    assert len(first.calls("chat")) == 1
    busy = UsageRecord.objects.get(http_status=503)
    nothing_charged_for = Hold.objects.get(request_id=busy.request_id)
    assert (busy.charge, nothing_charged_for.status) == (0, HoldStatus.RELEASED)


# --- secrets ---------------------------------------------------------------------------------------


def test_the_upstream_key_is_never_stored_shown_logged_or_returned_in_clear(pair, token, client, staff, caplog):
    caplog.set_level(logging.DEBUG)
    move(pair.alpha, refused_url())  # a failover, so errors are logged and written down too
    pair.second.script("chat", answer(False))

    response = call(CHAT, ask(), token=token)

    with connection.cursor() as cursor:
        cursor.execute("SELECT name, api_key_encrypted FROM proxy_upstream ORDER BY name")
        stored = dict(cursor.fetchall())
    assert set(stored) == {"alpha", "beta"}
    assert ALPHA_KEY not in stored["alpha"] and BETA_KEY not in stored["beta"]
    assert stored["alpha"].startswith("gAAAA")  # a Fernet token
    client.force_login(staff)
    pages = [
        client.get("/admin/proxy/upstream/").content.decode(),
        client.get(f"/admin/proxy/upstream/{pair.alpha.pk}/change/").content.decode(),
        client.get("/admin/").content.decode(),
        client.get("/readyz").content.decode(),
    ]
    record = UsageRecord.objects.get()
    for secret in (ALPHA_KEY, BETA_KEY):
        for text in (*pages, response.body.decode(), json.dumps(response.headers), caplog.text, record.error):
            assert secret not in text
    assert "set (ends in …WXYZ)" in pages[1]  # all staff ever see of it again
    assert ALPHA_KEY not in repr(upstream.config_of(pair.alpha))


# --- each upstream its own client ------------------------------------------------------------------


def test_an_upstream_behind_a_private_ca_is_trusted_through_its_own_ca_bundle_only(fakes, token, tmp_path):
    from tests.fake_upstream import FakeUpstream, self_signed_certificate

    cert, private_key = self_signed_certificate(str(tmp_path))
    private = FakeUpstream(tls=(cert, private_key))
    try:
        untrusted = add_upstream("alpha", private.url, key=ALPHA_KEY)
        trusted = add_upstream("beta", private.url, key=BETA_KEY, ca_bundle=open(cert).read())
        serve("acme/a", untrusted, priority=0, prompt="1", completion="2")
        serve("acme/b", trusted, priority=0, prompt="1", completion="2")
        private.script("chat", Reply(body=completion(u=usage(100, 20))))

        refused = call(CHAT, ask("acme/a"), token=token)
        assert refused.status == 502 and not private.requests  # the handshake failed: nothing sent

        assert call(CHAT, ask("acme/b"), token=token).status == 200
        assert private.calls("chat")[0].headers["authorization"] == f"Bearer {BETA_KEY}"
    finally:
        private.close()


def test_choosing_among_upstreams_and_failing_over_costs_no_statement_more(pair, token, settings):
    from proxy.selectors import price_cache_clear, routes_current
    from tests.test_proxy_stream import orm_queries_in_any_thread

    settings.PROXY_PRICE_CACHE_SECONDS = 60
    price_cache_clear()
    routes_current(MODEL)  # the routing table, cached as the price table always was
    move(pair.alpha, refused_url())
    pair.second.script("chat", *[answer(False) for _ in range(3)])
    for _ in range(2):  # the key's first use stamps last_used_at; then it is remembered
        assert call(CHAT, ask(), token=token).status == 200
    sent: list[str] = []
    with orm_queries_in_any_thread() as orm, adb.observe(sent.append):
        response = call(CHAT, ask(), token=token)
    assert response.status == 200 and latest().upstream == "beta"
    if adb.native():
        assert orm == [] and len(sent) == 2  # the hold with its record; the settlement with its update
    else:
        writes = [sql for sql in orm if not sql.startswith(("BEGIN", "SAVEPOINT", "RELEASE"))]
        assert len(writes) == 1 + 2 + 1 + 6, "\n".join(sql[:90] for sql in orm)  # as tests/test_proxy_stream.py
    price_cache_clear()


def test_a_long_request_writes_down_which_upstream_serves_it_for_reconcile_holds(fakes, token):
    """A crash mid-stream leaves the hold to reconcile_holds, which looks the generation up where
    the progress write says it went, and prices an estimate at that upstream's rates (here the
    cheaper one: the hold was taken at the dearer, which failed)."""
    _, second = fakes
    alpha = add_upstream("alpha", refused_url(), key=ALPHA_KEY)
    beta = add_upstream("beta", second.url, key=BETA_KEY)
    dear = serve(MODEL, alpha, priority=0, prompt="3.00", completion="6.00")
    cheap = serve(MODEL, beta, priority=1, prompt="1.00", completion="2.00")
    second.script("chat", StreamReply([*stream_of("slow")[:2], 2.0, *stream_of("ly", u=usage(100, 20))[1:]]))
    done = []
    worker = threading.Thread(target=lambda: done.append(call(CHAT, ask(stream=True), token=token)))
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while not UsageRecord.objects.filter(upstream="beta", status=UsageStatus.PENDING).exists():
            assert time.monotonic() < deadline, "no progress write named the upstream"
            time.sleep(0.05)
        pending = UsageRecord.objects.get()
        assert pending.hold_amount == held_at(dear, ask(stream=True))
        assert (pending.price_id, pending.generation_id) == (cheap.pk, "gen-fake-1")
        assert Decimal(pending.prices["prompt"]) == Decimal("1")
    finally:
        worker.join(20)
    assert done[0].status == 200 and UsageRecord.objects.get().status == UsageStatus.OK


def test_an_upstream_whose_key_cannot_be_decrypted_is_failed_over_without_being_called(pair, token, settings):
    settings.UPSTREAM_KEY_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]  # not the key alpha's was sealed with
    Upstream.objects.filter(pk=pair.beta.pk).update(api_key_encrypted="")  # beta needs no key (OpenAI-compatible)
    pair.second.script("chat", answer(False))

    response = call(CHAT, ask(), token=token)

    assert response.status == 200 and not pair.first.requests
    assert latest().error.startswith("failed over from alpha: The upstream model is unreachable (UpstreamUnusable)")
    assert "authorization" not in pair.second.calls("chat")[0].headers
