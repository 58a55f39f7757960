from django.apps import AppConfig


class ProxyConfig(AppConfig):
    name = "proxy"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from notify.models import EventType
        from notify.worker import register_hourly

        from .notices import usage_summaries

        # notify sits below proxy and cannot import it: the summary's producer is handed to it here.
        register_hourly("usage.summary", EventType.USAGE_SUMMARY, usage_summaries)
