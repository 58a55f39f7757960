"""Upstreams in the Django admin: clear validation errors, a key that is written once and never
shown again, the "test connection" action, key rotation, and the database's own refusals."""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

from __future__ import annotations

import io
import re
import socket
from decimal import Decimal

import pytest
from cryptography.fernet import Fernet
from django.core.management import CommandError, call_command
from django.db import IntegrityError, transaction

from proxy import keyvault, upstream
from proxy.models import ModelPrice, Upstream
from proxy.upstreams import upstream_save
from tests.fake_upstream import Reply, fake_upstream_server, self_signed_certificate  # noqa: F401

ADD = "/admin/proxy/upstream/add/"
CHANGELIST = "/admin/proxy/upstream/"
KEY = "sk-or-v1-0123456789abcdefABCD"

pytestmark = pytest.mark.django_db


@pytest.fixture
def vault(settings):
    settings.UPSTREAM_KEY_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    return settings.UPSTREAM_KEY_ENCRYPTION_KEYS[0]


@pytest.fixture
def staff_client(client, staff):
    client.force_login(staff)
    return client


def form(**changes) -> dict:
    data = {
        "name": "openrouter-eu",
        "kind": "openrouter",
        "base_url": "https://openrouter.ai/api/v1",
        "enabled": "on",
        "api_key": KEY,
        "ca_bundle": "",
        "connect_timeout": "10",
        "read_timeout": "300",
        "max_connections": "200",
        "max_concurrency": "0",
        "_save": "Save",
    }
    return {**data, **changes}


def errors_of(response) -> str:
    """The page's error lists, as text."""
    html = response.content.decode()
    return " ".join(
        re.sub(r"<[^>]+>", " ", block) for block in re.findall(r'<ul class="errorlist[^"]*".*?</ul>', html, re.S)
    )


def test_staff_add_an_upstream_whose_key_is_stored_encrypted_and_never_shown_again(staff_client, vault):
    response = staff_client.post(ADD, form())

    assert response.status_code == 302, errors_of(response)
    row = Upstream.objects.get()
    assert (row.name, row.kind, row.base_url) == ("openrouter-eu", "openrouter", "https://openrouter.ai/api/v1")
    assert KEY not in row.api_key_encrypted and keyvault.decrypt(row.api_key_encrypted) == KEY
    page = staff_client.get(f"{CHANGELIST}{row.pk}/change/").content.decode()
    assert KEY not in page and "set (ends in …ABCD)" in page
    assert 'name="api_key"' in page and 'value="' + KEY not in page  # the field is write-only


