"""``infra.adb.new`` builds the unsaved usage record and hold of every proxied request without
``Model.__init__``: what it builds must be what ``Model(**values)`` builds, field by field, and
save the same row."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db.models import signals
from django.utils import timezone

from accounts.models import User
from infra import adb
from proxy.models import UsageRecord, UsageStatus
from wallet.models import Hold
from wallet.services import wallet_get_or_create

pytestmark = pytest.mark.django_db


def _fields(instance) -> dict:
    return {name: value for name, value in vars(instance).items() if name != "_state"}


def _record_values(user, **extra) -> dict:
    return {
        "request_id": "req_1",
        "user": user,
        "api_key": None,
        "organization": None,
        "endpoint": "chat.completions",
        "model": "openai/gpt-4o-mini",
        "stream": True,
        "run": "r",
        "agent": "a",
        "tool": "t",
        "status": UsageStatus.PENDING,
        "prompt_tokens": 12,
        "hold_amount": 5_000,
        **extra,
    }


def test_a_usage_record_is_what_the_orm_would_build_and_saves_the_same_row():
    user = User.objects.create_user(email="new@example.com", password="x" * 12)
    now = timezone.now()
    values = _record_values(user, created_at=now)
    built, expected = adb.new(UsageRecord, **values), UsageRecord(**values)
    assert _fields(built) == _fields(expected)
    # The related instance is cached as the ORM caches it: reading it costs no query.
    assert built._state.fields_cache == expected._state.fields_cache
    assert built._state.adding and built._state.db is None
    assert built.user is user and built.api_key is None
    built.save(force_insert=True)
    expected.request_id = "req_2"
    expected.save(force_insert=True)
    saved, other = UsageRecord.objects.get(pk=built.pk), UsageRecord.objects.get(pk=expected.pk)
    assert {**_fields(saved), "id": None, "request_id": ""} == {**_fields(other), "id": None, "request_id": ""}


def test_callable_defaults_are_called_for_each_instance_and_only_when_not_given():
    user = User.objects.create_user(email="defaults@example.com", password="x" * 12)
    first, second = adb.new(UsageRecord, **_record_values(user)), adb.new(UsageRecord, **_record_values(user))
    assert first.prices == {} and first.prices is not second.prices  # default=dict, not one shared dict
    before = timezone.now()
    assert before - timedelta(seconds=5) < first.created_at <= timezone.now()
    given = before - timedelta(days=3)
    assert adb.new(UsageRecord, **_record_values(user, created_at=given)).created_at == given


def test_a_hold_by_field_or_attribute_name_and_an_unknown_name_refused():
    user = User.objects.create_user(email="hold@example.com", password="x" * 12)
    wallet = wallet_get_or_create(user=user)
    now = timezone.now()
    values = {"amount": 7, "request_id": "req_h", "created_at": now, "expires_at": now}
    by_field, by_attname = adb.new(Hold, wallet=wallet, **values), adb.new(Hold, wallet_id=wallet.pk, **values)
    assert _fields(by_field) == _fields(Hold(wallet=wallet, **values)) == _fields(by_attname)
    assert by_field.wallet is wallet
    with pytest.raises(TypeError, match="no field named 'wallett'"):
        adb.new(Hold, wallett=wallet, **values)


def test_a_row_loaded_is_what_the_orm_loads_from_it():
    user = User.objects.create_user(email="load@example.com", password="x" * 12)
    wallet = wallet_get_or_create(user=user)
    now = timezone.now()
    Hold.objects.create(wallet=wallet, amount=9, request_id="req_l", created_at=now, expires_at=now)
    names = [field.attname for field in Hold._meta.concrete_fields]
    values = list(Hold.objects.values_list(*names).get())
    loaded, expected = adb.from_db(Hold, names, values), Hold.from_db("default", names, values)
    assert _fields(loaded) == _fields(expected)
    assert (loaded._state.adding, loaded._state.db) == (False, "default") == (expected._state.adding, "default")
    assert loaded.wallet == wallet  # related objects load as from any instance


def test_a_model_whose_init_signals_have_listeners_is_built_by_the_orm():
    calls = []

    def heard(sender, instance, **kwargs):
        calls.append(instance)

    signals.post_init.connect(heard, sender=Hold)
    try:
        now = timezone.now()
        built = adb.new(Hold, wallet_id=1, amount=1, request_id="r", created_at=now, expires_at=now)
        names = [field.attname for field in Hold._meta.concrete_fields]
        loaded = adb.from_db(Hold, names, [getattr(built, name) for name in names])
    finally:
        signals.post_init.disconnect(heard, sender=Hold)
    assert calls == [built, loaded]
