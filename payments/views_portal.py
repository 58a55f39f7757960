"""Portal pages for buying credit: the pack list (POST starts a hosted checkout), one pack's
checkout by its own address (``/topup/<slug>``), and the page the provider sends the buyer back
to, which shows the balance and updates it live when the webhook credits the wallet."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from wallet.selectors import wallet_summary

from .providers import lemonsqueezy, stripe_provider
from .providers.errors import ProviderError
from .selectors import pack_list
from .services import ProviderNotConfigured, UnknownPack, checkout_create


def _page(request, *, error: str = "", status: int = 200):
    context = {
        "packs": pack_list(),
        "wallet": wallet_summary(user=request.user),
        "payments_configured": lemonsqueezy.is_configured() or stripe_provider.is_configured(),
        "error": error,
    }
    return render(request, "portal/topup.html", context, status=status)


def _checkout(request, pack_slug: str, *, unknown_status: int):
    """Start the pack's hosted checkout and send the browser there, or show the packs and why not."""
    try:
        # The service picks the provider configured for this pack (Lemon Squeezy first).
        checkout = checkout_create(user=request.user, pack_slug=pack_slug)
    except UnknownPack:
        return _page(request, error="That credit pack is not on sale.", status=unknown_status)
    except ProviderNotConfigured as exc:
        return _page(request, error=f"{exc} Please contact the operator.", status=503)
    except ProviderError:
        return _page(
            request, error="The payment processor could not start a checkout. Please try again shortly.", status=502
        )
    return redirect(checkout.url)


@never_cache
@login_required
def topup(request):
    if request.method != "POST":
        return _page(request)
    return _checkout(request, request.POST.get("pack", ""), unknown_status=400)


@never_cache
@require_GET
@login_required
def topup_pack(request, slug: str):
    """``/topup/<pack slug>``: straight to that pack's checkout. Where an app's "Top up" button
    lands through a one-time web link, so the user goes from the app to paying in one step."""
    return _checkout(request, slug, unknown_status=404)


@never_cache
@login_required
def topup_done(request):
    return render(request, "portal/topup_done.html", {"wallet": wallet_summary(user=request.user)})
