"""``manage.py sync_prices``: copy the upstream's price list (OpenRouter ``GET /models``) into the table.

Only changed prices get a new version; nothing is edited or deleted. New models arrive disabled
unless ``--enable-new``: the operator decides what they sell, then enables models in the admin.
"""

from decimal import Decimal

import httpx
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from core.money import format_usd, loads_decimal
from proxy import upstream
from proxy.prices import PriceError, PriceOffer, offer_from_openrouter, prices_sync

MAX_BODY_BYTES = 32 * 1024 * 1024  # OpenRouter's full list is a few MB; refuse anything absurd


class Command(BaseCommand):
    help = "Fetch the upstream's model price list and add a price version for each new or changed model."

    def add_arguments(self, parser):
        parser.add_argument("--url", help="price list URL (default: UPSTREAM_BASE_URL + /models)")
        parser.add_argument("--timeout", type=float, default=30.0, help="seconds for the whole fetch (default 30)")
        parser.add_argument(
            "--enable-new", action="store_true", help="put newly seen models on sale at once (default: disabled)"
        )
        parser.add_argument(
            "--disable-missing",
            action="store_true",
            help="take models the upstream no longer lists off sale (they are never deleted)",
        )
        parser.add_argument("--dry-run", action="store_true", help="report what would change and write nothing")

    def handle(self, *args, url=None, timeout=30.0, enable_new=False, disable_missing=False, dry_run=False, **opts):
        if timeout <= 0:
            raise CommandError("--timeout must be positive")
        url = url or f"{settings.UPSTREAM_BASE_URL}/models"
        verbosity = opts.get("verbosity", 1)
        if verbosity >= 1:
            self.stdout.write(f"fetching {url} …")
        items = self._fetch(url, timeout)
        offers = self._parse(items)
        if not offers:
            raise CommandError(f"{url} listed {len(items)} models but none had usable prices; nothing changed")
        if verbosity >= 1:
            listed = f"{len(items)} models listed, {len(offers)} with usable prices"
            self.stdout.write(f"{listed}; comparing with the table …")
        try:
            result = prices_sync(offers=offers, enable_new=enable_new, disable_missing=disable_missing, dry_run=dry_run)
        except PriceError as exc:
            raise CommandError(f"price table refused a price: {exc}") from None

        if verbosity >= 2:
            by_model = {offer.model: offer for offer in offers}
            for model in result.new:
                self.stdout.write(f"  new       {model}  {self._rates(by_model[model])}")
            for model, columns in result.changed:
                self.stdout.write(f"  changed   {model}  ({', '.join(columns)})  {self._rates(by_model[model])}")
            for model in result.unchanged:
                self.stdout.write(f"  unchanged {model}")
            for model in result.disabled:
                self.stdout.write(f"  disabled  {model} (no longer listed upstream)")
        summary = (
            f"synced {result.total} models: {len(result.new)} new, {len(result.changed)} changed, "
            f"{len(result.unchanged)} unchanged"
        )
        if disable_missing:
            summary += f", {len(result.disabled)} disabled"
        if len(offers) < len(items):
            summary += f" ({len(items) - len(offers)} skipped)"
        if result.new and not enable_new:
            summary += "; new models are disabled until you enable them in the admin"
        if dry_run:
            summary = f"dry run, nothing written: {summary}"
        self.stdout.write(self.style.SUCCESS(summary))

    def _fetch(self, url: str, timeout: float) -> list:
        headers = {"Accept": "application/json"}
        if settings.UPSTREAM_API_KEY:
            headers["Authorization"] = f"Bearer {settings.UPSTREAM_API_KEY}"
        try:
            response = httpx.get(
                url,
                headers=headers,
                timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                verify=upstream.verify(),
            )
        except httpx.HTTPError as exc:
            # The exception text names the URL and the failure, never the request headers (the key).
            raise CommandError(f"could not fetch {url}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise CommandError(f"{url} answered HTTP {response.status_code}; nothing changed")
        if len(response.content) > MAX_BODY_BYTES:
            raise CommandError(f"{url} sent {len(response.content)} bytes, more than a price list should be")
        try:
            # Decimal for every JSON number: a float price would already be wrong.
            body = loads_decimal(response.content)
        except ValueError as exc:
            raise CommandError(f"{url} did not send JSON: {exc}") from None
        items = body.get("data") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise CommandError(f'{url} sent JSON without a "data" list of models')
        return items

    def _parse(self, items: list) -> list[PriceOffer]:
        offers: list[PriceOffer] = []
        seen: set[str] = set()
        for index, item in enumerate(items):
            try:
                offer = offer_from_openrouter(item)
            except PriceError as exc:
                self.stderr.write(self.style.WARNING(f"skipped model #{index}: {exc}"))
                continue
            if offer.model in seen:
                self.stderr.write(self.style.WARNING(f"skipped a second entry for {offer.model}"))
                continue
            seen.add(offer.model)
            offers.append(offer)
        return offers

    @staticmethod
    def _rates(offer: PriceOffer) -> str:
        rates = ", ".join(f"{name} {value.normalize():f}" for name, value in offer.rates.items() if value != Decimal(0))
        fee = f", request {format_usd(offer.request_fee)}" if offer.request_fee else ""
        return f"USD/1M: {rates or 'free'}{fee}"
