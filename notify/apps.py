from django.apps import AppConfig


class NotifyConfig(AppConfig):
    name = "notify"
    verbose_name = "Notifications and outbound webhooks"
    default_auto_field = "django.db.models.BigAutoField"
