"""Human-readable figures for summaries."""

from __future__ import annotations

import datetime as _dt
import functools


def human_bytes(n: float) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    value = float(n)
    for unit in units:
        if abs(value) < 1024 or unit == units[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


@functools.lru_cache(maxsize=1024)  # a listing of versions names a few ingests many times
def utc_stamp(ns: int) -> str:
    """20261121T101502Z: the server's ingest time in names and listings."""
    d = _dt.datetime.fromtimestamp(ns / 1e9, _dt.UTC)  # formatted by hand: strftime is 3x slower
    return f"{d.year:04d}{d.month:02d}{d.day:02d}T{d.hour:02d}{d.minute:02d}{d.second:02d}Z"


def utc_iso(ns: int) -> str:
    d = _dt.datetime.fromtimestamp(ns / 1e9, _dt.UTC)
    return f"{d.year:04d}-{d.month:02d}-{d.day:02d} {d.hour:02d}:{d.minute:02d}:{d.second:02d} UTC"


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"
