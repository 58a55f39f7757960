"""Model aliases, fallbacks and agent routes: what staff may save, and saving it.

The rules are checked where staff enter them, against the price table *as it is now*:

* an alias names a model on sale — not itself, not another alias (so resolving one is one
  lookup, and no chain of aliases can loop), and its name is no model's, so it never hides one;
* a fallback is a model on sale or an alias (read as its model), never the model itself, and
  costs less: its current prompt + completion rate per token is below the model's (at each
  one's first upstream). Fallbacks are followed one hop only, so two can never loop either;
* a threshold (``fallback_below``) needs a fallback to fall back to.

The proxy reads all three tables through ``selectors.tiers_current`` (cached per process for
``PROXY_PRICE_CACHE_SECONDS``); a save drops this process's cache on commit.
"""

from __future__ import annotations

from django.db import transaction

from .endpoints.validation import model_id
from .models import AgentRoute, FallbackRule, ModelAlias, ModelFallback, ModelPrice
from .selectors import price_cache_clear, routes_uncached


class TierError(ValueError):
    """A rule that cannot be saved as given; the message says which field and why."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


def _on_sale(model: str) -> ModelPrice | None:
    """The current price of ``model``'s first upstream, read now (not from the proxy's cache)."""
    routes = routes_uncached(model)
    return routes[0].price if routes else None


def _per_token(price: ModelPrice):
    return price.prompt + price.completion


def _alias_model(name: str, *, exclude: int | None = None) -> str | None:
    return ModelAlias.objects.filter(name=name).exclude(pk=exclude).values_list("model", flat=True).first()


def _model_check(field: str, model: str, *, exclude_alias: int | None = None) -> ModelPrice:
    if not model_id(model):
        raise TierError(field, "a model id is a short printable name without surrounding spaces")
    if _alias_model(model, exclude=exclude_alias) is not None:
        raise TierError(field, f"`{model}` is an alias: name the model in the price table it stands for")
    price = _on_sale(model)
    if price is None:
        raise TierError(field, f"`{model}` is not a model on sale (Admin → Proxy → Model prices)")
    return price


def _fallback_check(rule: FallbackRule, name: str, model: str, price: ModelPrice, exclude_alias=None) -> None:
    """``rule``'s fallback and threshold, for ``name`` (an alias or a model) served by ``model``."""
    if rule.fallback_below is not None and rule.fallback_below < 0:
        raise TierError("fallback_below", "the threshold cannot be negative")
    if not rule.fallback:
        if rule.fallback_below is not None:
            raise TierError("fallback_below", "a threshold needs a fallback to fall back to")
        return
    if rule.fallback == name:
        raise TierError("fallback", "a fallback cannot be the model (or alias) itself")
    if not model_id(rule.fallback):
        raise TierError("fallback", "a model id is a short printable name without surrounding spaces")
    target = _alias_model(rule.fallback, exclude=exclude_alias) or rule.fallback
    if target == model:
        raise TierError("fallback", f"`{rule.fallback}` is served by `{model}` itself: that is no fallback")
    cheaper = _on_sale(target)
    if cheaper is None:
        raise TierError("fallback", f"`{target}` is not a model on sale (Admin → Proxy → Model prices)")
    if _per_token(cheaper) >= _per_token(price):
        raise TierError(
            "fallback",
            f"`{rule.fallback}` costs {_per_token(cheaper)} USD per 1M prompt + completion tokens, "
            f"no less than `{model}` at {_per_token(price)}: a fallback must be cheaper",
        )


def alias_validate(row: ModelAlias) -> None:
    """Raise ``TierError`` (naming the field) unless ``row`` can be saved."""
    if not model_id(row.name):
        raise TierError("name", "an alias is a short printable name without surrounding spaces")
    if row.name == row.model:
        raise TierError("model", "an alias cannot stand for itself")
    if ModelPrice.objects.filter(model=row.name).exists():
        raise TierError("name", f"`{row.name}` is a model in the price table: an alias would hide it")
    price = _model_check("model", row.model, exclude_alias=row.pk)
    _fallback_check(row, row.name, row.model, price, exclude_alias=row.pk)


def fallback_validate(row: ModelFallback) -> None:
    if not row.fallback:
        raise TierError("fallback", "name the cheaper model (or alias) to fall back to")
    price = _model_check("model", row.model)
    _fallback_check(row, row.model, row.model, price)


def agent_route_validate(row: AgentRoute) -> None:
    if not row.agent or row.agent.strip() != row.agent or not row.agent.isprintable() or len(row.agent) > 200:
        raise TierError("agent", "the agent label is matched exactly: printable, without surrounding spaces")


@transaction.atomic
def alias_save(*, row: ModelAlias) -> ModelAlias:
    alias_validate(row)
    row.full_clean()
    row.save()
    transaction.on_commit(price_cache_clear)
    return row


@transaction.atomic
def fallback_save(*, row: ModelFallback) -> ModelFallback:
    fallback_validate(row)
    row.full_clean()
    row.save()
    transaction.on_commit(price_cache_clear)
    return row


@transaction.atomic
def agent_route_save(*, row: AgentRoute) -> AgentRoute:
    agent_route_validate(row)
    row.full_clean()
    row.save()
    transaction.on_commit(price_cache_clear)
    return row


@transaction.atomic
def tier_delete(*, row: ModelAlias | ModelFallback | AgentRoute) -> None:
    row.delete()
    transaction.on_commit(price_cache_clear)
