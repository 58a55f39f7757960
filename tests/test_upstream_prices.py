"""Prices per upstream: ``manage.py sync_prices --upstream`` (OpenRouter's list, or a static price
file for the others), ``/v1/models`` listing each model once at its first candidate's price, and
``reconcile_holds`` asking the upstream that served a request about its generation."""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

from __future__ import annotations

import io
import json
from datetime import timedelta
from decimal import Decimal

import pytest
from cryptography.fernet import Fernet
from django.core.management import CommandError, call_command
from django.utils import timezone

from proxy.models import CostSource, ModelPrice, Upstream, UsageRecord
from proxy.services import RequestMeta, arequest_begin
from proxy.upstreams import upstream_save
from tests.fake_upstream import (  # noqa: F401  (fixtures)
    Reply,
    fake_upstream,
    fake_upstream_server,
    run_async,
    second_upstream_server,
)
from wallet.models import Hold, HoldStatus

pytestmark = pytest.mark.django_db
ALPHA_KEY = "sk-or-v1-alpha-0123456789abcdef"


@pytest.fixture
def vault(settings):
    settings.UPSTREAM_KEY_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]


@pytest.fixture
def alpha(vault, second_upstream_server):
    """An OpenRouter upstream besides the default, on the second fake."""
    second_upstream_server.reset()
    row = Upstream(name="alpha", kind="openrouter", base_url=second_upstream_server.url)
    return upstream_save(row=row, api_key=ALPHA_KEY)


@pytest.fixture
def vllm(vault):
    """An OpenAI-compatible upstream: no price list of its own."""
    return upstream_save(row=Upstream(name="vllm", kind="openai", base_url="http://10.0.0.5:8000/v1"))


def sync(*args) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("sync_prices", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def series(model: str, at: Upstream | None) -> list[ModelPrice]:
    return list(ModelPrice.objects.filter(model=model, upstream=at).order_by("effective_from", "id"))


def openrouter_model(model_id: str, prompt: str, completion: str) -> dict:
    return {"id": model_id, "name": model_id, "pricing": {"prompt": prompt, "completion": completion}}


# --- sync_prices per upstream ----------------------------------------------------------------------


def test_an_openrouter_upstreams_list_is_synced_into_its_own_series_with_its_own_key(alpha, second_upstream_server):
    default = ModelPrice.objects.create(model="openai/gpt-4o", prompt=Decimal("2.5"), completion=Decimal("10"))
    listed = [openrouter_model("openai/gpt-4o", "0.000002", "0.000008")]
    second_upstream_server.script("models", Reply(body={"data": listed}))

    out, _ = sync("--upstream", "alpha")

    assert "comparing with alpha's prices" in out and "1 new" in out
    (asked,) = second_upstream_server.calls("models")
    assert asked.headers["authorization"] == f"Bearer {ALPHA_KEY}"
    (at_alpha,) = series("openai/gpt-4o", alpha)
    assert (at_alpha.prompt, at_alpha.completion, at_alpha.enabled) == (Decimal("2"), Decimal("8"), False)
    assert at_alpha.source == "sync_prices:alpha"
    assert series("openai/gpt-4o", None) == [default]  # the default upstream's prices untouched
    assert ALPHA_KEY not in out


def test_an_upstream_without_a_price_list_needs_a_price_file(vllm):
    with pytest.raises(CommandError, match=r"publishes no price list.*--file"):
        sync("--upstream", "vllm")


def test_an_unknown_upstream_is_a_clear_error(vllm):
    with pytest.raises(CommandError, match="no upstream named 'nope' \\(configured: vllm"):
        sync("--upstream", "nope")


PRICES_JSON = {
    "models": [
        {
            "id": "meta-llama/llama-3.1-70b",
            "name": "Llama 3.1 70B",
            "prompt": "0.40",
            "completion": "0.40",
            "cache_read": "0.10",
            "request": "0.0001",
            "context_length": 131072,
            "max_output": 2048,
        },
        {"id": "qwen/qwen3-32b", "prompt": 0.1, "completion": "0.3"},
    ]
}


def test_a_json_price_file_fills_the_upstreams_series_exactly_and_idempotently(vllm, tmp_path, settings):
    settings.PROXY_DEFAULT_MAX_OUTPUT = 4096
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(PRICES_JSON))

    out, _ = sync("--upstream", "vllm", "--file", str(path), "--enable-new")

    assert "synced 2 models: 2 new" in out
    (llama,) = series("meta-llama/llama-3.1-70b", vllm)
    assert (llama.prompt, llama.completion, llama.cache_read, llama.reasoning) == (
        Decimal("0.4"),
        Decimal("0.4"),
        Decimal("0.1"),
        Decimal("0"),
    )
    assert (llama.request_fee, llama.context_length, llama.default_max_output, llama.enabled) == (
        100_000,
        131072,
        2048,
        True,
    )
    (qwen,) = series("qwen/qwen3-32b", vllm)
    assert qwen.prompt == Decimal("0.1")  # a JSON number read as its exact decimal, never a float

    again, _ = sync("--upstream", "vllm", "--file", str(path))
    assert "0 new, 0 changed, 2 unchanged" in again
    assert ModelPrice.objects.count() == 2


