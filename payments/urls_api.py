from django.urls import path

from . import api

urlpatterns = [
    path("packs", api.PackListApi.as_view(), name="packs"),
    path("checkout", api.CheckoutCreateApi.as_view(), name="checkout"),
]
