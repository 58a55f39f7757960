"""One error shape for /api: DRF's ``{"detail": ...}``, also for errors DRF does not raise itself."""

from django.core.exceptions import PermissionDenied
from django.http import Http404
from rest_framework import exceptions
from rest_framework.views import exception_handler

from core.money import MoneyError


def api_exception_handler(exc, context):
    if isinstance(exc, MoneyError):
        exc = exceptions.ValidationError({"detail": str(exc)})
    response = exception_handler(exc, context)
    if response is not None and isinstance(exc, (Http404, PermissionDenied)):
        response.data = {"detail": str(exc) or response.data.get("detail", "")}
    return response
