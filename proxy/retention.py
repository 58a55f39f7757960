"""Retention of raw usage records: ``manage.py prune_usage`` deletes those older than a window.

What stays: the ledger (every charge is its usage entry, whose ``reference`` is the request id
and whose description names the model), and whatever the usage rollups hold. What goes: the
per-request detail (tokens, latency, prices used) of requests older than the window. Records still
``pending`` — a request in flight, or one ``reconcile_holds`` has yet to close — are never pruned,
however old. Nothing references a usage record by key (holds and entries name the request id), so
a delete cascades nowhere.

Deletes go in batches, each its own short transaction found through the ``created_at`` index, so
the proxy's inserts never wait long behind a prune and a stopped prune loses nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from django.db import transaction

from .models import UsageRecord, UsageStatus


@dataclass(frozen=True)
class Pruned:
    deleted: int  # records deleted (with ``dry_run``: that would be)
    batches: int


def prunable(*, before: datetime):
    """The records a prune at ``before`` removes: created before it and no longer pending."""
    return UsageRecord.objects.filter(created_at__lt=before).exclude(status=UsageStatus.PENDING)


def usage_prune(
    *, before: datetime, batch_size: int, dry_run: bool = False, progress: Callable[[int, int], None] | None = None
) -> Pruned:
    """Delete the ``prunable`` records, oldest first, ``batch_size`` at a time; ``progress(batch,
    deleted so far)`` after each batch. ``dry_run`` counts them and deletes nothing."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if dry_run:
        return Pruned(deleted=prunable(before=before).count(), batches=0)
    deleted = batches = 0
    while True:
        with transaction.atomic(durable=True):
            ids = list(prunable(before=before).order_by("created_at", "id").values_list("id", flat=True)[:batch_size])
            if ids:
                # Re-checked in the DELETE itself: a record cannot become pending again, but the
                # condition costs nothing and keeps the rule in the statement that acts on it.
                count, _ = prunable(before=before).filter(pk__in=ids).delete()
                deleted += count
        if not ids:
            break
        batches += 1
        if progress is not None:
            progress(batches, deleted)
        if len(ids) < batch_size:
            break
    return Pruned(deleted=deleted, batches=batches)
