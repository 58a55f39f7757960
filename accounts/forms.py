"""Portal forms: they parse and validate input; the accounts services do the work."""

from __future__ import annotations

from django import forms
from django.contrib.auth import password_validation
from django.contrib.auth.forms import AuthenticationForm

from .device import user_code_normalise
from .models import ApiKey, User


class LoginForm(AuthenticationForm):
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
        email = self.cleaned_data["email"].strip().lower()
        # A friendly early answer; the UNIQUE constraint still decides a race (see the view).
        if User.objects.filter(email__iexact=email).exists():
            raise forms.ValidationError("An account with this email address already exists.")
        return email

    def clean(self):
        cleaned = super().clean()
        email, password = cleaned.get("email"), cleaned.get("password")
        if email and password:
            try:
                password_validation.validate_password(password, user=User(email=email))
            except forms.ValidationError as exc:
                self.add_error("password", exc)
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
