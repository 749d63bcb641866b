"""Parsing of the human delays that ``schedule`` accepts ("30s", "10 minutes", "every 5m").

The words are the Capsule SDK's (one number, one unit, any case), plus a
decimal number ("0.5s"), which the SDK does not take.
"""

from __future__ import annotations

import datetime as dt
import math
import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DELAY = re.compile(r"(\d+(?:\.\d+)?)\s*(d|days?|h|hr|hours?|m|mins?|minutes?|s|secs?|seconds?)")
_EVERY = re.compile(r"(?:repeat\s+)?every\b", re.IGNORECASE)
# What the SDK reads: its regex, on the stripped lower-cased text (whole numbers only), after
# "every " or "repeat every " (one space each: the SDK cuts those prefixes, as written).
_CAPSULE_DELAY = re.compile(r"(repeat every |every )?\d+\s*(d|days?|h|hr|hours?|m|mins?|minutes?|s|secs?|seconds?)")
MIN_INTERVAL = 1.0  # seconds between repeats: as often as a cron seconds field allows, never a busy loop
MAX_DELAY = 100 * 365.25 * 86400  # 100 years: more is a typo, and its date no longer fits a datetime


def parse_delay(value: object, *, what: str = "delay") -> float:
    """Seconds from "30s" / "10 minutes" / "2hr" / "1 day", a number of seconds or a timedelta.

    Compound forms such as "1h30m" are refused rather than half-read: a
    schedule that silently runs at the wrong time is worse than an error.
    """
    if isinstance(value, dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DELAY.fullmatch(value.strip().lower())
        if not match:
            raise ValueError(
                f"bad {what} {value!r}: use a number with one unit, like '30s', '5m', '2h', '1d' or '10 minutes'"
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2)[0]]
    else:
        raise TypeError(f"bad {what} {value!r}: expected a string like '5m', seconds or a timedelta")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"bad {what} {value!r}: must be zero or more seconds")
    if seconds > MAX_DELAY:
        raise ValueError(f"bad {what} {value!r}: at most 100 years")
    return seconds


def only_here(delay: object) -> bool:
    """Whether a ``schedule`` delay is a capsule_nb extension, for portable mode and ``capsule-nb
    check``: read here, and not by Capsule's SDK, which takes a timedelta or its shorthand
    ("30m", "every 5m"): a number of seconds, a fraction ("1.5h"), "every  5m". A delay neither
    reads is an error, no extension."""
    if delay is None or isinstance(delay, dt.timedelta) \
            or isinstance(delay, str) and _CAPSULE_DELAY.fullmatch(delay.strip().lower()):
        return False
    try:
        parse_when(delay)
    except (TypeError, ValueError):
        return False
    return True


def parse_when(when: object) -> tuple[float | None, float | None]:
    """Split ``schedule(when=...)`` into ``(delay, every)`` seconds ("every 5m" or "repeat every 5m" repeats)."""
    if when is None:
        return None, None
    repeat = _EVERY.match(when.strip()) if isinstance(when, str) else None
    if repeat:
        every = parse_delay(when.strip()[repeat.end():].strip(), what="interval")
        if every < MIN_INTERVAL:
            raise ValueError(f"bad interval {when!r}: repeats must be at least {MIN_INTERVAL:g} s apart")
        return None, every
    return parse_delay(when), None
