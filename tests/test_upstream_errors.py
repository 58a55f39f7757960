"""Unit tests for core.upstream_errors: what of an upstream's error body reaches the client."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.upstream_errors import (
    CLIENT_MESSAGE_LIMIT,
    UpstreamError,
    client_error,
    error_text,
    log_text,
    redact,
    redact_secrets,
)

KEY = "sk-or-v1-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"


def body(obj) -> bytes:
    return json.dumps(obj).encode()


# --- finding the message in every shape ------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # OpenAI
        (
            body(
                {
                    "error": {
                        "message": "max_tokens is too large: 9000. This model supports at most 4096 completion tokens.",
                        "type": "invalid_request_error",
                        "param": "max_tokens",
                        "code": None,
                    }
                }
            ),
            UpstreamError(
                "max_tokens is too large: 9000. This model supports at most 4096 completion tokens.", "max_tokens"
            ),
        ),
        # OpenRouter wrapping the provider's error as a JSON string in metadata.raw
        (
            body(
                {
                    "error": {
                        "message": "Provider returned error",
                        "code": 400,
                        "metadata": {
                            "raw": json.dumps(
                                {
                                    "error": {
                                        "message": "This model's maximum context length is 128000 tokens.",
                                        "param": "messages",
                                    }
                                }
                            ),
                            "provider_name": "OpenAI",
                        },
                    }
                }
            ),
            UpstreamError("This model's maximum context length is 128000 tokens.", "messages"),
        ),
        # OpenRouter with a plain-text raw
        (
            body({"error": {"message": "Provider returned error", "code": 400, "metadata": {"raw": "bad top_k"}}}),
            UpstreamError("bad top_k"),
        ),
        # OpenRouter with no metadata
        (body({"error": {"message": "openai/gpt-5 is not a valid model ID", "code": 400}}), None),
        # vLLM
        (
            body(
                {
                    "object": "error",
                    "message": "temperature must be non-negative, got -1.0.",
                    "type": "BadRequestError",
                    "param": None,
                    "code": 400,
                }
            ),
            UpstreamError("temperature must be non-negative, got -1.0."),
        ),
        # Ollama
        (body({"error": 'model "llama9" not found, try pulling it first'}), None),
        # FastAPI / pydantic validation
        (
            body({"detail": [{"loc": ["body", "max_tokens"], "msg": "Input should be less than 4097", "type": "x"}]}),
            UpstreamError("max_tokens: Input should be less than 4097"),
        ),
        (body({"detail": "Not Found"}), UpstreamError("Not Found")),
        # Anthropic-style
        (
            body({"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: 0 < 1"}}),
            UpstreamError("max_tokens: 0 < 1"),
        ),
        # plain text, multi-line
        (
            b"Bad Request:\n  stop must have at most 4 items\n",
            UpstreamError("Bad Request: stop must have at most 4 items"),
        ),
        # an HTML error page: its title only
        (
            b"<html><head><title>413 Request Entity Too Large</title></head><body><center>nginx/1.25.3"
            b"</center><!-- host 10.0.3.4 --></body></html>",
            UpstreamError("413 Request Entity Too Large"),
        ),
        (b"<!DOCTYPE html><html><body><h1>Bad &amp; wrong</h1></body></html>", UpstreamError("Bad & wrong")),
        (b"<html><body>nothing named</body></html>", UpstreamError("")),
        (b"", UpstreamError("")),
        (b"[]", UpstreamError("[]")),
        (b'{"error": {"code": 400}}', UpstreamError('{"error": {"code": 400}}')),
        (b"\xff\xfe not utf-8", UpstreamError("\ufffd\ufffd not utf-8")),
        (b"[" * 100_000, UpstreamError("[" * 100_000)),
    ],
    ids=[
        "openai",
        "openrouter-raw-json",
        "openrouter-raw-text",
        "openrouter",
        "vllm",
        "ollama",
        "fastapi-validation",
        "fastapi-detail",
        "anthropic",
        "plain-text",
        "html-title",
        "html-h1",
        "html-nothing",
        "empty",
        "empty-list",
        "no-message",
        "not-utf8",
        "deeply-nested",
    ],
)
def test_it_finds_the_message_in_every_shape(raw, expected):
    if expected is None:  # the message is the error's own
        parsed = json.loads(raw)
        expected = UpstreamError(parsed["error"] if isinstance(parsed["error"], str) else parsed["error"]["message"])
    assert error_text(raw) == expected


# --- what the client may see -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kept", "removed"),
    [
        (f"Incorrect API key provided: {KEY}.", "Incorrect API key provided", KEY),
        ("Incorrect API key provided: sk-proj-****************************abcd.", "Incorrect API key", "abcd"),
        ("Invalid key sk-ant-api03-AbCdEf012345", "Invalid key", "AbCdEf012345"),
        ("Authorization: Bearer abc.def-ghi_jkl", "Authorization", "abc.def-ghi_jkl"),
        ("token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJl expired", "expired", "eyJhbGci"),
        ("You exceeded your quota on org-AbCdEfGhIjKlMnOpQrStUvWx.", "You exceeded your quota on", "org-AbCd"),
        ("Rate limit reached for user_2Zx81bQ in organization org-Xy12", "Rate limit reached for", "2Zx81bQ"),
        ("Your account 12345 is not allowed to use gpt-4o", "not allowed to use gpt-4o", "12345"),
        ("organization: acme-42 has no access", "has no access", "acme-42"),
        ("project id 'proj_8Fh2' is archived", "is archived", "8Fh2"),
        ("Contact billing@operator.example for access", "Contact", "billing@operator.example"),
        ("See https://console.example.com/keys?key=abc&account=9 for details", "for details", "account=9"),
        ("request 6a2b9d1e-4c70-4f0e-8b52-91d4e3a7c0f5 failed", "failed", "6a2b9d1e"),
        ("credential A8fK2mQ9xL3pR7tW5yZ1bN4c rejected", "rejected", "A8fK2mQ9xL3pR7tW5yZ1bN4c"),
        ("billing id 123456789012345 overdue", "overdue", "123456789012345"),
        ("api_key=hunter2secret is invalid", "is invalid", "hunter2secret"),
    ],
)
def test_credentials_and_account_ids_are_removed_and_the_rest_kept(text, kept, removed):
    cleaned = redact(text, secrets=[KEY])
    assert removed not in cleaned
    assert kept in cleaned
    assert "[redacted]" in cleaned


@pytest.mark.parametrize(
    "text",
    [
        "max_tokens: must be ≤ 4096",
        "This model's maximum context length is 128000 tokens. However, you requested 150000 tokens.",
        "meta-llama/Llama-3.3-70B-Instruct does not support tools",
        "claude-3-5-sonnet-20241022 is not available; use anthropic/claude-sonnet-4",
        "Qwen2.5-Coder-32B-Instruct: stop must have at most 4 items",
        "Invalid 'messages[2].role': expected one of system, user, assistant, tool",
        "user_name is not a supported parameter",
        "The user message at index 3 is empty",
        "See https://platform.openai.com/docs/guides/error-codes for details",
        "temperature must be between 0 and 2, got 2.5",
        "Your organization must be verified to stream this model.",
    ],
)
def test_useful_messages_pass_unchanged(text):
    assert redact(text, secrets=[KEY]) == text


def test_the_configured_key_is_removed_whatever_its_shape():
    odd_key = "local-llm-key-with-no-known-prefix"
    assert odd_key not in redact(f"key {odd_key} refused", secrets=[odd_key])
    assert redact("a short key abc stays", secrets=["abc"]) == "a short key abc stays"  # too short to be one


def test_the_client_message_is_bounded_and_keeps_the_param():
    raw = body({"error": {"message": "x " * 1000, "param": "max_tokens"}})
    found = client_error(raw, secrets=[KEY])
    assert len(found.message) <= CLIENT_MESSAGE_LIMIT and found.message.endswith("…")
    assert found.param == "max_tokens"
    assert client_error(body({"error": {"message": "m", "param": "a b; drop"}})).param is None


def test_openrouter_provider_errors_are_unwrapped_then_redacted():
    raw = body(
        {
            "error": {
                "message": "Provider returned error",
                "metadata": {
                    "raw": json.dumps({"error": {"message": f"Incorrect API key provided: {KEY[:20]}…, org-Q8x1"}}),
                    "provider_name": "OpenAI",
                },
            }
        }
    )
    message = client_error(raw, secrets=[KEY]).message
    assert message.startswith("Incorrect API key provided:")
    assert "sk-or" not in message and "org-Q8x1" not in message


def test_the_log_keeps_the_whole_body_but_never_a_credential():
    raw = body({"error": {"message": f"key {KEY} of org-Q8x1 (ops@operator.example)", "code": 401}})
    logged = log_text(raw, secrets=[KEY])
    assert KEY not in logged and "sk-or" not in logged
    assert "org-Q8x1" in logged and "ops@operator.example" in logged and '"code": 401' in logged


@given(st.text(max_size=200))
def test_redaction_never_lets_the_configured_key_through(noise):
    text = f"{noise}{KEY}{noise}"
    assert KEY not in redact(text, secrets=[KEY])
    assert KEY not in redact_secrets(text, secrets=[KEY])
