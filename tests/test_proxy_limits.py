"""Guardrail counters: shared through Redis when configured, rebuilt from the records when lost."""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

import os

import pytest
from django.core.cache import cache

from accounts.services import api_key_create
from tests.fake_upstream import MODEL, Reply, call, completion, fake_upstream, fake_upstream_server, price, usage  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"
HELLO = {"model": MODEL, "messages": [{"role": "user", "content": "Say pong"}], "max_tokens": 100}


@pytest.mark.redis
def test_rate_counters_live_in_redis_so_every_process_shares_them(fake_upstream, alice, price, settings):
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": os.environ["TEST_REDIS_URL"],
            "KEY_PREFIX": f"tt-test-{os.getpid()}",
        }
    }
    cache.clear()
    key_row, token = api_key_create(user=alice, name="k", limits={"rpm": 2})
    fake_upstream.script("chat", *[Reply(body=completion(u=usage(1, 1, cost="0.000001")))] * 2)
    assert [call(CHAT, HELLO, token=token).status for _ in range(3)] == [200, 200, 429]
    import redis

    client = redis.Redis.from_url(os.environ["TEST_REDIS_URL"])
    assert client.keys(f"tt-test-{os.getpid()}:*tt:rpm:{key_row.pk}:*")
    cache.clear()


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
