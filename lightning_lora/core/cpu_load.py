"""How many cores other processes keep busy, from /proc/stat and this process's CPU time (Linux; torch-free, so a
command can ask before torch is imported: ``commands/threads.py``, ``train/cpu_threads.py``).

    others = (machine busy CPU time - this process's CPU time) / wall time

over an interval; this process's own threads, spinning or not, never count.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple


class Sample(NamedTuple):
    wall: float  # seconds, monotonic
    machine_busy: float  # CPU seconds of every process on the machine (non-idle time)
    own: float  # CPU seconds of this process (all its threads)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, so a CPU quota or ``taskset`` is honoured;
    ``os.cpu_count()`` where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def machine_busy_seconds(stat_line: str, ticks_per_second: int) -> float:
    """Non-idle CPU seconds that the machine's processes ran, from the ``cpu`` line of /proc/stat: user, nice,
    system, irq and softirq (guest time is inside user). Idle, iowait and steal (time a hypervisor gave our virtual
    cores to other machines) are left out: only processes beside ours count as neighbours."""
    fields = [int(v) for v in stat_line.split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = (fields + [0] * 7)[:7]
    return (user + nice + system + irq + softirq) / ticks_per_second


def sample() -> Sample | None:
    """The three clocks now, or None where /proc/stat is unreadable (not Linux)."""
    try:
        with open("/proc/stat") as f:
            line = f.readline()
        busy = machine_busy_seconds(line, os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
        return None
    t = os.times()
    return Sample(time.monotonic(), busy, t.user + t.system)


def others_cores(before: Sample, after: Sample) -> float:
    """Cores kept busy by other processes between two samples (the module docstring's ``others``)."""
    wall = after.wall - before.wall
    if wall <= 0:
        return 0.0
    return max(0.0, (after.machine_busy - before.machine_busy) - (after.own - before.own)) / wall


def threads_for(cores: int, others: float, most: int) -> int:
    """``clamp(cores - round(others), 1, most)``."""
    return max(1, min(most, cores - round(others)))


def others_now(seconds: float = 0.1) -> float | None:
    """``others_cores`` over the next ``seconds`` (this process sleeps meanwhile), or None where unknown."""
    before = sample()
    if before is None:
        return None
    time.sleep(seconds)
    after = sample()
    return None if after is None else others_cores(before, after)


__all__ = ["Sample", "machine_busy_seconds", "others_cores", "others_now", "sample", "threads_for", "usable_cores"]
