from django.urls import path

from . import views

urlpatterns = [
    path("lemonsqueezy", views.lemonsqueezy_webhook, name="webhook-lemonsqueezy"),
    path("stripe", views.stripe_webhook, name="webhook-stripe"),
]
