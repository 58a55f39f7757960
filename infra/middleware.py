"""Request ids: every response carries ``X-Request-Id`` (the client's own, when it sends a sane one);
and ``/v1`` answers a wrong method in the OpenAI error shape like every other ``/v1`` error."""

import re
import uuid

from django.http import JsonResponse

from core.openai_errors import error_body

_SANE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id_from(value: str | None) -> str:
    if value and _SANE.match(value):
        return value
    return f"req_{uuid.uuid4().hex}"


class RequestIdMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request.request_id = request_id_from(request.headers.get("X-Request-Id"))
        response = self.get_response(request)
        response["X-Request-Id"] = request.request_id
        return response


class V1MethodNotAllowedMiddleware:
    """Django Ninja answers a method a ``/v1`` path does not take with Django's plain-text 405;
    clients built on the OpenAI SDKs expect its error shape there too."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if response.status_code != 405 or not request.path.startswith("/v1/"):
            return response
        if response.get("Content-Type", "").startswith("application/json"):
            return response
        allowed = response.get("Allow", "")
        message = f"{request.method} is not allowed here; use {allowed or 'another method'}."
        shaped = JsonResponse(error_body(message, code="method_not_allowed"), status=405)
        if allowed:
            shaped["Allow"] = allowed
        return shaped
