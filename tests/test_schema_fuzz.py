"""A bounded, schema-driven fuzz run (schemathesis) against both OpenAPI schemas, authenticated:
whatever a client sends that the schema describes — or nearly describes (schemathesis also sends
bodies and parameters that break it) — the answer is never a 5xx.

Bounded and repeatable: a few examples per operation, from a fixed seed (the same requests every
run), no example database. scripts/test runs the suite on both databases (TEST_HALF): each half
sends half the examples, from a seed of its own, so the two together send as many requests per
operation as one full run, mostly different ones, and every operation is fuzzed on both
databases. Run in-process through Django's WSGI handler on the test database; the endpoints that
are ASGI applications (/v1/chat/completions and friends) are not in the /v1 schema and have their
own tests.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from accounts.services import api_key_create, token_pair_issue

pytestmark = pytest.mark.django_db

MAX_EXAMPLES = 12  # per operation and generation mode, over both halves of scripts/test
_HALF_SEEDS = {"sqlite": 1, "postgres": 2}
_HALF = os.environ.get("TEST_HALF", "")
SEED = _HALF_SEEDS.get(_HALF, 0)
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES // 2 if _HALF in _HALF_SEEDS else MAX_EXAMPLES,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture
def wsgi(db):
    """Django's WSGI handler on the test's transaction. Like Django's own test client, it must not
    close the database connection at the end of each request (that would end the transaction)."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield get_wsgi_application()
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def api_schema(wsgi):
    return schemathesis.openapi.from_wsgi("/api/schema/", wsgi)


@pytest.fixture
def v1_schema(wsgi):
    return schemathesis.openapi.from_wsgi("/v1/openapi.json", wsgi)


@pytest.fixture
def fuzzer(alice):
    """alice funded, signed in, with a billing-scope key (so every /v1 operation is reachable)."""
    access = token_pair_issue(user=alice).access
    _, billing = api_key_create(user=alice, name="fuzz billing", scopes=["proxy", "billing"])
    return {"api": {"Authorization": f"Bearer {access}"}, "v1": {"Authorization": f"Bearer {billing}"}}


def fuzz(schema, headers: dict[str, str]) -> None:
    """Every operation, positive examples (valid by the schema) and negative ones (not); each
    5xx is collected with the curl command that reproduces it, and all are reported together."""
    problems: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @seed(SEED)
            @FUZZ_SETTINGS
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                response = case.call(headers={**(case.headers or {}), **headers})
                assert response.status_code < 500, (
                    f"{response.status_code} for {case.as_curl_command()}\n{response.text[:300]}"
                )

            try:
                run()
            except Unsatisfiable:
                pass  # an operation with nothing to break (no parameters, no body) has no negative case
            except AssertionError as exc:
                problems.append(f"{operation.label} ({mode.value}): {exc}")
    assert problems == []


def test_the_account_api_never_answers_5xx(api_schema, fuzzer):
    fuzz(api_schema, fuzzer["api"])


def test_the_v1_api_never_answers_5xx(v1_schema, fuzzer):
    fuzz(v1_schema, fuzzer["v1"])
