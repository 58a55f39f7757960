"""The unsubscribe link every notification email carries: no sign-in, the signed token is the key.

GET shows what the link turns off and a one-click button; POST turns it off (idempotent) — the
button, and mail clients' own unsubscribe buttons (RFC 8058: ``List-Unsubscribe-Post:
List-Unsubscribe=One-Click`` makes them POST to the same URL, without a CSRF token or cookies).
GET never unsubscribes: mail scanners fetch links to check them.
"""

from __future__ import annotations

from django.db import models
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from . import emails, services
from .models import Preference


def _label(field: str) -> str:
    found = Preference._meta.get_field(field)
    if not isinstance(found, models.Field):  # the preferences are Preference's own booleans
        raise LookupError(f"{field!r} is not a field of Preference")
    return str(found.verbose_name)


@csrf_exempt  # the signed token authorises the one thing this does; mail clients POST without a CSRF token
@never_cache
@require_http_methods(["GET", "POST"])
def unsubscribe(request, token: str):
    if request.method == "POST":
        done = services.unsubscribe(token=token)
        if done is None:
            return render(request, "notify/unsubscribe.html", {"invalid": True}, status=400)
        _user, field = done
        return render(request, "notify/unsubscribe.html", {"done": True, "label": _label(field)})
    found = emails.unsubscribe_token_read(token)
    if found is None:
        return render(request, "notify/unsubscribe.html", {"invalid": True}, status=400)
    user, field = found
    context = {"label": _label(field), "email": user.email, "token": token}
    return render(request, "notify/unsubscribe.html", context)
