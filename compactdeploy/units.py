"""Sizes as people read them, one style everywhere (reports, summaries, budget errors)."""

from __future__ import annotations


def format_size(n: float) -> str:
    """Bytes in binary units, as memory is counted: ``512 B``, ``1.5 KiB``, ``40.0 MiB``.

    ``--memory-budget`` reads both styles (40MB is 40e6 bytes, 40MiB is 40 x 2**20).
    """
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"
