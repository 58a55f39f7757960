"""Portal pages for apps: approve a browser sign-in (/device), list and sign out signed-in apps
(/apps), and the landing of one-time web links (/auth/link/<token>)."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from .device import (
    UserCodeNotFound,
    device_authorization_approve,
    device_authorization_deny,
    device_authorization_pending,
    user_code_display,
)
from .forms import DeviceCodeForm
from .selectors import token_family_get, token_family_list
from .services import token_family_revoke
from .throttles_device import UserCodeGuessThrottle
from .weblinks import WebLinkInvalid, web_link_redeem

UNKNOWN_CODE = "That code is not valid: it may have expired or been used already. Check the code your app shows now."
THROTTLED = "Too many wrong codes. Please wait a while and try again."
_DECIDE = {"approve": device_authorization_approve, "deny": device_authorization_deny}


@never_cache
@login_required
def device(request):
    """GET: the code form (pre-filled from ``?code=``). POST ``code``: the app's name and the code
    with Approve / Deny. POST ``code`` + ``decision``: decide. Every wrong code counts against the
    guessing throttle, and while it is full no code is looked up at all."""
    if request.method != "POST":
        form = DeviceCodeForm(initial={"code": request.GET.get("code", "")[:20]})
        return render(request, "portal/device.html", {"form": form})
    form = DeviceCodeForm(request.POST)
    if not form.is_valid():
        return render(request, "portal/device.html", {"form": form}, status=400)
    throttle = UserCodeGuessThrottle(request)
    if throttle.wait() is not None:
        return render(request, "portal/device.html", {"form": form, "throttled": THROTTLED}, status=429)
    code = form.cleaned_data["code"]
    decide = _DECIDE.get(request.POST.get("decision", ""))
    try:
        if decide is None:
            authorization = device_authorization_pending(user_code=code)
        else:
            authorization = decide(user_code=code, user=request.user)
    except UserCodeNotFound:
        throttle.record_failure()
        form.add_error("code", UNKNOWN_CODE)
        return render(request, "portal/device.html", {"form": form}, status=400)
    context = {"authorization": authorization, "code": user_code_display(code), "decided": decide is not None}
    return render(request, "portal/device.html", context)


@never_cache
@login_required
def apps(request):
    return render(request, "portal/apps.html", {"sessions": token_family_list(user=request.user)})


@require_POST
@login_required
def app_sign_out(request, family_id: str):
    family = token_family_get(user=request.user, family_id=family_id)  # 404 for anyone else's
    token_family_revoke(family=family, reason="signed_out")
    messages.success(request, f"{family.name} is signed out. It must sign in again to use your account.")
    return redirect("portal:apps")


@never_cache
@require_GET  # not HEAD: a link checker peeking at the URL must not use it up
def web_link(request, token: str):
    try:
        link = web_link_redeem(token=token)
    except WebLinkInvalid:
        return render(request, "portal/link_invalid.html", status=400)
    login(request, link.user, backend="django.contrib.auth.backends.ModelBackend")
    return redirect(link.next)
