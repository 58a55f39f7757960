"""Guardrail counters: shared through Redis when configured, rebuilt from the records when lost."""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

import json
import os

import pytest
from django.core.cache import cache
from django.core.cache.backends.locmem import LocMemCache

from accounts.services import api_key_create
from tests.fake_upstream import MODEL, Reply, call, completion, fake_upstream, fake_upstream_server, price, usage  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"
HELLO = {"model": MODEL, "messages": [{"role": "user", "content": "Say pong"}], "max_tokens": 100}


@pytest.mark.usefixtures("one_minute")
@pytest.mark.redis
def test_rate_counters_live_in_redis_so_every_process_shares_them(fake_upstream, alice, price, redis_cache):
    key_row, token = api_key_create(user=alice, name="k", limits={"rpm": 2})
    fake_upstream.script("chat", *[Reply(body=completion(u=usage(1, 1, cost="0.000001")))] * 2)
    assert [call(CHAT, HELLO, token=token).status for _ in range(3)] == [200, 200, 429]
    import redis

    client = redis.Redis.from_url(os.environ["TEST_REDIS_URL"])
    assert client.keys(f"tt-test-{os.getpid()}:*tt:rpm:{key_row.pk}:*")


def test_a_spend_cap_survives_losing_the_cache(fake_upstream, alice, price):
    # Each request is charged $0.0006 (cost 0.0005 × 1.2): after two, the cap has no room for a hold.
    token = api_key_create(user=alice, name="k", limits={"daily_spend": "0.0012"})[1]
    fake_upstream.script("chat", *[Reply(body=completion(u=usage(1, 1, cost="0.0005")))] * 3)
    assert call(CHAT, HELLO, token=token).status == 200
    cache.clear()  # a restart of an in-memory cache, or an eviction
    assert call(CHAT, HELLO, token=token).status == 200
    cache.clear()
    response = call(CHAT, HELLO, token=token)
    assert response.status == 429 and response.error["code"] == "spend_cap_reached"


class CountingCache(LocMemCache):
    """A process-local cache that counts the writes the limit checks make."""

    writes = 0

    def incr(self, *args, **kwargs):
        CountingCache.writes += 1
        return super().incr(*args, **kwargs)

    def add(self, *args, **kwargs):
        CountingCache.writes += 1
        return super().add(*args, **kwargs)


@pytest.mark.parametrize(
    "key_limits, run, run_steps, run_spend, asked",
    [
        ({}, "", 0, "0", (0, 0)),
        ({}, "run-1", 0, "0", (0, 0)),  # a run label with no run limits configured
        ({}, "", 50, "2.00", (0, 0)),  # run limits configured, but the request names no run
        ({"rpm": 0, "daily_spend": None, "monthly_spend": ""}, "", 0, "0", (0, 0)),  # unset, spelled three ways
        ({"rpm": 60}, "", 0, "0", (0, 0)),
        ({"daily_spend": "1.00"}, "", 0, "0", (0, 0)),
        ({"monthly_spend": "0"}, "", 0, "0", (0, 0)),  # a cap of zero is still a cap
        ({}, "run-1", 50, "0", (0, 0)),
        ({}, "run-1", 0, "2.00", (0, 0)),
        ({"run_max_steps": 5}, "run-1", 0, "0", (0, 0)),  # the key's run limits
        ({"run_max_spend": "0.50"}, "run-1", 0, "0", (0, 0)),
        ({"run_max_steps": 5, "run_max_spend": "0.50"}, "", 0, "0", (0, 0)),  # ... with no run named
        ({}, "run-1", 0, "0", (3, 0)),  # the request's own
        ({}, "run-1", 0, "0", (0, 10**8)),
    ],
)
def test_uses_counters_is_true_exactly_when_the_checks_touch_the_cache(
    alice, settings, key_limits, run, run_steps, run_spend, asked
):
    """The async path skips the worker thread when ``uses_counters`` says no counter is involved;
    were it wrong, a limit would silently go unchecked."""
    from datetime import UTC, datetime

    from proxy import limits

    settings.CACHES = {"default": {"BACKEND": f"{__name__}.CountingCache"}}
    settings.RUN_MAX_STEPS, settings.RUN_MAX_SPEND = run_steps, run_spend
    api_key = api_key_create(user=alice, name="k", limits=key_limits)[0]
    CountingCache.writes = 0
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    try:
        limits.check_rpm(api_key=api_key, now=now)
        limits.check_run_steps(run=run, user_id=alice.pk, api_key=api_key, run_max_steps=asked[0])
        limits.reserve_spend(api_key=api_key, run=run, user_id=alice.pk, amount=1, now=now, run_max_spend=asked[1])
    except limits.LimitExceeded:  # the zero cap refuses; it was checked all the same
        pass
    used = limits.uses_counters(api_key=api_key, run=run, run_max_steps=asked[0], run_max_spend=asked[1])
    assert used == (CountingCache.writes > 0)


def test_a_request_over_the_keys_max_parallel_is_refused_at_once_and_the_slot_comes_back(fake_upstream, alice, price):
    import asyncio

    from asgiref.sync import async_to_sync

    from config.asgi import application
    from tests.fake_upstream import _proxy_call, close_loop_resources

    def proxy_call(path, body, *, token):  # on one loop, whose resources are closed once, at the end
        raw = json.dumps(body).encode()
        return _proxy_call(application, path, raw, [raw], token, None, None, 10, "POST")

    token = api_key_create(user=alice, name="k", limits={"max_parallel": 1})[1]
    reply = completion(u=usage(1, 1, cost="0.000001"))
    fake_upstream.script("chat", Reply(body=reply, delay=1.0), Reply(body=reply))

    async def scenario():
        try:
            first = asyncio.ensure_future(proxy_call(CHAT, HELLO, token=token))
            while not fake_upstream.calls("chat"):  # the first is in flight at the upstream
                await asyncio.sleep(0.01)
            second = await proxy_call(CHAT, HELLO, token=token)
            done = await first
            third = await proxy_call(CHAT, HELLO, token=token)  # the first's slot came back
            return second, done, third
        finally:
            await close_loop_resources()

    second, first, third = async_to_sync(scenario)()
    assert second.status == 429 and second.error["code"] == "max_parallel_reached"
    assert second.headers["retry-after"] == "1"
    assert first.status == 200 and third.status == 200
    assert len(fake_upstream.calls("chat")) == 2


def test_a_request_works_out_its_limit_subjects_once_for_every_check(fake_upstream, alice, price, monkeypatch):
    # rpm, max_parallel, spend and token caps on the key, and a run: every counter check runs, each
    # handed the subjects _aplan worked out (any check working them out again is counted here).
    from proxy import limits

    limits_set = {"rpm": 5, "max_parallel": 2, "daily_spend": "1", "tpm": 100_000}
    token = api_key_create(user=alice, name="k", limits=limits_set)[1]
    worked_out = []
    real = limits.subjects_of
    monkeypatch.setattr(limits, "subjects_of", lambda *args: worked_out.append(args) or real(*args))
    fake_upstream.script("chat", Reply(body=completion(u=usage(1, 1, cost="0.000001"))))
    assert call(CHAT, HELLO, token=token, headers={"X-Tokentill-Run": "r1"}).status == 200
    assert len(worked_out) == 1
    fake_upstream.script("chat", *[Reply(body=completion(u=usage(1, 1, cost="0.000001")))] * 5)
    statuses = [call(CHAT, HELLO, token=token).status for _ in range(5)]
    assert statuses == [200, 200, 200, 200, 429]  # the rpm limit still counts, from the one working-out
    assert len(worked_out) == 6
