"""A credential that expired or was revoked, on the proxy: a 401 — or, in assistant-message mode
on chat completions, a reply the app can show asking the user to sign in again. Signing an app
out is seen by its very next proxied request, remembered principals (PostgreSQL) included."""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from django.core import signing
from django.utils import timezone

from accounts.models import ApiKey, User
from accounts.services import ACCESS_SALT, api_key_create, token_pair_issue
from proxy.models import UsageRecord
from tests.conftest import bearer_client
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

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"
HELLO = {"model": MODEL, "messages": [{"role": "user", "content": "Say pong"}]}


class SignedAnHourAgo(signing.TimestampSigner):
    def timestamp(self):
        return signing.b62_encode(int(time.time()) - 3600)


def expired_access(user) -> str:
    family_id = token_pair_issue(user=user).family_id
    return SignedAnHourAgo(salt=ACCESS_SALT).sign_object({"f": str(family_id)}, compress=False)


def revoked_access(user) -> str:
    pair = token_pair_issue(user=user)
    assert bearer_client(user).delete(f"/api/auth/sessions/{pair.family_id}").status_code == 204
    return pair.access


def revoked_key(user) -> str:
    key, secret = api_key_create(user=user, name="k")
    ApiKey.objects.filter(pk=key.pk).update(revoked_at=timezone.now())
    return secret


def expired_key(user) -> str:
    return api_key_create(user=user, name="k", expires_at=timezone.now() - timedelta(seconds=1))[1]


SIGNED_OUT = {
    "expired access token": expired_access,
    "revoked session": revoked_access,
    "revoked key": revoked_key,
    "expired key": expired_key,
}


def disabled_key(user) -> str:
    secret = api_key_create(user=user, name="k")[1]
    User.objects.filter(pk=user.pk).update(is_active=False)
    return secret


NOT_SIGNED_IN = {
    "no credential": lambda user: None,
    "garbage": lambda user: "not-a-token",
    "unknown key": lambda user: "tt_" + "x" * 40,
    "disabled account": disabled_key,
}


@pytest.mark.parametrize("credential", SIGNED_OUT)
@pytest.mark.parametrize("stream", [False, True])
def test_assistant_message_mode_asks_a_signed_out_user_to_sign_in_again(
    fake_upstream, alice, price, settings, credential, stream
):
    settings.REFUSAL_MODE = "assistant_message"
    token = SIGNED_OUT[credential](alice)

    response = call(CHAT, {**HELLO, "stream": stream}, token=token)

    assert response.status == 200
    assert response.headers["x-tokentill-blocked"] == "unauthenticated"
    if stream:
        assert response.headers["content-type"] == "text/event-stream"
        events = response.data_events()
        assert events[-1] == "[DONE]"
        text = json.loads(events[0])["choices"][0]["delta"]["content"]
        assert json.loads(events[1])["choices"][0]["finish_reason"] == "stop"
        assert not response.comments()  # no ": tokentill" balance line for someone not signed in
    else:
        text = response.json()["choices"][0]["message"]["content"]
        assert response.json()["model"] == MODEL
    assert f"{settings.APP_URL}/login" in text and "sign in again" in text
    assert not fake_upstream.requests
    assert not UsageRecord.objects.exists()


@pytest.mark.parametrize("credential", NOT_SIGNED_IN)
def test_a_missing_or_malformed_credential_is_still_a_401(fake_upstream, alice, price, settings, credential):
    settings.REFUSAL_MODE = "assistant_message"
    response = call(CHAT, {**HELLO, "stream": True}, token=NOT_SIGNED_IN[credential](alice))
    assert response.status == 401 and response.error["code"] == "invalid_api_key"
    assert "x-tokentill-blocked" not in response.headers


def test_embeddings_keep_the_401_having_no_assistant_message(fake_upstream, alice, price, settings):
    settings.REFUSAL_MODE = "assistant_message"
    response = call("/v1/embeddings", {"model": MODEL, "input": "hi"}, token=revoked_key(alice))
    assert response.status == 401


def test_an_unreadable_body_with_a_signed_out_credential_is_a_401(fake_upstream, alice, price, settings):
    settings.REFUSAL_MODE = "assistant_message"
    response = call(CHAT, b"{not json", token=revoked_key(alice))
    assert response.status == 401


@pytest.mark.parametrize("credential", SIGNED_OUT)
def test_in_error_mode_a_signed_out_credential_is_a_401(fake_upstream, alice, price, credential):
    response = call(CHAT, HELLO, token=SIGNED_OUT[credential](alice))
    assert response.status == 401 and response.error["code"] == "invalid_api_key"


def test_signing_an_app_out_refuses_its_next_proxied_request(fake_upstream, alice, price):
    """On PostgreSQL the proxy remembers the session after its first request and checks the
    token family's row version in the hold's statement: the sign-out must still count at once."""
    app = token_pair_issue(user=alice, name="Acme Desktop")
    fake_upstream.script("chat", *[Reply(body=completion(u=usage(10, 5, cost="0.00001"))) for _ in range(2)])
    assert [call(CHAT, HELLO, token=app.access).status for _ in range(2)] == [200, 200]

    assert bearer_client(alice).delete(f"/api/auth/sessions/{app.family_id}").status_code == 204
    response = call(CHAT, HELLO, token=app.access)

    assert response.status == 401 and "revoked" in response.error["message"]
    assert len(fake_upstream.calls("chat")) == 2
