"""manage.py reconcile_holds: expired holds are settled from the upstream's generation lookup,
at an estimate, or released — never dropped."""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

import io
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.utils import timezone

from core.pricing import Rates, charge_nanos, cost_usd
from core.usage import Usage
from proxy.models import CostSource, UsageRecord, UsageStatus
from proxy.services import Outcome, RequestMeta, arequest_begin, arequest_settle
from tests.fake_upstream import MODEL, Reply, fake_upstream, fake_upstream_server, price, run_async  # noqa: F401
from wallet.models import Entry, Hold, HoldStatus, Wallet
from wallet.services import hold_create

# Requests are begun through the proxy's own (async) services, whose connections see only what
# the test committed.
pytestmark = pytest.mark.django_db(transaction=True)


def begin(user, request_id: str, *, expired: bool = True):
    meta = RequestMeta(request_id=request_id, user=user, api_key=None, endpoint="chat.completions", model=MODEL)
    begun = run_async(arequest_begin, meta=meta, prompt_chars=4000, requested_output=100)
    if expired:
        Hold.objects.filter(pk=begun.hold.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    return begun


def reconcile() -> str:
    out = io.StringIO()
    call_command("reconcile_holds", "--backoff", "0.01", stdout=out)
    return out.getvalue()


def test_an_expired_hold_with_a_generation_is_charged_what_openrouter_reports(fake_upstream, alice, price):
    begin(alice, "req_gen")
    UsageRecord.objects.filter(request_id="req_gen").update(generation_id="gen-77")
    found = {"data": {"id": "gen-77", "total_cost": 0.002, "native_tokens_prompt": 900, "native_tokens_completion": 80}}
    fake_upstream.script("generation", Reply(404, {"error": {"code": 404}}), Reply(404, {}), Reply(body=found))
    output = reconcile()
    assert "req_gen: settled from the upstream's generation lookup" in output
    assert len(fake_upstream.calls("generation")) == 3
    assert fake_upstream.calls("generation")[0].path.endswith("/generation?id=gen-77")
    record = UsageRecord.objects.get(request_id="req_gen")
    assert (record.cost_source, record.charge, record.estimated) == (CostSource.RECONCILED, 2_400_000, False)
    assert (record.prompt_tokens, record.completion_tokens, record.status) == (900, 80, UsageStatus.OK)
    assert Hold.objects.get().status == HoldStatus.SETTLED
    assert Wallet.objects.get(user=alice).balance == 10_000_000_000 - 2_400_000


def test_a_byok_generation_is_charged_the_providers_cost_on_top_of_openrouters_fee(fake_upstream, alice, price):
    begin(alice, "req_byok")
    UsageRecord.objects.filter(request_id="req_byok").update(generation_id="gen-byok")
    found = {"data": {"id": "gen-byok", "total_cost": 0.0001, "upstream_inference_cost": 0.002, "is_byok": True}}
    fake_upstream.script("generation", Reply(body=found))
    assert "req_byok: settled from the upstream's generation lookup" in reconcile()
    record = UsageRecord.objects.get(request_id="req_byok")
    assert (record.upstream_cost, record.charge) == (Decimal("0.0021"), 2_520_000)
    assert Wallet.objects.get(user=alice).balance == 10_000_000_000 - 2_520_000


def test_an_expired_hold_nobody_can_look_up_is_charged_its_prompt_estimate(fake_upstream, alice, price):
    begin(alice, "req_est")
    assert "req_est: settled at an estimate of its prompt" in reconcile()
    record = UsageRecord.objects.get(request_id="req_est")
    expected = charge_nanos(cost_usd(Rates(prompt=Decimal("0.15")), Usage(prompt_tokens=1000)), markup=Decimal("0.2"))
    assert (record.cost_source, record.estimated, record.charge) == (CostSource.ESTIMATE, True, expected)
    assert Entry.objects.get(kind="usage").amount == -expected
    assert not fake_upstream.requests


def test_a_hold_without_a_usage_record_is_released_and_live_holds_are_left_alone(fake_upstream, alice, price):
    orphan = hold_create(wallet=alice.wallet, amount=5_000, request_id="req_orphan", ttl_seconds=30)
    Hold.objects.filter(pk=orphan.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    begin(alice, "req_live", expired=False)
    output = reconcile()
    assert "req_orphan: released (no usage record)" in output and "reconciled 1 expired hold(s)" in output
    assert Hold.objects.get(request_id="req_orphan").status == HoldStatus.RELEASED
    assert Hold.objects.get(request_id="req_live").status == HoldStatus.ACTIVE
    assert not Entry.objects.filter(kind="usage").exists()


def settle_estimate(user, request_id: str, generation_id: str, *, seconds_ago: int = 60) -> UsageRecord:
    """A streamed request whose client left before usage arrived: settled at a marked estimate."""
    begun = begin(user, request_id, expired=False)
    outcome = Outcome(
        status=UsageStatus.CANCELLED, generation_id=generation_id, output_chars=400, trust_upstream_cost=True
    )
    record = run_async(arequest_settle, begun=begun, outcome=outcome)
    UsageRecord.objects.filter(pk=record.pk).update(settled_at=timezone.now() - timedelta(seconds=seconds_ago))
    assert (record.cost_source, record.estimated) == (CostSource.ESTIMATE, True)
    return record


@pytest.mark.parametrize("total_cost", [0.002, 0.0001])  # the estimate was low / high
def test_a_settled_estimate_is_corrected_to_what_openrouter_reports_once(fake_upstream, alice, price, total_cost):
    estimate = settle_estimate(alice, "req_cut", "gen-cut")
    found = {"data": {"id": "gen-cut", "total_cost": total_cost, "native_tokens_prompt": 1000, "cancelled": True}}
    fake_upstream.script("generation", Reply(body=found))
    output = reconcile()
    actual = charge_nanos(Decimal(str(total_cost)), markup=Decimal("0.2"))
    assert f"req_cut: estimate {estimate.charge} replaced by {actual} nanodollars" in output
    record = UsageRecord.objects.get(request_id="req_cut")
    assert (record.cost_source, record.estimated, record.charge) == (CostSource.RECONCILED, False, actual)
    assert Wallet.objects.get(user=alice).balance == 10_000_000_000 - actual  # estimate + difference = actual
    assert Entry.objects.filter(reference="req_cut").count() == 2
    assert "req_cut" not in reconcile()  # corrected once; the next run leaves it alone
    assert len(fake_upstream.calls("generation")) == 1


def test_an_estimate_is_kept_while_the_lookup_is_not_ready_or_too_young(fake_upstream, alice, price):
    settle_estimate(alice, "req_young", "gen-young", seconds_ago=0)
    old = settle_estimate(alice, "req_late", "gen-late")
    fake_upstream.script("generation", *[Reply(404, {"error": {"code": 404}})] * 4)
    output = reconcile()
    assert "req_young" not in output
    assert "req_late: generation gen-late not available upstream; estimate kept" in output
    record = UsageRecord.objects.get(request_id="req_late")
    assert (record.cost_source, record.charge) == (CostSource.ESTIMATE, old.charge)


def test_a_settlement_after_reconcile_closed_the_hold_leaves_its_charge_and_record_standing(
    fake_upstream, alice, price
):
    """Should a running request's hold ever be reconciled first (its progress writes failed for
    HOLD_TTL), the late settlement changes nothing: the ledger and the record keep agreeing."""
    begun = begin(alice, "req_late")
    assert "req_late: settled at an estimate" in reconcile()
    reconciled = UsageRecord.objects.get(request_id="req_late")
    outcome = Outcome(usage=Usage(prompt_tokens=5000, completion_tokens=5000), upstream_model=MODEL)
    record = run_async(arequest_settle, begun=begun, outcome=outcome)
    assert record.charge == reconciled.charge == -Entry.objects.get(kind="usage").amount
    stored = UsageRecord.objects.get(request_id="req_late")
    assert (stored.charge, stored.cost_source, stored.completion_tokens) == (
        reconciled.charge,
        CostSource.ESTIMATE,
        reconciled.completion_tokens,
    )
    assert Wallet.objects.get(user=alice).balance == 10_000_000_000 - reconciled.charge
