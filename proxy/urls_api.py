from django.urls import path

from . import api

urlpatterns = [
    path("usage", api.UsageListApi.as_view(), name="usage-list"),
    path("usage/summary", api.UsageSummaryApi.as_view(), name="usage-summary"),
    path("usage/<int:usage_id>", api.UsageDetailApi.as_view(), name="usage-detail"),
    # A run id is any client string (up to 200 characters), "/" included.
    path("runs/<path:run>", api.RunDetailApi.as_view(), name="run-detail"),
]
