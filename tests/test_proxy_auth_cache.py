"""The proxy's remembered principals (PostgreSQL): a key or session seen recently costs a proxied
request no authentication statement, and a change to it still counts from the very next request.

Each test makes the proxy remember a principal (two requests: the first writes the key's
``last_used_at``, the second reads it again and keeps it), changes it through the public API
or the database, then checks the next request is answered as a freshly authenticated one would
be — and that the upstream never heard of a request that should have been refused.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

import pytest

from accounts.models import ApiKey, TokenFamily, User
from infra import adb
from proxy.models import UsageRecord, UsageStatus
from tests.fake_upstream import (  # noqa: F401  (fixtures)
    MODEL,
    Reply,
    call,
    completion,
    fake_upstream,
    fake_upstream_server,
    price,
    usage,
)
from wallet.models import Hold, Wallet

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"
HELLO = {"model": MODEL, "messages": [{"role": "user", "content": "Say pong"}]}


@pytest.fixture(autouse=True)
def _postgres_only():
    if not adb.native():
        pytest.skip("principals are remembered on PostgreSQL's event-loop path only")


@pytest.fixture
def remembered(fake_upstream, alice_client, price):
    """Alice's new key (id, secret), used twice so the proxy now remembers it."""
    body = alice_client.post("/api/keys", {"name": "agent"}, format="json").json()
    replies = [Reply(body=completion(u=usage(100, 20, cost=0.00003))) for _ in range(4)]
    fake_upstream.script("chat", *replies)
    for _ in range(2):
        assert call(CHAT, HELLO, token=body["key"]).status == 200
    return body["id"], body["key"]


def statements_of(token: str, body: dict = HELLO):
    sent: list[str] = []
    with adb.observe(sent.append):
        response = call(CHAT, body, token=token)
    return response, sent


def test_a_remembered_key_costs_a_request_only_its_hold_and_its_settlement(remembered, fake_upstream):
    response, sent = statements_of(remembered[1])
    assert response.status == 200
    begin, settle = sent  # no authentication statement of its own
    assert "wallet_hold" in begin and "accounts_apikey" in begin and "xmin" in begin  # the key checked unchanged
    assert "wallet_entry" in settle
    assert UsageRecord.objects.filter(status=UsageStatus.OK).count() == 3


def test_revoking_a_remembered_key_refuses_its_next_request(remembered, fake_upstream, alice_client, alice):
    key_id, token = remembered
    upstream_calls = len(fake_upstream.calls("chat"))
    assert alice_client.delete(f"/api/keys/{key_id}").status_code == 204

    response, sent = statements_of(token)

    assert response.status == 401 and response.error["code"] == "invalid_api_key"
    assert "revoked" in response.error["message"]
    assert len(fake_upstream.calls("chat")) == upstream_calls  # the upstream never heard of it
    assert Hold.objects.count() == 2 and UsageRecord.objects.count() == 2  # no hold, no record
    assert Wallet.objects.get(user=alice).held == 0
    # The hold was tried under the key's unchanged condition and not taken; then the key was
    # read again, and refused.
    assert "wallet_hold" in sent[0] and sent[-1].startswith("SELECT") and "accounts_apikey" in sent[-1]


def test_a_refusal_for_a_revoked_remembered_key_is_a_401_and_not_recorded(remembered, fake_upstream, alice_client):
    key_id, token = remembered
    alice_client.delete(f"/api/keys/{key_id}")
    response, _ = statements_of(token, {**HELLO, "model": "no/such-model"})
    assert response.status == 401
    assert not UsageRecord.objects.filter(status=UsageStatus.REFUSED).exists()


def test_new_limits_on_a_remembered_key_apply_to_its_next_request(remembered, fake_upstream, alice_client):
    key_id, token = remembered
    patched = alice_client.patch(f"/api/keys/{key_id}", {"limits": {"allowed_models": ["other/model"]}}, format="json")
    assert patched.status_code == 200
    upstream_calls = len(fake_upstream.calls("chat"))

    response, _ = statements_of(token)

    assert response.status == 403 and response.error["code"] == "model_not_allowed"
    assert len(fake_upstream.calls("chat")) == upstream_calls
    refused = UsageRecord.objects.get(status=UsageStatus.REFUSED)
    assert (refused.http_status, refused.api_key_id) == (403, key_id)


def test_disabling_the_user_of_a_remembered_key_refuses_its_next_request(remembered, fake_upstream, alice):
    User.objects.filter(pk=alice.pk).update(is_active=False)
    response, _ = statements_of(remembered[1])
    assert response.status == 401 and "disabled" in response.error["message"]


def test_an_empty_wallet_with_a_revoked_remembered_key_is_a_401_not_a_402(
    remembered, fake_upstream, alice_client, alice
):
    key_id, token = remembered
    Wallet.objects.filter(user=alice).update(balance=0)
    alice_client.delete(f"/api/keys/{key_id}")
    response, _ = statements_of(token)
    assert response.status == 401
    assert not UsageRecord.objects.filter(status=UsageStatus.REFUSED).exists()


def test_a_remembered_key_that_runs_out_of_funds_is_still_refused_with_402(remembered, fake_upstream, alice):
    Wallet.objects.filter(user=alice).update(balance=0)  # the wallet's row: not part of the principal
    response, sent = statements_of(remembered[1])
    assert response.status == 402 and response.error["code"] == "insufficient_funds"
    # The hold not taken, the wallet's state (with the key checked unchanged), the refusal's
    # record: the key itself is not read again.
    assert len(sent) == 3 and not any("k.prefix" in sql for sql in sent)
    assert UsageRecord.objects.get(status=UsageStatus.REFUSED).http_status == 402


def test_a_remembered_session_is_refused_once_signed_out(fake_upstream, alice, price):
    from rest_framework.test import APIClient

    from accounts.services import token_pair_issue

    pair = token_pair_issue(user=alice)
    fake_upstream.script("chat", *[Reply(body=completion(u=usage(100, 20, cost=0.00003))) for _ in range(3)])
    assert call(CHAT, HELLO, token=pair.access).status == 200  # read and remembered
    response, sent = statements_of(pair.access)
    assert response.status == 200 and len(sent) == 2 and "accounts_tokenfamily" in sent[0]

    assert APIClient().post("/api/auth/logout", {"refresh": pair.refresh}, format="json").status_code == 204
    assert TokenFamily.objects.get(user=alice, revoked_at__isnull=False)
    upstream_calls = len(fake_upstream.calls("chat"))
    response, _ = statements_of(pair.access)

    assert response.status == 401 and "revoked" in response.error["message"]
    assert len(fake_upstream.calls("chat")) == upstream_calls


def test_a_remembered_key_still_has_its_last_use_written(remembered, fake_upstream, monkeypatch):
    from datetime import timedelta

    from accounts import auth

    key_id, token = remembered
    before = ApiKey.objects.get(pk=key_id).last_used_at
    monkeypatch.setattr(auth, "LAST_USED_RESOLUTION", timedelta(0))  # every use is now worth writing
    response, sent = statements_of(token)
    assert response.status == 200
    assert any(sql.startswith("UPDATE") and "last_used_at" in sql for sql in sent)
    assert ApiKey.objects.get(pk=key_id).last_used_at > before
