"""Slurm's walltime formats, parsed and printed (no Slurm needed)."""

from __future__ import annotations

import re

_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
_PATTERN = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_time(value: str | int) -> int:
    """Seconds in a Slurm time string. Raises ValueError naming the accepted formats."""
    text = str(value).strip()
    match = _PATTERN.match(text)
    if not match:
        raise ValueError(f"{value!r} is not a Slurm time ({_FORMATS})")
    days, first, second, third = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
        total = int(days) * 86400 + hours * 3600 + minutes * 60 + seconds
    elif third is not None:  # HH:MM:SS
        total = int(first) * 3600 + int(second) * 60 + int(third)
    elif second is not None:  # MM:SS
        total = int(first) * 60 + int(second)
    else:  # MM
        total = int(first) * 60
    if total <= 0:
        raise ValueError(f"{value!r} is not a positive walltime")
    return total


def format_time(seconds: int) -> str:
    """Seconds as Slurm's D-HH:MM:SS (or HH:MM:SS under a day)."""
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{clock}" if days else clock
