"""Portal forms: they parse and validate input; the accounts services do the work."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django import forms
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import password_validation
from django.contrib.auth.forms import AuthenticationForm

from .device import user_code_normalise
from .models import ApiKey, User
from .throttles import LoginFailureThrottle

THROTTLED = "Too many attempts. Please wait a few minutes and try again."

# The mixin's methods run on the login form it is mixed into; at run time it adds no base.
if TYPE_CHECKING:
    _LoginFormBase = AuthenticationForm
else:
    _LoginFormBase = object


class ThrottledLoginMixin(_LoginFormBase):
    """Puts Django's login forms (the portal's, the admin's) behind the failed-login throttle that
    ``/api/auth/token`` uses, with the same buckets.

    The throttle sits in ``clean()`` because that is where the password is checked: while
    throttled it is not checked at all (so the answer cannot tell a right guess from a wrong one),
    and a check that fails is recorded. The view answers 429 when ``throttled`` is set.
    """

    throttled = False

    def clean(self):
        throttle = LoginFailureThrottle(self.request, self.data.get("username", ""))
        if throttle.wait() is not None:
            self.throttled = True
            raise forms.ValidationError(THROTTLED, code="throttled")
        try:
            return super().clean()
        except forms.ValidationError:
            # Only a password that did not authenticate is a failure, not (at the admin) a right
            # password of someone who is not staff.
            if self.user_cache is None:
                throttle.record_failure()
            raise


class StaffLoginForm(ThrottledLoginMixin, AdminAuthenticationForm):
    """The admin's own login form and page, throttled (``admin.site.login_form``)."""


class LoginForm(ThrottledLoginMixin, AuthenticationForm):
    """Django's login form; the user model logs in by email, so the username box is an email box."""

    username = forms.EmailField(
        label="Email", widget=forms.EmailInput(attrs={"autofocus": True, "autocomplete": "email"})
    )

    def clean_username(self) -> str:
        # Emails are stored lowercased (UserManager), and the backend matches exactly.
        return self.cleaned_data["username"].strip().lower()


class SignupForm(forms.Form):
    email = forms.EmailField(widget=forms.EmailInput(attrs={"autofocus": True, "autocomplete": "email"}))
    password = forms.CharField(
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        help_text=password_validation.password_validators_help_text_html(),
    )

    def clean_email(self) -> str:
        return self.cleaned_data["email"].strip().lower()

    def clean(self):
        super().clean()
        cleaned = self.cleaned_data  # what Form.clean returns
        email, password = cleaned.get("email"), cleaned.get("password")
        if email and password:
            # As the API does (SignupSerializer.validate): the password first, so that a weak one
            # is answered the same whether or not the address has an account.
            try:
                password_validation.validate_password(password, user=User(email=email))
            except forms.ValidationError as exc:
                self.add_error("password", exc)
                return cleaned
            # A friendly early answer; the UNIQUE constraint still decides a race (see the view).
            if User.objects.filter(email__iexact=email).exists():
                self.add_error("email", "An account with this email address already exists.")
        return cleaned


class ApiKeyNameForm(forms.Form):
    name = forms.CharField(max_length=ApiKey._meta.get_field("name").max_length, strip=True)


class DeviceCodeForm(forms.Form):
    """The code an app shows, as the user types it: any case, with or without the dash."""

    code = forms.CharField(
        label="Code",
        max_length=20,
        widget=forms.TextInput(
            attrs={"autofocus": True, "autocomplete": "off", "autocapitalize": "characters", "spellcheck": "false"}
        ),
    )

    def clean_code(self) -> str:
        code = user_code_normalise(self.cleaned_data["code"])
        if code is None:
            raise forms.ValidationError("A code is 8 letters, like BCDF-GHJK. Check the code your app shows.")
        return code


class OwnLimitsForm(forms.Form):
    """The user's own budget (``/settings/limits``): text in, limits out. Empty means none of
    their own; each limit is checked by ``accounts.limits`` when saved (``user_own_limits_set``),
    which also refuses one looser than what staff set."""

    daily_spend = forms.CharField(label="Daily spend limit (USD)", required=False, max_length=40)
    monthly_spend = forms.CharField(label="Monthly spend limit (USD)", required=False, max_length=40)
    rpm = forms.CharField(label="Requests per minute", required=False, max_length=40)
    max_parallel = forms.CharField(label="Requests in flight at once", required=False, max_length=40)
    tpm = forms.CharField(label="Tokens per minute", required=False, max_length=40)
    tpd = forms.CharField(label="Tokens per day", required=False, max_length=40)

    COUNTS = ("rpm", "max_parallel", "tpm", "tpd")

    @classmethod
    def initial_for(cls, own: dict | None) -> dict:
        return {name: ("" if value is None else value) for name, value in (own or {}).items()}

    def limits(self) -> dict:
        """The limits as ``accounts.limits`` reads them: spend as strings, counts as whole numbers
        where the text is one (anything else goes through as text, to be refused with the reason)."""
        limits: dict = {}
        for name, text in self.cleaned_data.items():
            text = text.strip()
            if not text:
                limits[name] = None
            elif name in self.COUNTS and text.isascii() and text.isdigit() and len(text) <= 15:
                limits[name] = int(text)
            else:
                limits[name] = text
        return limits
