"""How busy a machine is while something is timed: other processes' and the hypervisor's share of
its CPU time, from /proc/stat. Sampled on the device (the agent, the tuner's runner); read by the
host's reports and warnings.
"""

from __future__ import annotations

import os

# Other work's share of the machine's CPU time from which a measurement is called busy. TVM puts a
# thread on every core and each parallel loop waits for its slowest, so a little other work slows
# a model a lot (docs/benchmarks/load-effect.json); 15 % leaves room for a device's daemons
BUSY_SHARE = 0.15


def cpu_times() -> tuple[float, float, float, float] | None:
    """CPU seconds since boot over all cores (busy, total, stolen by the hypervisor) and this
    process's own (all its threads); None where there is no /proc/stat (not Linux)."""
    try:
        with open("/proc/stat") as stat:
            # user nice system idle iowait irq softirq steal (guest time is already inside user)
            ticks = [int(value) for value in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(ticks) < 8:
        return None
    tick_s = 1.0 / os.sysconf("SC_CLK_TCK")
    own = os.times()
    total = sum(ticks)
    return ((total - ticks[3] - ticks[4] - ticks[7]) * tick_s, total * tick_s, ticks[7] * tick_s,
            own.user + own.system)


def load_between(start, end) -> dict | None:
    """What else the machine did between two ``cpu_times``: shares of all cores' time.

    ``other_busy``: CPU time other processes used (this process's own subtracted: the model it
    times); ``steal``: time the hypervisor gave to other machines (a shared VM). None: not known.
    """
    if start is None or end is None or end[1] <= start[1]:
        return None
    total = end[1] - start[1]
    other = max(0.0, (end[0] - start[0]) - (end[3] - start[3]))
    return {
        "other_busy": round(min(1.0, other / total), 3),
        "steal": round((end[2] - start[2]) / total, 3),
        "window_s": round(total / (os.cpu_count() or 1), 2),
        "cores": os.cpu_count(),
    }


def taken_share(load: dict) -> float:
    """The share of the machine's CPU time that was not there for us: other processes and steal."""
    return load["other_busy"] + load["steal"]


def is_busy(load: dict | None) -> bool:
    return load is not None and taken_share(load) >= BUSY_SHARE


def describe_load(load: dict) -> str:
    """One phrase for a report or a warning: how busy, and what it does to the figures."""
    stolen = f" and the hypervisor took {load['steal']:.0%} for other machines" if load["steal"] >= 0.01 else ""
    return (f"other work used {load['other_busy']:.0%} of the machine's CPU time{stolen}: "
            "timings are slower and noisier than on an idle machine")
