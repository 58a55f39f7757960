from django.apps import AppConfig


class ProxyConfig(AppConfig):
    name = "proxy"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from infra import health
        from notify.models import EventType
        from notify.worker import register_hourly

        from .health import upstream_check, upstream_report
        from .notices import usage_summaries

        # infra and notify sit below proxy and cannot import it: its checks and the summary's
        # producer are handed to them here.
        health.register_check("upstream", upstream_check)
        health.register_report("upstreams", upstream_report)
        register_hourly("usage.summary", EventType.USAGE_SUMMARY, usage_summaries)
