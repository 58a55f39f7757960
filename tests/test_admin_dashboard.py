"""The staff dashboard on the admin index: the figures, the period, and who may see them."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.contrib.auth.models import Permission
from django.core.management import CommandError, call_command
from django.db.models import F
from django.test import Client, RequestFactory
from django.utils import timezone

from backoffice import selectors as dashboard_selectors
from backoffice.dashboard import dashboard_context
from backoffice.models import LedgerCheckpoint
from payments.models import EventStatus, Payment, PaymentStatus, StaffAlert, WebhookEvent
from proxy.models import UsageRecord, UsageStatus
from tests.conftest import make_user
from wallet.models import Entry, Wallet
from wallet.services import hold_create, hold_settle, wallet_charge

NANOS = 10**9


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def figure(html: str, name: str) -> str:
    match = re.search(rf'data-figure="{name}"[^>]*>(.*?)</(?:strong|td|span)>', html, flags=re.S)
    assert match, f"no figure {name}"
    return re.sub(r"<[^>]+>", "", match.group(1)).strip()


def payment(n: int, *, gross: str, fee: str, refunded: str = "0", days_ago: int = 0, **fields) -> Payment:
    gross_n, fee_n = int(Decimal(gross) * NANOS), int(Decimal(fee) * NANOS)
    return Payment.objects.create(
        provider="lemonsqueezy",
        provider_payment_id=f"order-{n}",
        gross=gross_n,
        fee=fee_n,
        net=gross_n - fee_n,
        refunded_amount=int(Decimal(refunded) * NANOS),
        created_at=timezone.now() - timedelta(days=days_ago),
        **fields,
    )


def usage(user, request_id: str, *, cost: str, charge: str, model: str, days_ago: int = 0, tokens=(1000, 200)):
    return UsageRecord.objects.create(
        request_id=request_id,
        user=user,
        model=model,
        status=UsageStatus.OK,
        prompt_tokens=tokens[0],
        completion_tokens=tokens[1],
        upstream_cost=Decimal(cost),
        charge=int(Decimal(charge) * NANOS),
        created_at=timezone.now() - timedelta(days=days_ago),
    )


@pytest.fixture
def business(alice, bob):
    payment(1, gross="10.00", fee="1.00")
    payment(2, gross="25.00", fee="1.75", refunded="25.00", status=PaymentStatus.REFUNDED)
    payment(3, gross="10.00", fee="1.00", days_ago=40)  # outside 7 and 30 days, inside 90
    payment(4, gross="99.00", fee="0", test_mode=True)  # test-mode money is not revenue
    usage(alice, "r1", cost="1.000000000", charge="1.20", model="openai/gpt-4o-mini")
    usage(alice, "r2", cost="0.500000000", charge="0.60", model="anthropic/claude-sonnet-4", days_ago=2)
    usage(bob, "r3", cost="2.000000000", charge="2.40", model="openai/gpt-4o-mini", days_ago=20)
    # A settle overage takes carol below zero: the hold was for 1 ¢, the request cost 25 ¢.
    carol = make_user("carol@example.com", balance="0.01")
    hold = hold_create(wallet=carol.wallet, amount=10**7, request_id="over")
    hold_settle(hold=hold, amount=25 * 10**7)
    hold_create(wallet=Wallet.objects.get(user=alice), amount=3 * 10**8, request_id="in-flight")
    WebhookEvent.objects.create(
        provider="stripe", event_id="evt_1", event_type="x", body="{}", status=EventStatus.FAILED
    )
    WebhookEvent.objects.create(
        provider="stripe", event_id="evt_2", event_type="x", body="[]", status=EventStatus.REJECTED
    )
    StaffAlert.objects.create(kind="amount_mismatch", message="paid 9.99 for a 10.00 pack")
    StaffAlert.objects.create(kind="old", message="done", resolved=True)


def staff_client(staff) -> Client:
    client = Client()
    client.force_login(staff)
    return client


def test_staff_see_revenue_fees_refunds_cost_and_margins_for_the_period(staff, business):
    html = staff_client(staff).get("/admin/", {"period": "30"}).content.decode()
    assert figure(html, "revenue") == "$35.00"
    assert figure(html, "fees") == "$2.75"
    assert figure(html, "net") == "$32.25"
    assert figure(html, "refunds") == "$25.00"
    assert figure(html, "charged") == "$4.20"
    assert figure(html, "upstream_cost") == "$3.50"
    assert figure(html, "margin") == "$0.70"
    assert figure(html, "net_margin") == "$3.75"  # 32.25 − 25.00 − 3.50


def test_the_period_narrows_and_widens_every_money_and_usage_figure(staff, business):
    client = staff_client(staff)
    week = client.get("/admin/", {"period": "7"}).content.decode()
    assert figure(week, "charged") == "$1.80" and figure(week, "revenue") == "$35.00"
    quarter = client.get("/admin/", {"period": "90"}).content.decode()
    assert figure(quarter, "revenue") == "$45.00"
    assert 'aria-current="true" class="current">90 days' in quarter
    nonsense = client.get("/admin/", {"period": "3650"}).content.decode()
    assert "last 30 days" in nonsense


def test_this_month_counts_from_the_first_of_the_calendar_month(staff, alice):
    now = timezone.now()
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    usage(alice, "this_month", cost="0.000100000", charge="0.000139", model="m")
    before = usage(alice, "last_month", cost="1.000000000", charge="1.20", model="m")
    UsageRecord.objects.filter(pk=before.pk).update(created_at=start - timedelta(seconds=1))
    html = staff_client(staff).get("/admin/", {"period": "month"}).content.decode()
    assert "Business, this month" in html and 'aria-current="true" class="current">This month' in html
    assert figure(html, "charged") == "$0.000139"  # not "$0.00", and last month's $1.20 is out


def test_the_model_chart_shows_requests_beside_spend_and_spenders_link_to_their_staff_page(staff, business, alice):
    html = staff_client(staff).get("/admin/", {"period": "30"}).content.decode()
    by_model = html.split('data-chart="by-model"')[1].split("</figure>")[0]
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", by_model)
    assert texts[:4] == ["openai/gpt-4o-mini", "$3.60", "2 requests", "anthropic/claude-sonnet-4"]
    assert texts[4:6] == ["$0.60", "1 request"]
    spenders = html.split('data-chart="top-spenders"')[1].split("</figure>")[0]
    assert f'<a href="/admin/tokentill/users/{alice.pk}/"><text' in spenders


def test_usage_is_broken_down_by_day_and_by_model(staff, business):
    html = staff_client(staff).get("/admin/", {"period": "30"}).content.decode()
    today = timezone.now().date().isoformat()
    assert re.search(rf"<td>{today}</td><td>1</td><td>1,000</td><td>200</td>", html)
    by_model = html.split("Usage by model")[1]
    assert re.search(r"<td>openai/gpt-4o-mini</td><td>2</td><td>2,000</td><td>400</td>.*?\$3\.60", by_model, re.S)
    assert by_model.index("openai/gpt-4o-mini") < by_model.index("anthropic/claude-sonnet-4")


def test_operator_loss_beyond_overrun_caps_is_shown_for_the_period_and_by_model(staff, business, bob):
    # Billed $2.40 where the hold was 10 ¢ and the cap 50 ¢: 60 ¢ charged, $1.80 the operator's.
    record = usage(bob, "r4", cost="2.000000000", charge="0.60", model="vision/model", days_ago=60)
    UsageRecord.objects.filter(pk=record.pk).update(operator_loss=int(Decimal("1.80") * NANOS))
    client = staff_client(staff)
    assert figure(client.get("/admin/", {"period": "30"}).content.decode(), "operator_loss") == "$0.00"
    quarter = client.get("/admin/", {"period": "90"}).content.decode()
    assert figure(quarter, "operator_loss") == "$1.80"
    assert "1 request billed above hold + cap" in quarter
    by_model = quarter.split("Usage by model")[1]
    assert re.search(r"<td>vision/model</td>.*?\$1\.80</td></tr>", by_model, re.S)


def test_negative_wallets_holds_failed_webhooks_and_open_alerts_are_shown(staff, business):
    html = staff_client(staff).get("/admin/").content.decode()
    below_zero = html.split("Wallets below zero")[1].split("</table>")[0]
    assert "carol@example.com" in below_zero and "-$0.24" in below_zero and "alice" not in below_zero
    assert figure(html, "holds") == "1 ($0.30)"
    assert figure(html, "failed_webhooks") == "1"
    assert figure(html, "open_alerts") == "1"
    assert "1 failed webhook event" in html and "1 open staff alert" in html
    assert "1 rejected webhook event" in html and "?status__exact=rejected" in html


def test_the_ledger_panel_says_never_checked_until_verify_ledger_runs(staff, alice):
    html = staff_client(staff).get("/admin/").content.decode()
    assert figure(html, "ledger_balanced") == "not checked"
    assert figure(html, "ledger_last_run") == "never run"
    assert 'data-attention="ledger-stale"' in html and "verify_ledger --incremental</code> from cron" in html


def test_the_ledger_panel_shows_the_last_runs_verdict_and_never_checks_on_a_view(staff, alice):
    client = staff_client(staff)
    call_command("verify_ledger", stdout=StringIO())
    html = client.get("/admin/").content.decode()
    assert figure(html, "ledger_balanced") == "yes"
    assert figure(html, "ledger_last_run").endswith("ago), full")
    assert 'data-attention="ledger' not in html
    assert figure(html, "ledger_entries_total") == "10.000000000"  # the totals the run printed
    # A balance forged around the ledger: a page view does not check, so the verdict stands …
    Wallet.objects.filter(user=alice).update(balance=F("balance") + 1)
    assert figure(client.get("/admin/").content.decode(), "ledger_balanced") == "yes"
    # … until the next run finds it; then the page names it.
    with pytest.raises(CommandError):
        call_command("verify_ledger", "--incremental", stdout=StringIO(), stderr=StringIO())
    html = client.get("/admin/").content.decode()
    assert figure(html, "ledger_balanced") == "NO"
    assert figure(html, "ledger_last_run").endswith("incremental")
    assert 'data-attention="ledger"' in html
    assert "alice@example.com" in html.split('class="tt-discrepancies"')[1].split("</ul>")[0]


def test_a_stale_verdict_and_how_far_the_checkpoint_lags_are_shown(staff, alice):
    call_command("verify_ledger", stdout=StringIO())
    wallet_charge(wallet=alice.wallet, amount=NANOS, idempotency_key="after-the-run")
    LedgerCheckpoint.objects.update(last_run_at=timezone.now() - timedelta(hours=27))
    html = staff_client(staff).get("/admin/").content.decode()
    assert figure(html, "ledger_balanced") == "yes"  # the verdict, marked stale
    assert figure(html, "ledger_last_run").endswith("— stale")
    assert "stale (older than 26 hours): run <code>manage.py verify_ledger --incremental</code> from cron" in html
    checkpoint = figure(html, "ledger_checkpoint")
    through, newest, lag = (int(n.replace(",", "")) for n in re.findall(r"[\d,]+", checkpoint))
    assert newest == Entry.objects.latest("id").id and lag == newest - through >= 1


def test_the_dashboard_needs_one_query_per_panel(staff, business, django_assert_num_queries):
    request = RequestFactory().get("/admin/", {"period": "30"})
    request.user = staff
    # payments 1, usage totals 1, tool charges 1, by day 1, by model 1, negative wallets 1, holds 1,
    # webhooks + alerts 2, the last ledger check's verdict 2 (its row, the newest entry id),
    # outbound webhooks (endpoints, given-up deliveries, alerts, the failing endpoints' list) 4,
    # upstreams 1, the usage journal's oldest row 1, and the charts 13 (money per day: payments,
    # usage, tool charges; by model 1; top spenders and top organizations: tool charges, the
    # months the spender rows reach, each month's biggest spenders, their usage — each — and the
    # names of the users shown, as no tool charge named them) — however many rows there are (a
    # search that must read deeper adds two queries per round).
    with django_assert_num_queries(29):
        context = dashboard_context(request)
        list(context["negative_wallets"])
    assert context["money"].requests == 3
    assert dashboard_selectors.PERIODS == (7, 30, 90)


def test_people_who_are_not_staff_are_sent_to_the_admin_login(alice):
    client = Client()
    client.force_login(alice)
    response = client.get("/admin/")
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


def test_staff_without_access_to_payments_get_the_plain_admin_index(db):
    support = make_user("support@example.com", is_staff=True)
    support.user_permissions.add(Permission.objects.get(codename="view_user"))
    client = Client()
    client.force_login(support)
    html = client.get("/admin/").content.decode()
    assert "data-figure" not in html and "Revenue" not in html


def test_staff_with_view_payment_permission_see_the_dashboard(db):
    finance = make_user("finance@example.com", is_staff=True)
    finance.user_permissions.add(Permission.objects.get(codename="view_payment"))
    client = Client()
    client.force_login(finance)
    assert figure(client.get("/admin/").content.decode(), "revenue") == "$0.00"


# --- Tool charges are earnings too (issue 11, item 16) --------------------------------------------


def test_tool_charges_count_in_charged_and_margin_labelled_by_kind(staff, business, alice):
    wallet_charge(wallet=alice.wallet, amount=50 * 10**7, idempotency_key="charge:search-1", description="web search")
    wallet_charge(wallet=alice.wallet, amount=25 * 10**7, idempotency_key="charge:search-2", description="web search")

    html = staff_client(staff).get("/admin/", {"period": "30"}).content.decode()

    assert figure(html, "charged_usage") == "$4.20"
    assert figure(html, "charged_tools") == "$0.75"
    assert figure(html, "charged") == "$4.95"
    assert figure(html, "upstream_cost") == "$3.50"
    assert figure(html, "margin") == "$1.45"  # 4.95 − 3.50: a tool charge costs no upstream
    assert "tool charges" in html and "(2)" in html


# --- Flagged payments are not revenue (item 17) ---------------------------------------------------


@pytest.fixture
def flagged(business, alice):
    from payments.models import CreditPack
    from payments.seed import seed_packs

    seed_packs(CreditPack)
    found = payment(
        9,
        gross="20.00",
        fee="1.50",
        status=PaymentStatus.FLAGGED,
        flag_reason="paid $20.00 for the Starter pack, which costs $10.00",
        user=alice,
        pack=CreditPack.objects.get(slug="starter"),
    )
    StaffAlert.objects.create(kind="payment_flagged", message="flagged", payment=found)
    payment(10, gross="5.00", fee="0", refunded="5.00", status=PaymentStatus.FLAGGED)  # refunded: nothing held
    return found


def test_flagged_payments_are_listed_apart_and_not_counted_as_revenue(staff, flagged):
    html = staff_client(staff).get("/admin/", {"period": "30"}).content.decode()

    assert figure(html, "revenue") == "$35.00"
    assert figure(html, "fees") == "$2.75"
    assert figure(html, "net") == "$32.25"
    assert figure(html, "refunds") == "$25.00"
    assert figure(html, "flagged") == "$20.00"
    link = re.search(r'<a href="([^"]+)" data-figure-link="flagged">([^<]+)</a>', html)
    assert link and link.group(1) == "/admin/payments/payment/?status__exact=flagged"
    assert link.group(2) == "1 payment"
    listed = staff_client(staff).get(link.group(1)).content.decode()
    assert "order-9" in listed and "order-1<" not in listed


def test_crediting_a_flagged_payment_in_the_admin_makes_it_revenue(staff, flagged, alice):
    client = staff_client(staff)
    before = Wallet.objects.get(user=alice).balance

    response = client.post(
        "/admin/payments/payment/", {"action": "credit_flagged", "_selected_action": [flagged.pk]}, follow=True
    )

    assert "Credited 1 flagged payment(s)." in response.content.decode()
    flagged.refresh_from_db()
    assert (flagged.status, flagged.credit) == (PaymentStatus.PAID, 10 * NANOS)
    assert Wallet.objects.get(user=alice).balance == before + 10 * NANOS
    assert Entry.objects.get(idempotency_key=f"staff:payment:{flagged.pk}").metadata["staff"] == staff.email
    assert not StaffAlert.objects.filter(payment=flagged, resolved=False).exists()
    html = client.get("/admin/", {"period": "30"}).content.decode()
    assert figure(html, "revenue") == "$55.00"
    assert figure(html, "flagged") == "$0.00"

    again = client.post(
        "/admin/payments/payment/", {"action": "credit_flagged", "_selected_action": [flagged.pk]}, follow=True
    )
    assert "is not flagged" in again.content.decode()
    assert Wallet.objects.get(user=alice).balance == before + 10 * NANOS


def test_a_flagged_payment_without_a_user_or_pack_cannot_be_credited(staff, flagged):
    unknown = Payment.objects.get(provider_payment_id="order-10")

    response = staff_client(staff).post(
        "/admin/payments/payment/", {"action": "credit_flagged", "_selected_action": [unknown.pk]}, follow=True
    )

    assert "has no known user or pack" in response.content.decode()
    unknown.refresh_from_db()
    assert unknown.status == PaymentStatus.FLAGGED