def test_saving_without_a_new_key_keeps_the_stored_one_and_a_new_key_replaces_it(staff_client, vault):
    staff_client.post(ADD, form())
    row = Upstream.objects.get()
    stored = row.api_key_encrypted

    response = staff_client.post(f"{CHANGELIST}{row.pk}/change/", form(api_key="", read_timeout="60"))
    assert response.status_code == 302, errors_of(response)
    row.refresh_from_db()
    assert (row.read_timeout, row.api_key_encrypted) == (60.0, stored)

    staff_client.post(f"{CHANGELIST}{row.pk}/change/", form(api_key="sk-or-v1-replacement-key-9999"))
    row.refresh_from_db()
    assert keyvault.decrypt(row.api_key_encrypted) == "sk-or-v1-replacement-key-9999"


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"base_url": "ftp://files.example.com/v1"}, "base_url", "must start with http:// or https://"),
        ({"base_url": "openrouter.ai/api/v1"}, "base_url", "must start with http:// or https://"),
        ({"base_url": "https://me:pw@openrouter.ai/api/v1"}, "base_url", "must not carry credentials"),
        ({"api_key": ""}, "api_key", "needs an API key"),
        ({"kind": "anthropic", "api_key": ""}, "api_key", "needs an API key"),
        ({"kind": "gemini"}, "kind", "Select a valid choice"),
        ({"name": "default"}, "name", "reserved"),
        ({"name": "has spaces"}, "name", "letters, numbers, underscores or hyphens"),
        ({"connect_timeout": "-1"}, "connect_timeout", "greater than or equal to 0.1"),
        ({"read_timeout": "soon"}, "read_timeout", "Enter a number"),
        ({"max_connections": "0"}, "max_connections", "greater than or equal to 1"),
        ({"max_concurrency": "-3"}, "max_concurrency", "greater than or equal to 0"),
        ({"ca_bundle": "not a certificate"}, "ca_bundle", "neither PEM text nor a file"),
        ({"ca_bundle": "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----"}, "ca_bundle", "not PEM"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error_and_nothing_saved(staff_client, vault, changes, field, message):
    response = staff_client.post(ADD, form(**changes))

    assert response.status_code == 200
    assert message in errors_of(response), errors_of(response)
    assert f'id="id_{field}"' in response.content.decode()
    assert not Upstream.objects.exists()


def test_an_openai_compatible_server_may_have_no_key_and_a_stored_one_can_be_removed(staff_client, vault):
    response = staff_client.post(ADD, form(name="ollama", kind="openai", base_url="http://10.0.0.5:11434/v1/"))
    assert response.status_code == 302, errors_of(response)
    row = Upstream.objects.get()
    assert row.base_url == "http://10.0.0.5:11434/v1"  # the trailing slash dropped, as for UPSTREAM_BASE_URL
    assert row.api_key_encrypted != ""

    staff_client.post(
        f"{CHANGELIST}{row.pk}/change/", form(name="ollama", kind="openai", api_key="", remove_api_key="on")
    )
    row.refresh_from_db()
    assert row.api_key_encrypted == ""
    assert "not set" in staff_client.get(f"{CHANGELIST}{row.pk}/change/").content.decode()


def test_a_key_cannot_be_saved_without_an_encryption_key(staff_client, settings):
    settings.UPSTREAM_KEY_ENCRYPTION_KEYS = []

    response = staff_client.post(ADD, form())

    assert response.status_code == 200
    assert "UPSTREAM_KEY_ENCRYPTION_KEY is not set" in errors_of(response)
    assert not Upstream.objects.exists()


def test_a_ca_bundle_may_be_pem_text_or_a_file(staff_client, vault, tmp_path):
    cert, _ = self_signed_certificate(str(tmp_path))
    pem = open(cert).read()

    assert staff_client.post(ADD, form(name="by-text", ca_bundle=pem)).status_code == 302
    assert staff_client.post(ADD, form(name="by-path", ca_bundle=cert)).status_code == 302
    assert {row.name: row.ca_bundle for row in Upstream.objects.all()} == {"by-text": pem.strip(), "by-path": cert}


def test_upstreams_are_never_deleted_and_their_name_is_fixed_once_saved(staff_client, vault):
    staff_client.post(ADD, form())
    row = Upstream.objects.get()

    assert staff_client.get(f"{CHANGELIST}{row.pk}/delete/").status_code == 403
    page = staff_client.get(f"{CHANGELIST}{row.pk}/change/").content.decode()
    assert 'name="name"' not in page  # read-only: usage records name it


def test_test_connection_reports_what_the_upstream_answered(staff_client, vault, fake_upstream_server):
    fake_upstream_server.reset()
    staff_client.post(ADD, form(base_url=fake_upstream_server.url))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    staff_client.post(ADD, form(name="dead", base_url=dead))
    fake_upstream_server.script("models", Reply(body={"data": [{"id": "a"}, {"id": "b"}]}))

    response = staff_client.post(
        CHANGELIST,
        {"action": "test_connection", "_selected_action": [r.pk for r in Upstream.objects.all()]},
        follow=True,
    )

    page = response.content.decode()
    assert f"Test connection to openrouter-eu: HTTP 200 from {fake_upstream_server.url}/models, 2 models listed" in page
    assert f"Test connection to dead: could not reach {dead}: ConnectError" in page
    (asked,) = fake_upstream_server.calls("models")
    assert asked.headers["authorization"] == f"Bearer {KEY}"  # with the stored key …
    assert KEY not in page  # … which the page never shows


def test_a_price_names_its_upstream_and_the_model_page_lists_every_upstream_in_order(staff_client, vault):
    staff_client.post(ADD, form())
    row = Upstream.objects.get()
    base = {
        "model": "acme/m",
        "name": "",
        "enabled": "on",
        "prompt": "1",
        "completion": "2",
        "reasoning": "0",
        "cache_read": "0",
        "cache_write": "0",
        "request_fee_usd": "0",
        "min_charge_usd": "0",
        "markup": "",
        "default_max_output": "1000",
        "context_length": "",
        "_save": "Save",
    }
    assert staff_client.post("/admin/proxy/modelprice/add/", base).status_code == 302  # the default upstream
    response = staff_client.post("/admin/proxy/modelprice/add/", {**base, "upstream": row.pk, "priority": "1"})
    assert response.status_code == 302, errors_of(response)
    again = staff_client.post("/admin/proxy/modelprice/add/", {**base, "upstream": row.pk})
    assert "already has prices at openrouter-eu" in errors_of(again)

    default_row = ModelPrice.objects.get(upstream=None)
    page = staff_client.get(f"/admin/proxy/modelprice/{default_row.pk}/change/").content.decode()
    routes = page.split("upstreams serving this model")[1]
    assert routes.index(">default<") < routes.index(">openrouter-eu<")


def test_rotating_the_encryption_key_re_encrypts_every_stored_key(vault, settings):
    upstream_save(row=Upstream(name="a", kind="openrouter", base_url="https://a.example/v1"), api_key=KEY)
    upstream_save(row=Upstream(name="b", kind="openai", base_url="http://b.example/v1"))  # no key: nothing to do
    new = Fernet.generate_key().decode()
    settings.UPSTREAM_KEY_ENCRYPTION_KEYS = [new, vault]
    out = io.StringIO()

    call_command("rotate_upstream_keys", stdout=out)

    assert "re-encrypted 1 upstream key(s)" in out.getvalue()
    settings.UPSTREAM_KEY_ENCRYPTION_KEYS = [new]  # the old key retired
    assert upstream.config_of(Upstream.objects.get(name="a")).api_key == KEY


def test_rotation_with_keys_that_cannot_read_a_stored_key_changes_nothing(vault, settings):
    upstream_save(row=Upstream(name="a", kind="openrouter", base_url="https://a.example/v1"), api_key=KEY)
    before = Upstream.objects.get().api_key_encrypted
    settings.UPSTREAM_KEY_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]

    with pytest.raises(CommandError, match="nothing changed"):
        call_command("rotate_upstream_keys", stdout=io.StringIO())

    assert Upstream.objects.get().api_key_encrypted == before
    config = upstream.config_of(Upstream.objects.get())
    assert config.api_key == "" and "cannot be decrypted" in config.unusable


