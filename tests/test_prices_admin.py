"""The price table and usage log in the Django admin: changing a price never rewrites history."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from proxy.models import ModelPrice, UsageRecord, UsageStatus

CHANGELIST = "/admin/proxy/modelprice/"


@pytest.fixture
def staff_client(client, staff):
    client.force_login(staff)
    return client


@pytest.fixture
def gpt(db):
    return ModelPrice.objects.create(
        model="openai/gpt-4o-mini",
        name="GPT-4o mini",
        prompt=Decimal("0.15"),
        completion=Decimal("0.6"),
        request_fee=0,
        effective_from=timezone.now() - timedelta(days=3),
        source="seed",
    )


def form_data(price: ModelPrice, **changes) -> dict:
    data = {
        "name": price.name,
        "prompt": str(price.prompt),
        "completion": str(price.completion),
        "reasoning": str(price.reasoning),
        "cache_read": str(price.cache_read),
        "cache_write": str(price.cache_write),
        "request_fee_usd": f"{Decimal(price.request_fee).scaleb(-9):f}",
        "min_charge_usd": f"{Decimal(price.min_charge).scaleb(-9):f}",
        "markup": "" if price.markup is None else str(price.markup),
        "default_max_output": str(price.default_max_output),
        "context_length": "" if price.context_length is None else str(price.context_length),
        "_save": "Save",
    }
    if price.enabled:
        data["enabled"] = "on"
    if price.is_demo:
        data["is_demo"] = "on"
    for name, value in changes.items():
        if value is None:
            data.pop(name, None)
        else:
            data[name] = value
    return data


def change(staff_client, price, **changes):
    return staff_client.post(f"{CHANGELIST}{price.pk}/change/", form_data(price, **changes))


def test_changing_a_price_adds_a_version_and_leaves_the_old_row_and_its_usage_alone(staff_client, gpt, alice):
    charged = UsageRecord.objects.create(
        request_id="req_old", user=alice, model=gpt.model, price=gpt, status=UsageStatus.OK, charge=180
    )

    response = change(staff_client, gpt, prompt="0.20", request_fee_usd="0.0005", markup="0.25")

    assert response.status_code == 302, response.content.decode()[:2000]
    old, new = ModelPrice.objects.filter(model=gpt.model).order_by("effective_from")
    assert old.pk == gpt.pk
    assert (old.prompt, old.request_fee, old.markup, old.effective_from) == (
        Decimal("0.15"),
        0,
        None,
        gpt.effective_from,
    )
    assert (new.prompt, new.completion, new.request_fee, new.markup) == (
        Decimal("0.2"),
        Decimal("0.6"),
        500_000,
        Decimal("0.25"),
    )
    assert new.source == "admin"
    assert new.effective_from > old.effective_from
    charged.refresh_from_db()
    assert charged.price_id == old.pk


def test_saving_without_a_change_adds_no_version(staff_client, gpt):
    response = change(staff_client, gpt)

    assert response.status_code == 302
    assert ModelPrice.objects.filter(model=gpt.model).count() == 1


def test_switching_only_availability_edits_the_current_version_in_place(staff_client, gpt):
    response = change(staff_client, gpt, enabled=None)

    assert response.status_code == 302
    [only] = ModelPrice.objects.filter(model=gpt.model)
    assert only.pk == gpt.pk and only.enabled is False


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("request_fee_usd", "0.0000000001"),  # finer than a nanodollar
        ("request_fee_usd", "a dime"),
        ("min_charge_usd", "-0.01"),
        ("prompt", "-1"),
        ("markup", "-0.1"),
        ("overrun_cap_usd", "-0.05"),
        ("overrun_cap_usd", "lots"),
        ("image_tokens", "many"),
        ("file_tokens", "-5"),
    ],
)
def test_a_bad_price_is_a_form_error_and_saves_nothing(staff_client, gpt, field, value):
    response = change(staff_client, gpt, **{field: value})

    assert response.status_code == 200
    assert response.context["adminform"].form.errors
    assert ModelPrice.objects.filter(model=gpt.model).count() == 1


def test_staff_set_a_models_part_allowances_and_overrun_cap_as_a_new_version(staff_client, gpt):
    response = change(staff_client, gpt, image_tokens="30000", image_low_tokens="3000", overrun_cap_usd="0.02")
    assert response.status_code == 302
    current = ModelPrice.objects.filter(model=gpt.model).order_by("-effective_from").first()
    assert current.pk != gpt.pk
    assert (current.image_tokens, current.image_low_tokens, current.audio_tokens) == (30_000, 3_000, None)
    assert current.overrun_cap == 20_000_000
    page = staff_client.get(f"{CHANGELIST}{current.pk}/change/").content.decode()
    assert "Honest holds" in page and 'value="0.020000000"' in page


def test_the_change_page_shows_every_version_and_labels_rates_per_million(staff_client, gpt):
    change(staff_client, gpt, prompt="0.2")
    change(staff_client, ModelPrice.objects.get(model=gpt.model, prompt=Decimal("0.2")), prompt="0.25")
    current = ModelPrice.objects.filter(model=gpt.model).order_by("-effective_from").first()

    page = staff_client.get(f"{CHANGELIST}{current.pk}/change/").content.decode()

    assert "USD per 1M tokens" in page
    assert "0.000000000" in page  # the request fee, shown as USD
    for version in ModelPrice.objects.filter(model=gpt.model):
        assert f"/admin/proxy/modelprice/{version.pk}/change/" in page
        assert f"{version.effective_from:%Y-%m-%d %H:%M:%S}" in page


def test_a_superseded_version_is_read_only(staff_client, gpt):
    change(staff_client, gpt, prompt="0.2")

    page = staff_client.get(f"{CHANGELIST}{gpt.pk}/change/")
    assert page.status_code == 200
    assert 'name="_save"' not in page.content.decode()

    response = change(staff_client, gpt, prompt="9")
    assert response.status_code == 403
    assert not ModelPrice.objects.filter(prompt=Decimal("9")).exists()


def test_price_rows_cannot_be_deleted(staff_client, gpt):
    response = staff_client.post(f"{CHANGELIST}{gpt.pk}/delete/", {"post": "yes"})

    assert response.status_code == 403
    assert ModelPrice.objects.filter(pk=gpt.pk).exists()


def test_bulk_disable_and_enable_switch_availability_without_new_versions(staff_client, gpt):
    old = ModelPrice.objects.create(model="acme/big", effective_from=timezone.now() - timedelta(days=9))
    current = ModelPrice.objects.create(model="acme/big", effective_from=timezone.now() - timedelta(days=1))

    response = staff_client.post(
        CHANGELIST, {"action": "disable_models", "_selected_action": [gpt.pk, old.pk], "index": 0}
    )

    assert response.status_code == 302
    assert ModelPrice.objects.count() == 3
    states = dict(ModelPrice.objects.values_list("pk", "enabled"))
    # The current version of each selected model is switched; history keeps what it said then.
    assert states == {gpt.pk: False, old.pk: True, current.pk: False}

    staff_client.post(CHANGELIST, {"action": "enable_models", "_selected_action": [current.pk], "index": 0})
    assert ModelPrice.objects.get(pk=current.pk).enabled is True
    assert ModelPrice.objects.get(pk=gpt.pk).enabled is False


def test_adding_a_model_stores_fees_as_nanodollars_and_refuses_a_model_that_already_has_prices(staff_client, gpt):
    blank = ModelPrice(model="acme/new", prompt=Decimal("1.25"), completion=Decimal("5"))
    data = form_data(blank, model="acme/new", request_fee_usd="0.001", min_charge_usd="0.00001")

    response = staff_client.post(f"{CHANGELIST}add/", data)

    assert response.status_code == 302, response.content.decode()[:2000]
    added = ModelPrice.objects.get(model="acme/new")
    assert (added.prompt, added.request_fee, added.min_charge, added.source) == (
        Decimal("1.25"),
        1_000_000,
        10_000,
        "admin",
    )

    response = staff_client.post(f"{CHANGELIST}add/", {**data, "model": gpt.model})
    assert response.status_code == 200
    assert "already has prices" in response.content.decode()
    assert ModelPrice.objects.filter(model=gpt.model).count() == 1


def test_the_price_list_filters_superseded_versions(staff_client, gpt):
    change(staff_client, gpt, prompt="0.2")

    current = staff_client.get(f"{CHANGELIST}?version=current")
    superseded = staff_client.get(f"{CHANGELIST}?version=superseded")

    assert [row.pk for row in current.context["cl"].result_list] == [ModelPrice.objects.exclude(pk=gpt.pk).get().pk]
    assert [row.pk for row in superseded.context["cl"].result_list] == [gpt.pk]
    assert "superseded" in superseded.content.decode()


def test_usage_records_are_listed_searchable_and_read_only(staff_client, alice, bob):
    mine = UsageRecord.objects.create(
        request_id="req_alice_1", user=alice, model="acme/big", status=UsageStatus.OK, charge=1_234_567
    )
    UsageRecord.objects.create(request_id="req_bob_1", user=bob, model="acme/big", status=UsageStatus.CANCELLED)
    base = "/admin/proxy/usagerecord/"

    listing = staff_client.get(base)
    assert listing.status_code == 200
    assert "0.001234567" in listing.content.decode()

    for query in ("q=alice@example.com", "q=req_alice_1", "status__exact=ok", "estimated__exact=0&stream__exact=0"):
        response = staff_client.get(f"{base}?{query}")
        assert response.status_code == 200
        pks = [row.pk for row in response.context["cl"].result_list]
        assert mine.pk in pks, query
        if query.startswith("q=") or query.startswith("status"):
            assert len(pks) == 1, query

    assert staff_client.get(f"{base}add/").status_code == 403
    detail = staff_client.get(f"{base}{mine.pk}/change/")
    assert detail.status_code == 200
    assert 'name="_save"' not in detail.content.decode()
    assert staff_client.post(f"{base}{mine.pk}/change/", {"charge": "0"}).status_code == 403
    assert staff_client.post(f"{base}{mine.pk}/delete/", {"post": "yes"}).status_code == 403
    mine.refresh_from_db()
    assert mine.charge == 1_234_567
