"""Cron expressions and time zones of schedules, with croniter (five fields, or ``@hourly`` ... ``@yearly``)
and the IANA zones of :mod:`zoneinfo`: what is valid, and when a schedule runs next.

Times come in and go out naive UTC, as the store keeps them (:func:`gpulab.service.storage.utcnow`); the cron
expression is read in the schedule's own zone, so ``0 9 * * 1-5`` is nine o'clock there, summer and winter.
"""

from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

ALIASES = ("@hourly", "@daily", "@weekly", "@monthly", "@yearly", "@annually", "@midnight")


def cron_error(expression: str) -> str | None:
    """Why ``expression`` is not a schedule's cron expression, or None."""
    fields = expression.split()
    if len(fields) == 1 and fields[0].startswith("@"):
        return None if fields[0] in ALIASES else f"{fields[0]} is not one of {', '.join(ALIASES)}"
    if len(fields) != 5:
        return "must have five fields (minute hour day-of-month month day-of-week), e.g. '0 3 * * *'"
    from croniter import croniter  # gpulab[hub]'s: the job models are also read where no schedule runs

    if not croniter.is_valid(" ".join(fields)):
        return f"'{expression}' is not a valid cron expression"
    return None


def timezone_error(name: str) -> str | None:
    """Why ``name`` is not an IANA time zone here, or None."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return f"'{name}' is not an IANA time zone (e.g. UTC, Europe/Berlin, America/New_York)"
    return None


def next_run(expression: str, timezone: str, after: datetime) -> datetime:
    """The first time after ``after`` (naive UTC) that ``expression`` gives in ``timezone``, naive UTC."""
    from croniter import croniter

    zone = ZoneInfo(timezone)
    start = after.replace(tzinfo=UTC).astimezone(zone)
    due = croniter(expression, start).get_next(datetime)
    return due.astimezone(UTC).replace(tzinfo=None)


def runs_until(expression: str, timezone: str, first: datetime, until: datetime, limit: int) -> list[datetime]:
    """``first`` and the times after it that ``expression`` gives up to ``until`` (naive UTC), at most ``limit``."""
    from croniter import croniter

    zone = ZoneInfo(timezone)
    times = [first]
    series = croniter(expression, first.replace(tzinfo=UTC).astimezone(zone))
    while len(times) < limit and (later := series.get_next(datetime).astimezone(UTC).replace(tzinfo=None)) <= until:
        times.append(later)
    return times
