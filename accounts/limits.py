"""What limits an API key and a user may carry, and the one validator for each.

``limits_clean`` validates an API key's ``limits``; ``user_limits_clean`` a user's (the staff's
``User.limits`` and the user's own ``User.own_limits`` share the shape). The REST API, the portal
and the admin all use these, so a limit refused at one place is refused at every other.

A user's limits come from two hands: staff set ``User.limits`` in the admin, the user sets their
own budget (``User.own_limits``) in the portal or through ``/api/account/limits``. The one in
force is the stricter of the two (``user_limits_effective``), and a user may only tighten:
``own_limits_check`` refuses an own limit looser than the staff's, naming it. The counters that
enforce them are the proxy's (``proxy.limits``).

Money limits are decimal strings, stored with 9 places; numbers are refused because a JSON
number may already have been rounded by a float on its way here. Counts are whole numbers from 1
to ``MAX_COUNT`` (tokens to ``MAX_TOKENS``), spend up to ``MAX_SPEND``: anything beyond is a typo,
not a limit.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError

from core.money import MoneyError, format_usd, parse_usd

LIMIT_KEYS = (
    "rpm",
    "daily_spend",
    "monthly_spend",
    "allowed_models",
    "run_max_steps",
    "run_max_spend",
    "max_parallel",
    "allow_fallback",
    "tpm",
    "tpd",
)
USER_LIMIT_KEYS = ("daily_spend", "monthly_spend", "rpm", "max_parallel", "tpm", "tpd")

MAX_COUNT = 10**9  # requests per minute, requests in flight, model calls per run
MAX_TOKENS = 10**12  # tokens per minute or per day
MAX_SPEND = parse_usd("1000000")  # nanodollars: a million USD per window or run

# What each whole-number limit counts, for the error that names it.
_COUNTS = {
    "rpm": ("requests per minute", MAX_COUNT),
    "run_max_steps": ("model calls per run", MAX_COUNT),
    "max_parallel": ("requests in flight", MAX_COUNT),
    "tpm": ("tokens per minute", MAX_TOKENS),
    "tpd": ("tokens per day", MAX_TOKENS),
}
# Spend limits where zero means nothing (a run that may spend nothing is no run); a daily or
# monthly cap of zero is a real cap: nothing may be spent.
_POSITIVE_SPEND = ("run_max_spend",)
_LABELS = {
    "daily_spend": "daily spend",
    "monthly_spend": "monthly spend",
    "rpm": "requests per minute",
    "max_parallel": "requests in flight",
    "tpm": "tokens per minute",
    "tpd": "tokens per day",
}


def _count(name: str, value: object) -> int | None:
    if value is None:
        return None
    what, most = _COUNTS[name]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= most:
        raise ValidationError(f"{name} must be a positive whole number of {what} (at most {most}), or null")
    return value


def _spend(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(f'{name} must be a decimal string such as "5.00" (not a number), or null')
    try:
        nanos = parse_usd(value)
    except MoneyError as exc:
        raise ValidationError(f"{name}: {exc}") from None
    if nanos < 0:
        raise ValidationError(f"{name} cannot be negative")
    if nanos == 0 and name in _POSITIVE_SPEND:
        raise ValidationError(f"{name} must be more than zero, or null for no limit")
    if nanos > MAX_SPEND:
        raise ValidationError(f"{name} can be at most {format_usd(MAX_SPEND)} USD")
    return format_usd(nanos)


def _clean_one(name: str, value: object):
    return _count(name, value) if name in _COUNTS else _spend(name, value)


def _object(value: object, allowed: tuple[str, ...]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError(f"limits must be an object with {', '.join(allowed)}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValidationError(f"unknown limit(s): {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return value


def limits_clean(value: object) -> dict:
    """Validate and normalise an API key's ``{rpm, daily_spend, monthly_spend, allowed_models,
    run_max_steps, run_max_spend, max_parallel, allow_fallback, tpm, tpd}``.

    Missing keys mean "no limit" (null). ``run_max_steps``/``run_max_spend`` bound each
    ``X-Tokentill-Run`` made with the key. Raises Django's ``ValidationError`` (DRF and admin
    forms both understand it).
    """
    value = _object(value, LIMIT_KEYS)
    cleaned = {
        name: _clean_one(name, value.get(name))
        for name in LIMIT_KEYS
        if name not in ("allowed_models", "allow_fallback")
    }
    fallback = value.get("allow_fallback")
    if fallback is not None and not isinstance(fallback, bool):
        raise ValidationError("allow_fallback must be true or false (or null: false)")
    cleaned["allow_fallback"] = fallback
    models = value.get("allowed_models")
    if models is not None:
        if not isinstance(models, list) or not models:
            raise ValidationError("allowed_models must be a non-empty list of model ids, or null for every model")
        if not all(isinstance(model, str) and model.strip() for model in models):
            raise ValidationError("allowed_models entries must be non-empty strings")
        # Order kept, duplicates dropped: the list is shown back to the user as they wrote it.
        models = list(dict.fromkeys(model.strip() for model in models))
    cleaned["allowed_models"] = models
    return {name: cleaned[name] for name in LIMIT_KEYS}


def user_limits_clean(value: object, *, by_field: bool = False) -> dict:
    """Validate and normalise a user's ``{daily_spend, monthly_spend, rpm, max_parallel, tpm,
    tpd}`` (staff's or the user's own); missing keys mean no limit. Raises ``ValidationError``
    naming every bad limit — keyed by limit name when ``by_field`` (for forms and the API)."""
    value = _object(value, USER_LIMIT_KEYS)
    cleaned, problems = {}, {}
    for name in USER_LIMIT_KEYS:
        try:
            cleaned[name] = _clean_one(name, value.get(name))
        except ValidationError as exc:
            problems[name] = exc.messages
    if problems:
        if by_field:
            raise ValidationError(problems)
        raise ValidationError([message for messages in problems.values() for message in messages])
    return cleaned


def limit_magnitude(name: str, value) -> int | None:
    """A stored limit as a comparable integer (spend in nanodollars); None when unset."""
    if value in (None, ""):
        return None
    return parse_usd(value) if name in ("daily_spend", "monthly_spend") else int(value)


def own_limits_check(*, staff: dict | None, own: dict) -> None:
    """Refuse an own limit looser than the staff's (``own`` already cleaned): the user may only
    tighten. Every offending limit is named, with the most it may be."""
    problems = {}
    for name in USER_LIMIT_KEYS:
        most, wanted = limit_magnitude(name, (staff or {}).get(name)), limit_magnitude(name, own.get(name))
        if most is not None and wanted is not None and wanted > most:
            shown = f"${format_usd(most)}" if name.endswith("_spend") else str(most)
            problems[name] = (
                f"Your {_LABELS[name]} limit can be at most {shown}, the limit your operator set; "
                "you can only tighten it."
            )
    if problems:
        raise ValidationError(problems)


def user_limits_effective(user) -> dict[str, int]:
    """The user's limits in force: for each, the stricter of the staff's and the user's own.
    Spend in nanodollars; a limit neither sets is absent from the answer."""
    effective = {}
    for name in USER_LIMIT_KEYS:
        values = [
            magnitude
            for source in (getattr(user, "limits", None), getattr(user, "own_limits", None))
            if (magnitude := limit_magnitude(name, (source or {}).get(name))) is not None
        ]
        if values:
            effective[name] = min(values)
    return effective
