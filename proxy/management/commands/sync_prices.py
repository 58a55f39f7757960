"""``manage.py sync_prices``: copy an upstream's price list into its price series.

``--upstream NAME`` picks the upstream (default: the default upstream, ``UPSTREAM_BASE_URL``, as
always). OpenRouter publishes its prices (``GET /models``); other upstreams' prices come from a
static price file, ``--file prices.json`` or ``prices.csv`` (format in the README, "Static price
files"), which may also stand in for any upstream's list.

Only changed prices get a new version; nothing is edited or deleted; other upstreams' prices are
never touched. New models arrive disabled unless ``--enable-new``: the operator decides what
they sell, then enables models in the admin.
"""

import csv
import io
from decimal import Decimal
from pathlib import Path

import httpx
from django.core.management.base import BaseCommand, CommandError

from core.money import format_usd, loads_decimal
from proxy import upstream
from proxy.models import DEFAULT_UPSTREAM, Upstream
from proxy.prices import PriceError, PriceOffer, offer_from_openrouter, offer_from_price_file, prices_sync

MAX_BODY_BYTES = 32 * 1024 * 1024  # OpenRouter's full list is a few MB; refuse anything absurd


class Command(BaseCommand):
    help = "Fetch the upstream's model price list and add a price version for each new or changed model."

    def add_arguments(self, parser):
        parser.add_argument(
            "--upstream", help="name of the upstream whose prices these are (default: the default upstream)"
        )
        parser.add_argument(
            "--file", help="a static price file (.json or .csv, see the README) instead of the upstream's list"
        )
        parser.add_argument("--url", help="price list URL (default: the upstream's base URL + /models)")
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

    def handle(
        self,
        *args,
        upstream=None,
        file=None,
        url=None,
        timeout=30.0,
        enable_new=False,
        disable_missing=False,
        dry_run=False,
        **opts,
    ):
        if timeout <= 0:
            raise CommandError("--timeout must be positive")
        row, target = self._upstream(upstream)
        verbosity = opts.get("verbosity", 1)
        if file:
            source = file
            items, parse = self._read_file(file), offer_from_price_file
        else:
            if row is not None and not target.is_openrouter:
                raise CommandError(
                    f"upstream {target.name} ({target.kind}) publishes no price list: give its prices in a "
                    'price file with --file (format: README, "Static price files")'
                )
            source = url or upstream_url(target)
            if verbosity >= 1:
                self.stdout.write(f"fetching {source} …")
            items, parse = self._fetch(source, timeout, target), offer_from_openrouter
        offers = self._parse(items, parse)
        if not offers:
            raise CommandError(f"{source} listed {len(items)} models but none had usable prices; nothing changed")
        if verbosity >= 1:
            listed = f"{len(items)} models listed, {len(offers)} with usable prices"
            table = "the table" if row is None else f"{row.name}'s prices"
            self.stdout.write(f"{listed}; comparing with {table} …")
        try:
            result = prices_sync(
                offers=offers,
                enable_new=enable_new,
                disable_missing=disable_missing,
                dry_run=dry_run,
                upstream=row,
                source="sync_prices" if row is None else f"sync_prices:{row.name}",
            )
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

    @staticmethod
    def _upstream(name: str | None) -> tuple[Upstream | None, upstream.UpstreamConfig]:
        """The upstream's row (None for the default upstream) and its config."""
        if not name or name == DEFAULT_UPSTREAM:
            return None, upstream.default()
        row = Upstream.objects.filter(name=name).first()
        if row is None:
            known = ", ".join(Upstream.objects.values_list("name", flat=True)) or "none yet"
            raise CommandError(f"no upstream named {name!r} (configured: {known}; or leave --upstream out)")
        config = upstream.config_of(row)
        if config.unusable:
            raise CommandError(f"upstream {name}: {config.unusable}")
        return row, config

    def _read_file(self, path: str) -> list:
        """The entries of a static price file: a JSON list (or ``{"models": [...]}``) of objects,
        or a CSV with a header row. Numbers stay exact (Decimal, or the CSV's strings)."""
        file = Path(path)
        try:
            raw = file.read_bytes()
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc.strerror or exc}") from None
        if file.suffix.lower() == ".csv":
            try:
                rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig"))))
            except (UnicodeDecodeError, csv.Error) as exc:
                raise CommandError(f"{path} is not a UTF-8 CSV file: {exc}") from None
            if not rows or "id" not in rows[0]:
                raise CommandError(f"{path} needs a header row naming at least id, prompt and completion")
            return rows
        if file.suffix.lower() != ".json":
            raise CommandError(f"{path}: a price file is .json or .csv")
        try:
            body = loads_decimal(raw)
        except ValueError as exc:
            raise CommandError(f"{path} is not JSON: {exc}") from None
        items = body.get("models") if isinstance(body, dict) else body
        if not isinstance(items, list):
            raise CommandError(f'{path} needs a list of models, or an object with a "models" list')
        return items

    def _fetch(self, url: str, timeout: float, target: upstream.UpstreamConfig) -> list:
        headers = {**upstream.headers(target), "Accept": "application/json"}
        try:
            response = httpx.get(
                url,
                headers=headers,
                timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                verify=upstream.verify(target),
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

    def _parse(self, items: list, parse) -> list[PriceOffer]:
        offers: list[PriceOffer] = []
        seen: set[str] = set()
        for index, item in enumerate(items):
            try:
                offer = parse(item)
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


def upstream_url(target: upstream.UpstreamConfig) -> str:
    return upstream.url("models", target)
