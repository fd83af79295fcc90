"""When reports expire: at the end of the Nth natural day after generation, local calendar."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

DEFAULT_TIMEZONE = "Asia/Shanghai"
DEFAULT_RETENTION_DAYS = 7


def report_expire_time(
    generated: datetime, timezone: str = DEFAULT_TIMEZONE, days: int = DEFAULT_RETENTION_DAYS
) -> datetime:
    """A report generated on local day D is served through the whole of day D+days, and no later.

    Generated 2026-11-27 15:00 in Shanghai → expires 2026-12-05 00:00 Shanghai time
    (the end of 2026-12-04, the 7th natural day after the 27th).
    """
    zone = ZoneInfo(timezone)
    local_day = generated.astimezone(zone).date()
    end = datetime.combine(local_day + timedelta(days=days + 1), time(0), tzinfo=zone)
    return end.astimezone(UTC)
