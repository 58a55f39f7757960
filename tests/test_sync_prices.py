"""manage.py sync_prices against a fake OpenRouter ``GET /models`` on loopback."""

from __future__ import annotations

import json
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from proxy.models import ModelPrice
from tests.fake_upstream import self_signed_certificate, serve_tls


class FakeOpenRouter:
    """Serves whatever ``body``/``status`` say and remembers the request headers it saw."""

    def __init__(self, tls: tuple[str, str] | None = None):
        self.status = 200
        self.body: bytes = b'{"data": []}'
        self.seen_headers: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                fake.seen_headers.append(dict(self.headers))
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(fake.body)))
                self.end_headers()
                self.wfile.write(fake.body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = serve_tls(self.server, tls)
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/api/v1/models"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def serve(self, models: list[dict]):
        self.body = json.dumps({"data": models}).encode()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def openrouter(settings):
    settings.UPSTREAM_API_KEY = "sk-or-secret-test-key"
    settings.PROXY_DEFAULT_MAX_OUTPUT = 4096
    fake = FakeOpenRouter()
    yield fake
    fake.close()


def model(model_id, prompt="0.00000015", completion="0.0000006", **extra):
    pricing = {"prompt": prompt, "completion": completion, "request": "0", "image": "0", "web_search": "0"}
    pricing.update(extra.pop("pricing", {}))
    return {
        "id": model_id,
        "name": extra.pop("name", model_id),
        "context_length": extra.pop("context_length", 128000),
        "pricing": pricing,
        "top_provider": {"context_length": 128000, "max_completion_tokens": extra.pop("max_completion_tokens", 16384)},
        **extra,
    }


def sync(fake, *args, verbosity=1):
    out, err = StringIO(), StringIO()
    call_command("sync_prices", "--url", fake.url, *args, stdout=out, stderr=err, verbosity=verbosity)
    return out.getvalue(), err.getvalue()


def versions(model_id):
    return list(ModelPrice.objects.filter(model=model_id).order_by("effective_from"))


def test_it_adds_new_models_disabled_with_exact_per_million_rates(openrouter, db):
    openrouter.serve(
        [
            model(
                "openai/gpt-4o-mini",
                prompt="0.00000015",
                completion="0.0000006",
                pricing={
                    "internal_reasoning": "0.0000006",
                    "input_cache_read": "0.0000000375",
                    "input_cache_write": "0.00000019",
                    "request": "0.0005",
                },
                max_completion_tokens=16384,
            )
        ]
    )

    out, _ = sync(openrouter)

    lines = out.splitlines()
    assert lines[0] == f"fetching {openrouter.url} …"  # progress as it goes, then the summary
    assert lines[1] == "1 models listed, 1 with usable prices; comparing with the table …"
    assert "synced 1 models: 1 new, 0 changed, 0 unchanged" in lines[-1]
    [price] = versions("openai/gpt-4o-mini")
    assert price.enabled is False  # an operator decides what they sell
    assert price.source == "sync_prices"
    assert price.prompt == Decimal("0.15")
    assert price.completion == Decimal("0.6")
    assert price.reasoning == Decimal("0.6")
    assert price.cache_read == Decimal("0.0375")  # "0.0000000375" per token, exactly
    assert price.cache_write == Decimal("0.19")
    assert price.request_fee == 500_000  # $0.0005 in nanodollars
    assert price.context_length == 128000
    # The hold assumes the configured default, not the model's 16k maximum …
    assert price.default_max_output == 4096


def test_a_model_that_cannot_write_the_default_output_holds_for_its_own_maximum(openrouter, db):
    openrouter.serve([model("small/one", max_completion_tokens=1024), {**model("nomax/one"), "top_provider": {}}])

    sync(openrouter)

    assert versions("small/one")[0].default_max_output == 1024
    assert versions("nomax/one")[0].default_max_output == 4096


def test_enable_new_puts_new_models_on_sale(openrouter, db):
    openrouter.serve([model("acme/a")])

    sync(openrouter, "--enable-new")

    assert versions("acme/a")[0].enabled is True


def test_a_second_run_with_the_same_prices_writes_nothing(openrouter, db):
    openrouter.serve([model("acme/a"), model("acme/b", prompt="0.0000000375")])
    sync(openrouter)
    before = list(ModelPrice.objects.values_list("pk", "effective_from"))

    out, _ = sync(openrouter)

    assert "synced 2 models: 0 new, 0 changed, 2 unchanged" in out
    assert list(ModelPrice.objects.values_list("pk", "effective_from")) == before


def test_a_changed_price_adds_a_version_and_keeps_the_old_one_and_the_operators_choices(openrouter, db):
    openrouter.serve([model("acme/a", prompt="0.000001"), model("acme/b")])
    sync(openrouter)
    old = versions("acme/a")[0]
    operator_choices = {"enabled": True, "markup": Decimal("0.3"), "min_charge": 10, "default_max_output": 9}
    ModelPrice.objects.filter(pk=old.pk).update(**operator_choices)
    old.refresh_from_db()

    openrouter.serve([model("acme/a", prompt="0.000002"), model("acme/b")])
    out, _ = sync(openrouter, verbosity=2)

    assert "synced 2 models: 0 new, 1 changed, 1 unchanged" in out
    assert "changed   acme/a  (prompt)" in out
    assert "unchanged acme/b" in out
    first, second = versions("acme/a")
    assert first.pk == old.pk and first.prompt == Decimal("1") and first.effective_from == old.effective_from
    assert second.prompt == Decimal("2") and second.effective_from > first.effective_from
    # Markup, minimum charge, availability and the hold size are the operator's: carried over.
    assert (second.enabled, second.markup, second.min_charge, second.default_max_output) == (
        True,
        Decimal("0.3"),
        10,
        9,
    )


def test_models_that_vanish_upstream_are_kept_and_only_disabled_when_asked(openrouter, db):
    openrouter.serve([model("acme/a"), model("acme/gone")])
    sync(openrouter, "--enable-new")
    openrouter.serve([model("acme/a")])

    out, _ = sync(openrouter)
    assert versions("acme/gone")[0].enabled is True
    assert "disabled" not in out

    out, _ = sync(openrouter, "--disable-missing", verbosity=2)
    assert "1 unchanged, 1 disabled" in out
    assert "disabled  acme/gone" in out
    [gone] = versions("acme/gone")
    assert gone.enabled is False  # still there for the usage records that point at it
    assert versions("acme/a")[0].enabled is True


def test_garbage_prices_skip_that_model_with_a_warning_and_sync_the_rest(openrouter, db):
    openrouter.serve(
        [
            model("openrouter/auto", prompt="-1", completion="-1"),  # OpenRouter's router has no fixed price
            model("bad/text", prompt="cheap"),
            model("bad/null", prompt=None),
            model("bad/bool", completion=True),
            model("bad/nan", completion="NaN"),
            model("bad/tiny", prompt="0.0000000000000000001"),  # finer than the table keeps
            {"pricing": {"prompt": "0"}},
            "not an object",
            model("good/one"),
        ]
    )

    out, err = sync(openrouter)

    assert "synced 1 models: 1 new, 0 changed, 0 unchanged (8 skipped)" in out
    assert list(ModelPrice.objects.values_list("model", flat=True)) == ["good/one"]
    for name in ("openrouter/auto", "bad/text", "bad/null", "bad/bool", "bad/nan", "bad/tiny", "no usable id"):
        assert name in err


def test_a_json_number_price_is_read_as_its_exact_decimal_literal_not_a_float(openrouter, db):
    openrouter.body = b'{"data": [{"id": "num/one", "pricing": {"prompt": 0.0000001, "completion": 3e-7}}]}'

    sync(openrouter)

    price = ModelPrice.objects.get()
    assert (price.prompt, price.completion) == (Decimal("0.1"), Decimal("0.3"))


def test_it_sends_the_upstream_key_and_never_prints_it(openrouter, db):
    openrouter.serve([model("acme/a")])

    out, err = sync(openrouter, verbosity=2)

    assert openrouter.seen_headers[0]["Authorization"] == "Bearer sk-or-secret-test-key"
    assert "sk-or-secret" not in out + err


def test_a_dry_run_reports_and_writes_nothing(openrouter, db):
    openrouter.serve([model("acme/a")])

    out, _ = sync(openrouter, "--dry-run")

    assert "dry run, nothing written: synced 1 models: 1 new" in out
    assert not ModelPrice.objects.exists()


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (500, b'{"error": {"message": "down"}}', "answered HTTP 500"),
        (401, b'{"error": {"message": "no"}}', "answered HTTP 401"),
        (200, b"<html>maintenance</html>", "did not send JSON"),
        (200, b'{"models": []}', 'without a "data" list'),
        (200, b'{"data": [{"id": "x", "pricing": {"prompt": "free"}}]}', "none had usable prices"),
    ],
)
def test_a_broken_price_list_is_a_clear_error_and_changes_nothing(openrouter, db, status, body, message):
    ModelPrice.objects.create(model="acme/kept", prompt=Decimal("1"))
    openrouter.status, openrouter.body = status, body

    with pytest.raises(CommandError, match=message) as caught:
        sync(openrouter, "--disable-missing")

    assert "sk-or-secret" not in str(caught.value)
    assert ModelPrice.objects.get().enabled is True


