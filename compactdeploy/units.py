"""Sizes as people read them, one style everywhere (reports, summaries, budget errors)."""

from __future__ import annotations


def format_size(n: float) -> str:
    """Bytes in binary units, as memory is counted: ``512 B``, ``1.5 KiB``, ``40.0 MiB``.

    ``--memory-budget`` reads both styles (40MB is 40e6 bytes, 40MiB is 40 x 2**20).
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