def test_readyz_is_unready_when_an_upstreams_key_cannot_be_decrypted(client, vault, settings):
    upstream_save(row=Upstream(name="a", kind="openrouter", base_url="https://a.example/v1"), api_key=KEY)
    settings.UPSTREAM_KEY_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]  # the deploy lost its key

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["checks"]["upstream"].startswith("error: upstream a: the stored key cannot be decrypted")
    assert "cannot be decrypted" in response.json()["upstreams"]["a"]["error"]


@pytest.mark.parametrize(
    "change",
    [
        {"base_url": "ftp://x.example"},
        {"kind": "gemini"},
        {"connect_timeout": 0},
        {"max_connections": 0},
        {"name": "demo"},
    ],
)
def test_the_database_refuses_an_impossible_upstream_too(vault, change):
    row = upstream_save(row=Upstream(name="a", kind="openrouter", base_url="https://a.example/v1"), api_key=KEY)

    with pytest.raises(IntegrityError), transaction.atomic():
        Upstream.objects.filter(pk=row.pk).update(**change)


def test_the_demo_model_cannot_name_an_upstream(vault):
    row = upstream_save(row=Upstream(name="a", kind="openrouter", base_url="https://a.example/v1"), api_key=KEY)
    price = ModelPrice.objects.create(model="tokentill/demo", is_demo=True, prompt=Decimal("0.5"))

    with pytest.raises(IntegrityError), transaction.atomic():
        ModelPrice.objects.filter(pk=price.pk).update(upstream=row)
