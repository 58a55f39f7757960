"""The machine-facing ``/v1`` JSON API (Django Ninja), answering every error in the OpenAI shape.

This module owns the one ``NinjaAPI`` and its error handlers; the apps' routers are registered
on it by the URL configuration (``config/urls.py``), so nothing here imports an app.
``/v1/chat/completions`` and ``/v1/embeddings`` are not Ninja endpoints: they are ASGI
applications routed before Django sees the request (``config/routing.py``). Any other path under
``/v1/`` that nothing serves is ``not_found``.
"""

from django.http import HttpRequest
from django.views.decorators.csrf import csrf_exempt
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError

from core.openai_errors import OpenAIError, error_body

api = NinjaAPI(title="Tokentill /v1", version="1.0.0", urls_namespace="v1", docs_url="/docs")


def openai_error_response(request: HttpRequest, error: OpenAIError):
    response = api.create_response(request, error.body(), status=error.status)
    if error.retry_after is not None:
        response["Retry-After"] = str(error.retry_after)
    return response


@api.exception_handler(OpenAIError)
def _openai_error(request, exc: OpenAIError):
    # Raised by the rules behind an endpoint: a key's rpm (checked by the bearer auth), a spend
    # cap, a refused charge.
    return openai_error_response(request, exc)


@api.exception_handler(ValidationError)
def _validation_error(request, exc: ValidationError):
    first = exc.errors[0] if exc.errors else {}
    loc = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
    message = f"{loc or 'body'}: {first.get('msg', 'invalid request')}"
    return openai_error_response(request, OpenAIError(400, message, code="invalid_request", param=loc))


@api.exception_handler(AuthenticationError)
def _auth_error(request, exc):
    reason = getattr(request, "auth_failure", None) or "invalid or missing bearer token"
    return openai_error_response(request, OpenAIError(401, reason, code="invalid_api_key"))


@api.exception_handler(HttpError)
def _http_error(request, exc: HttpError):
    return openai_error_response(request, OpenAIError(exc.status_code, str(exc), "invalid_request_error"))


@csrf_exempt  # any method, any client: the answer is the same 404 and changes nothing
def not_found(request: HttpRequest):
    """Unknown paths under ``/v1/``: OpenAI SDKs read the error from a JSON body, not an HTML page."""
    message = f"Unknown URL ({request.method} {request.path})"
    return api.create_response(request, error_body(message, code="not_found"), status=404)
