"""What an upstream's error body may tell the client, and what only staff may read.

No Django imports. An upstream refusal of the client's own request (400/404/413/422) is relayed so
the client can fix it — "max_tokens: must be ≤ 4096", "This model's maximum context length is …"
— but the text is the upstream's, written for the *operator*: it can quote the operator's key, name
the operator's account, organisation or e-mail, or link to a signed URL. So:

* ``error_text`` finds the message in the shapes servers send: OpenAI / llama.cpp
  ``{"error": {"message", "param"}}``, OpenRouter's ``{"error": {"message", "metadata": {"raw",
  "provider_name"}}}`` (the provider's own error is in ``raw``, often as a JSON string), vLLM
  ``{"object": "error", "message"}``, Ollama ``{"error": "…"}``, FastAPI ``{"detail": …}``, plain
  text, and HTML error pages (their title only).
* ``redact_secrets`` removes credentials (the configured key itself, ``sk-…``/``sk-or-…`` keys,
  Bearer tokens, JWTs): applied to everything, logs included.
* ``redact`` also removes who the operator is (``org-…``, ``user_…``, "account 12345", UUIDs,
  e-mails, URLs with query strings, long random-looking strings): applied to what the client sees
  and to the usage record.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

CLIENT_MESSAGE_LIMIT = 500
LOG_TEXT_LIMIT = 2000
# A configured key shorter than this is not one (and replacing "abc" everywhere would garble text).
MIN_SECRET_LENGTH = 8

REDACTED = "[redacted]"

_CREDENTIALS = [
    # A Bearer token as an upstream may echo its Authorization header.
    re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=*-]{6,}"),
    # OpenAI (sk-, sk-proj-), OpenRouter (sk-or-v1-), Anthropic (sk-ant-), publishable/restricted
    # (pk-, rk-), masked forms included ("sk-proj-****abcd").
    re.compile(r"\b(?:sk|pk|rk)[-_][A-Za-z0-9_*-]{6,}"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"),  # JWTs
    # key=…, api_key: …, "token": "…" as they appear in echoed config or query strings.
    re.compile(r"(?i)\b(api[_-]?key|access[_-]?token|token|secret|password)(\"?\s*[:=]\s*\"?)[^\s\"',;&]{4,}"),
]

_IDENTITIES = [
    re.compile(r"(?i)\bhttps?://[^\s\"'<>]*\?[^\s\"'<>]*"),  # a URL with a query string
    re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"),  # e-mail
    re.compile(r"(?i)\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"),  # UUID
    # org-…, user_…, proj_…: an id (it has a digit, or is long and mixed-case), not "user_name".
    re.compile(
        r"\b(?:org|user|proj|project|acct|team|ws|cus)[-_]"
        r"(?:(?=[A-Za-z0-9]*\d)[A-Za-z0-9]{4,}|(?=[a-z0-9]*[A-Z])(?=[A-Z0-9]*[a-z])[A-Za-z0-9]{12,})\b"
    ),
]

# "account 12345", "organization: abc123", "user id 'u-42'", "project=p7": keep the word, drop the id.
_NAMED_ID = re.compile(
    r"(?i)\b(account|organi[sz]ation|org|user|project|team|workspace|customer|tenant)"
    r"((?:[\s_-]*id)?\s*[:#=]?\s*)(['\"`]?)([A-Za-z0-9_.:-]*\d[A-Za-z0-9_.:-]*)\3"
)

# A run of 20+ letters and digits (both present) is a token, not a word; 12+ digits an account number.
_RANDOM = re.compile(r"\b(?=[A-Za-z0-9]*\d)(?=[A-Za-z0-9]*[A-Za-z])[A-Za-z0-9]{20,}\b|\b\d{12,}\b")

_PARAM = re.compile(r"[A-Za-z_][A-Za-z0-9_.\[\]-]{0,63}")


@dataclass(frozen=True)
class UpstreamError:
    message: str  # the upstream's text, not yet redacted
    param: str | None = None  # which request field was wrong, when the upstream says (OpenAI shape)


def _secrets(secrets: Iterable[str]) -> list[str]:
    return sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)


def redact_secrets(text: str, *, secrets: Iterable[str] = ()) -> str:
    """Credentials out: the configured ``secrets`` verbatim, then anything shaped like one."""
    for secret in _secrets(secrets):
        text = text.replace(secret, REDACTED)
    text = _CREDENTIALS[0].sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _CREDENTIALS[1].sub(REDACTED, text)
    text = _CREDENTIALS[2].sub(REDACTED, text)
    return _CREDENTIALS[3].sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)


def redact(text: str, *, secrets: Iterable[str] = ()) -> str:
    """Credentials and the operator's identity out; the rest (what was wrong) stays."""
    text = redact_secrets(text, secrets=secrets)
    for pattern in _IDENTITIES:
        text = pattern.sub(REDACTED, text)
    text = _NAMED_ID.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3)}{REDACTED}{m.group(3)}", text)
    return _RANDOM.sub(REDACTED, text)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _from_html(text: str) -> str:
    """An error page (a proxy's or load balancer's): its title or first heading, nothing else."""
    for tag in ("title", "h1"):
        found = re.search(rf"(?is)<{tag}[^>]*>(.*?)</{tag}>", text)
        if found:
            return _one_line(html.unescape(re.sub(r"<[^>]+>", " ", found.group(1))))
    return ""


