from django.urls import path

from . import api

urlpatterns = [
    path("wallet", api.WalletApi.as_view(), name="api-wallet"),
    path("wallet/entries", api.EntryListApi.as_view(), name="api-wallet-entries"),
    path("wallet/entries/<int:entry_id>", api.EntryDetailApi.as_view(), name="api-wallet-entry"),
]
