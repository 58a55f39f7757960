from django.apps import AppConfig


class ProxyConfig(AppConfig):
    name = "proxy"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from infra import health

        from .health import upstream_check, upstream_report

        health.register_check("upstream", upstream_check)
        health.register_report("upstreams", upstream_report)