def _as_json(value: object) -> object:
    if isinstance(value, str) and value.lstrip()[:1] in ("{", "["):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return value
    return value


def _from_json(parsed: object, depth: int = 0) -> UpstreamError | None:
    if depth > 3:
        return None
    if isinstance(parsed, str):
        return UpstreamError(parsed) if parsed.strip() else None
    if isinstance(parsed, list):
        # FastAPI/pydantic validation errors: [{"loc": ["body", "max_tokens"], "msg": "…"}, …]
        found = [_from_validation(item) for item in parsed[:5]]
        messages = [item for item in found if item]
        return UpstreamError("; ".join(messages)) if messages else None
    if not isinstance(parsed, dict):
        return None
    error = parsed.get("error")
    if isinstance(error, (dict, str)):
        return _from_json(error, depth + 1) or _from_json({k: v for k, v in parsed.items() if k != "error"}, depth + 1)
    # OpenRouter wraps the provider's own error: "Provider returned error" + metadata.raw.
    metadata = parsed.get("metadata")
    if isinstance(metadata, dict) and metadata.get("raw") is not None:
        inner = _from_json(_as_json(metadata["raw"]), depth + 1)
        if inner is not None:
            return inner
    message = parsed.get("message") or parsed.get("msg")
    if message is None and "detail" in parsed:
        return _from_json(parsed["detail"], depth + 1)
    if not isinstance(message, str) or not message.strip():
        return None
    param = parsed.get("param")
    if not (isinstance(param, str) and _PARAM.fullmatch(param)):
        param = None
    return UpstreamError(message, param)


def _from_validation(item: object) -> str:
    if not isinstance(item, dict) or not isinstance(item.get("msg"), str):
        return ""
    loc = item.get("loc")
    location = loc if isinstance(loc, list) else []
    path = ".".join(str(part) for part in location[1:] if isinstance(part, (str, int)))  # [0] is "body"
    return f"{path}: {item['msg']}" if path else item["msg"]


def error_text(raw: bytes) -> UpstreamError:
    """The upstream's message (and ``param``) from an error body of any shape; ``""`` if none."""
    text = raw.decode("utf-8", errors="replace").strip()
    if not text:
        return UpstreamError("")
    if text[:1] in ("{", "[", '"'):
        try:
            found = _from_json(json.loads(text))
        except (ValueError, RecursionError):
            found = None
        if found is not None:
            return UpstreamError(_one_line(found.message), found.param)
    if text[:1] == "<" or "<html" in text[:200].lower():
        return UpstreamError(_from_html(text))
    return UpstreamError(_one_line(text))


def client_error(raw: bytes, *, secrets: Iterable[str] = ()) -> UpstreamError:
    """What the client (and the usage record) may see: the message redacted and bounded."""
    found = error_text(raw)
    message = redact(found.message, secrets=secrets)
    if len(message) > CLIENT_MESSAGE_LIMIT:
        message = message[: CLIENT_MESSAGE_LIMIT - 1].rstrip() + "…"
    return UpstreamError(message, found.param)


def log_text(raw: bytes, *, secrets: Iterable[str] = ()) -> str:
    """The whole body for staff's log, bounded, with credentials (the configured key first) out."""
    text = raw[: LOG_TEXT_LIMIT * 4].decode("utf-8", errors="replace")
    return redact_secrets(_one_line(text), secrets=secrets)[:LOG_TEXT_LIMIT]
