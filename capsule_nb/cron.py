"""Cron expressions, pure: parse, time zone, next fire time, and the DST rule.

croniter yields a fixed wall time twice in a fall-back hour; a job whose hour
field names hours (``2``, ``1,13``, ``9-17``: no ``*`` or step) fires only at
its first occurrence, as cron runs such a job once. A time skipped by a
spring-forward is shifted by croniter and fires once. Six fields put the
seconds last (croniter's rule): ``"* * * * * */2"`` is every two seconds.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo

from croniter import CroniterBadDateError, croniter


_JENKINS = re.compile(r"H(\(\d+-\d+\))?(/\d+)?")  # H, H(0-29), H/15: croniter wants a hash_id for them


def parse_cron(cron: str) -> str:
    """The cron string, checked: 5 fields, or 6 with seconds last."""
    if not isinstance(cron, str):
        raise TypeError(f"a cron schedule is a string like '*/5 * * * *', not {cron!r}")
    fields = cron.split()
    if len(fields) not in (5, 6):
        raise ValueError(f"bad cron {cron!r}: expected 5 fields (minute hour day month weekday) or 6 (seconds last)")
    if any(_JENKINS.fullmatch(part) for field in fields for part in field.split(",")):
        raise ValueError(f"bad cron {cron!r}: H (Jenkins' hashed value) is not cron; write the minute or hour itself")
    try:
        croniter(cron)
    except Exception as exc:  # croniter's errors say which field
        raise ValueError(f"bad cron {cron!r}: {exc}") from None
    try:  # each field can be right and the date still never come: "0 0 30 2 *"
        croniter(cron, dt.datetime.now(dt.timezone.utc)).get_next(dt.datetime)
    except CroniterBadDateError:
        raise ValueError(f"bad cron {cron!r}: it never fires (no date matches its day and month)") from None
    return " ".join(fields)


def parse_tz(tz: str) -> zoneinfo.ZoneInfo:
    if not isinstance(tz, str):
        raise TypeError(f"tz is the name of a time zone, such as 'UTC' or 'Europe/Paris', not {tz!r}")
    try:
        return zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
        raise ValueError(f"unknown time zone {tz!r}: use an IANA name such as 'UTC' or 'Europe/Paris'") from None


def next_due(cron: str, tz: zoneinfo.ZoneInfo, after: dt.datetime) -> dt.datetime:
    """The first fire time of ``cron`` in ``tz`` strictly after ``after``."""
    return _due(cron, tz, after, forward=True)


def last_due(cron: str, tz: zoneinfo.ZoneInfo, before: dt.datetime) -> dt.datetime:
    """The last fire time of ``cron`` in ``tz`` strictly before ``before`` (the one that
    stepping ``next_due`` up to ``before`` would reach last), in one step however far back."""
    return _due(cron, tz, before, forward=False)


def _due(cron: str, tz: zoneinfo.ZoneInfo, start: dt.datetime, *, forward: bool) -> dt.datetime:
    fixed_hour = not any(c in cron.split()[1] for c in "*/")
    it = croniter(cron, start.astimezone(tz))
    while True:
        due: dt.datetime = it.get_next(dt.datetime) if forward else it.get_prev(dt.datetime)
        if fixed_hour and _second_of_repeated_hour(due):
            continue  # the fall-back hour repeats 01:30; a daily job runs at the first one
        return due


def _second_of_repeated_hour(moment: dt.datetime) -> bool:
    """True for the second occurrence of a wall time that a fall-back hour repeats."""
    return moment.replace(fold=0).utcoffset() != moment.utcoffset()

