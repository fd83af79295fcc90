"""Per-person and per-phone limits: one atomic decision each (see QuotaStore.take_quota_slot).

A quota's slots are keyed by a keyed hash of its kind and subject, never the subject itself, so
the quota table holds no phone number or person identifier, and kinds never share slots.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from server.union.domain.ports import QuotaStore
from server.union.keyring import Keys


async def take_quota(
    store: QuotaStore,
    keys: Keys,
    kind: str,
    subject: str,
    limit: int,
    window: timedelta,
    now: datetime,
) -> timedelta | None:
    """Take one of `subject`'s `limit` slots of `kind` for `window`: None when within the limit,
    else how long until a slot frees."""
    key = keys.attribute_hash("quota", f"{kind}:{subject}")
    return await store.take_quota_slot(key, limit, window, now)