def test_an_unreachable_upstream_is_a_clear_error(openrouter, db):
    url = openrouter.url
    openrouter.close()

    with pytest.raises(CommandError, match="could not fetch"):
        call_command("sync_prices", "--url", url, "--timeout", "2", stdout=StringIO())


def test_a_price_version_is_never_saved_with_an_impossible_rate(db):
    from proxy.prices import PriceError, price_version_create

    assert price_version_create(model="acme/defaults", source="test").prompt == 0
    for bad in (Decimal("-1"), Decimal("1e-13"), Decimal("Infinity"), 0.5):
        with pytest.raises(PriceError):
            price_version_create(model="acme/bad", source="test", prompt=bad)
    assert not ModelPrice.objects.filter(model="acme/bad").exists()


def test_an_https_price_list_behind_a_private_ca_is_read_once_upstream_ca_bundle_trusts_it(settings, db, tmp_path):
    cert, key = self_signed_certificate(str(tmp_path))
    fake = FakeOpenRouter(tls=(cert, key))
    try:
        fake.serve([model("local/llama")])
        with pytest.raises(CommandError, match="ConnectError"):
            sync(fake)
        settings.UPSTREAM_CA_BUNDLE = cert
        out, _ = sync(fake)
        assert "1 new" in out and versions("local/llama")
    finally:
        fake.close()
