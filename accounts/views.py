"""Portal pages for the account: log in, sign up, log out, API keys, limits (session auth)."""

from __future__ import annotations

from django.contrib import admin, messages
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.db import IntegrityError
from django.shortcuts import redirect, render
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from .forms import THROTTLED, ApiKeyNameForm, LoginForm, OwnLimitsForm, SignupForm
from .limits import limit_magnitude, user_limits_effective
from .selectors import api_key_get, api_key_list
from .services import api_key_create, api_key_revoke, api_key_update, user_own_limits_set, user_signup
from .throttles import SignupThrottle


class LoginView(auth_views.LoginView):
    """Django's login view; its form carries the failed-login throttle (see ``ThrottledLoginMixin``)."""

    authentication_form = LoginForm
    template_name = "registration/login.html"
    redirect_authenticated_user = True

    def form_invalid(self, form):
        return throttled_status(super().form_invalid(form), form)


def throttled_status(response, form):
    """A login page answering a throttled form says so in its status too (429), as the API does."""
    if form is not None and form.throttled:
        response.status_code = 429
    return response


def staff_login(request):
    """``/admin/login/``: the admin's own login view, page and redirects, unchanged; its form is
    ``StaffLoginForm`` (``admin.site.login_form``, set in ``accounts/admin.py``), which carries the
    failed-login throttle. Routed ahead of the admin's URLs only to answer a throttled form 429."""
    response = admin.site.login(request)
    return throttled_status(response, (getattr(response, "context_data", None) or {}).get("form"))


logout_view = auth_views.LogoutView.as_view()


def _next_page(request) -> str:
    """Where to go after signing up: the ``next`` the login redirect carried (e.g. the /device
    page with an app's code), if it is a page of this site; else nothing."""
    target = request.POST.get("next") or request.GET.get("next") or ""
    safe = url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    )
    return target if safe else ""


@never_cache
def signup(request):
    next_page = _next_page(request)
    if request.user.is_authenticated:
        return redirect(next_page or "portal:home")
    form = SignupForm(request.POST or None)
    context = {"form": form, "next": next_page}
    if request.method == "POST":
        if not SignupThrottle().allow_request(request, None):
            form.add_error(None, THROTTLED)
            return render(request, "registration/signup.html", context, status=429)
        if form.is_valid():
            try:
                user = user_signup(email=form.cleaned_data["email"], password=form.cleaned_data["password"])
            except IntegrityError:  # the same email signed up between our check and the insert
                form.add_error("email", "An account with this email address already exists.")
            else:
                login(request, user, backend="django.contrib.auth.backends.ModelBackend")
                return redirect(next_page or "portal:home")
    return render(request, "registration/signup.html", context)


@never_cache
@login_required
def keys(request):
    """List keys; POST creates one and shows its secret in this one response only.

    The secret is rendered straight into the POST response (``no-store``) rather than kept in the
    session for a redirect: it is then never written anywhere on our side. The page's script turns
    the history entry into a plain GET, so reloading shows the list without the secret.
    """
    form = ApiKeyNameForm(request.POST or None)
    new_secret = None
    status = 200
    if request.method == "POST":
        if form.is_valid():
            _key, new_secret = api_key_create(user=request.user, name=form.cleaned_data["name"])
            form = ApiKeyNameForm()
        else:
            status = 400
    context = {"keys": api_key_list(user=request.user), "form": form, "new_secret": new_secret, "now": timezone.now()}
    return render(request, "portal/keys.html", context, status=status)


@require_POST
@login_required
def key_rename(request, key_id: int):
    key = api_key_get(user=request.user, key_id=key_id)  # 404 for anyone else's key
    form = ApiKeyNameForm(request.POST)
    if form.is_valid():
        api_key_update(key=key, name=form.cleaned_data["name"])
        messages.success(request, f"Key {key.prefix}… renamed.")
    else:
        messages.error(request, "A key name must be 1 to 100 characters.")
    return redirect("portal:keys")


@require_POST
@login_required
def key_revoke(request, key_id: int):
    key = api_key_get(user=request.user, key_id=key_id)
    api_key_revoke(key=key)
    messages.success(request, f"Key {key.prefix}… revoked. Requests using it are refused from now on.")
    return redirect("portal:keys")


@login_required
def limits_settings(request):
    """``/settings/limits``: the user's own budget beside the operator's limits; only tightens."""
    user = request.user
    if request.method == "POST":
        form = OwnLimitsForm(request.POST)
        if form.is_valid():
            try:
                user_own_limits_set(user=user, limits=form.limits())
            except ValidationError as exc:
                for name, errors in exc.message_dict.items():
                    form.add_error(name if name in form.fields else None, errors)
            else:
                messages.success(request, "Limits saved.")
                return redirect("portal:limits_settings")
    else:
        form = OwnLimitsForm(initial=OwnLimitsForm.initial_for(user.own_limits))
    effective = user_limits_effective(user)
    rows = [
        (form[name], limit_magnitude(name, (user.limits or {}).get(name)), effective.get(name), name.endswith("_spend"))
        for name in form.fields
    ]
    context = {"form": form, "rows": rows}
    return render(request, "portal/limits_settings.html", context, status=400 if form.errors else 200)
