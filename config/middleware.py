"""Request ids: every response carries ``X-Request-Id`` (the client's own, when it sends a sane one)."""

import re
import uuid

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