def test_a_csv_price_file_works_the_same_and_a_bad_row_is_skipped_with_a_warning(vllm, tmp_path):
    path = tmp_path / "prices.csv"
    path.write_text(
        "id,name,prompt,completion,request,context_length\n"
        "meta-llama/llama-3.1-70b,Llama,0.40,0.40,,131072\n"
        "broken/model,Broken,-1,0.40,,\n"
        "qwen/qwen3-32b,,0.10,0.30,0,\n"
    )

    out, err = sync("--upstream", "vllm", "--file", str(path))

    assert "2 new" in out and "(1 skipped)" in out
    assert "broken/model: prompt='-1' is not a non-negative price" in err
    assert [p.model for p in ModelPrice.objects.order_by("model")] == ["meta-llama/llama-3.1-70b", "qwen/qwen3-32b"]
    assert series("meta-llama/llama-3.1-70b", vllm)[0].context_length == 131072


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("prices.yaml", "models: []", "a price file is .json or .csv"),
        ("prices.json", "{not json", "is not JSON"),
        ("prices.json", '{"data": 1}', 'needs a list of models, or an object with a "models" list'),
        ("prices.csv", "model,prompt\nx,1\n", "needs a header row naming at least id"),
        ("prices.json", '[{"id": "x", "prompt": "1"}]', "none had usable prices"),
    ],
)
def test_a_broken_price_file_is_a_clear_error_and_changes_nothing(vllm, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)

    with pytest.raises(CommandError, match=message):
        sync("--upstream", "vllm", "--file", str(path))
    assert not ModelPrice.objects.exists()


def test_disable_missing_only_takes_models_off_that_upstream(vllm, tmp_path):
    ModelPrice.objects.create(model="a/gone", prompt=Decimal("1"))  # sold through the default upstream
    ModelPrice.objects.create(model="a/gone", upstream=vllm, prompt=Decimal("1"))
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": [{"id": "b/kept", "prompt": "1", "completion": "1"}]}))

    out, _ = sync("--upstream", "vllm", "--file", str(path), "--disable-missing")

    assert "1 disabled" in out
    assert series("a/gone", vllm)[-1].enabled is False
    assert series("a/gone", None)[-1].enabled is True


def test_without_upstream_the_default_series_is_synced_from_a_file_too(vllm, tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": [{"id": "b/one", "prompt": "1", "completion": "2"}]}))

    sync("--file", str(path))

    (price,) = ModelPrice.objects.all()
    assert (price.model, price.upstream, price.source) == ("b/one", None, "sync_prices")


# --- /v1/models ------------------------------------------------------------------------------------


def test_each_model_is_listed_once_at_its_first_candidates_price(alice_client, vllm, settings):
    settings.MARKUP = Decimal("0.20")
    settings.PROXY_PRICE_CACHE_SECONDS = 0
    ModelPrice.objects.create(model="acme/m", prompt=Decimal("5"), completion=Decimal("5"), priority=1)
    ModelPrice.objects.create(model="acme/m", upstream=vllm, prompt=Decimal("1"), completion=Decimal("1"))
    ModelPrice.objects.create(model="acme/only-vllm", upstream=vllm, prompt=Decimal("2"), completion=Decimal("2"))

    listed = {item["id"]: item["pricing"]["prompt"] for item in alice_client.get("/v1/models").json()["data"]}
    assert listed == {"acme/m": "0.0000012", "acme/only-vllm": "0.0000024"}  # vllm's rates × 1.2

    Upstream.objects.filter(pk=vllm.pk).update(enabled=False)
    listed = {item["id"]: item["pricing"]["prompt"] for item in alice_client.get("/v1/models").json()["data"]}
    assert listed == {"acme/m": "0.000006"}  # now served by the default upstream only


# --- reconcile_holds ---------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_an_expired_hold_is_looked_up_at_the_upstream_that_served_it(
    fake_upstream, alpha, second_upstream_server, alice
):
    ModelPrice.objects.create(model="acme/m", upstream=alpha, prompt=Decimal("1"), completion=Decimal("2"))
    meta = RequestMeta(request_id="req_alpha", user=alice, api_key=None, endpoint="chat.completions", model="acme/m")
    begun = run_async(arequest_begin, meta=meta, prompt_chars=4000, requested_output=100)
    # A progress write had recorded where it went before its server process died.
    UsageRecord.objects.filter(request_id="req_alpha").update(generation_id="gen-a", upstream="alpha")
    Hold.objects.filter(pk=begun.hold.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    found = {"data": {"id": "gen-a", "total_cost": 0.001, "native_tokens_prompt": 900, "native_tokens_completion": 9}}
    second_upstream_server.script("generation", Reply(body=found))

    out = io.StringIO()
    call_command("reconcile_holds", "--backoff", "0.01", stdout=out)

    assert "req_alpha: settled from the upstream's generation lookup" in out.getvalue()
    (asked,) = second_upstream_server.calls("generation")
    assert asked.headers["authorization"] == f"Bearer {ALPHA_KEY}"
    assert not fake_upstream.calls("generation")  # not the default upstream
    record = UsageRecord.objects.get()
    assert (record.cost_source, record.charge) == (CostSource.RECONCILED, 1_200_000)
    assert Hold.objects.get().status == HoldStatus.SETTLED
