from django.urls import path

from . import webhooks

urlpatterns = [
    path("lemonsqueezy", webhooks.lemonsqueezy_webhook, name="webhook-lemonsqueezy"),
    path("stripe", webhooks.stripe_webhook, name="webhook-stripe"),
]
