"""The machine-facing ``/v1`` JSON API (Django Ninja), in the OpenAI error shape.

``/v1/chat/completions`` and ``/v1/embeddings`` are not here: they are Channels consumers (see
``config/routing.py``), routed before Django sees the request. Everything else under ``/v1`` is
registered on this one ``NinjaAPI``, and any other path under ``/v1/`` is ``not_found``.
"""

from django.http import HttpRequest
from django.views.decorators.csrf import csrf_exempt
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError

from proxy.limits import LimitExceeded

api = NinjaAPI(title="Tokentill /v1", version="1.0.0", urls_namespace="v1", docs_url="/docs")


def openai_error(
    request: HttpRequest, status: int, message: str, type_: str, code: str | None = None, param=None, **extra
):
    body = {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}}
    return api.create_response(request, body, status=status)


@api.exception_handler(ValidationError)
def _validation_error(request, exc: ValidationError):
    first = exc.errors[0] if exc.errors else {}
    loc = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
    return openai_error(
        request,
        400,
        f"{loc or 'body'}: {first.get('msg', 'invalid request')}",
        "invalid_request_error",
        "invalid_request",
        param=loc,
    )


@api.exception_handler(AuthenticationError)
def _auth_error(request, exc):
    reason = getattr(request, "auth_failure", None) or "invalid or missing bearer token"
    return openai_error(request, 401, reason, "invalid_request_error", "invalid_api_key")


@api.exception_handler(LimitExceeded)
def _limit_exceeded(request, exc: LimitExceeded):
    # A key's rpm (checked by BearerAuth) or spend cap (a tool charge): the proxy's 429.
    response = openai_error(request, 429, exc.message, "rate_limit_error", exc.code)
    response["Retry-After"] = str(exc.retry_after)
    return response


@api.exception_handler(HttpError)
def _http_error(request, exc: HttpError):
    return openai_error(request, exc.status_code, str(exc), "invalid_request_error", None)


@csrf_exempt  # any method, any client: the answer is the same 404 and changes nothing
def not_found(request: HttpRequest):
    """Unknown paths under ``/v1/``: OpenAI SDKs read the error from a JSON body, not an HTML page."""
    message = f"Unknown URL ({request.method} {request.path})"
    return openai_error(request, 404, message, "invalid_request_error", "not_found")


# Routers register themselves here; imported at the bottom so they can import ``api`` helpers.
from proxy.v1 import router as proxy_router  # noqa: E402
from wallet.v1 import router as wallet_router  # noqa: E402

api.add_router("", proxy_router)
api.add_router("", wallet_router)
