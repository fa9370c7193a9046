"""CPU threads for the commands: a thread count and an OpenMP wait policy that hold up when the machine is busy.

torch's CPU kernels run on OpenMP (GNU libgomp in the CPU wheels), which reads its settings once, when torch is
imported. By default it starts one thread per core, and a thread that reaches the end of a parallel region spins
(about 300,000 polls) before it sleeps. When another process takes a core, one of our threads waits for its time
slice while the others spin through theirs: on the 2-core machine of BENCHMARKS.md a QLoRA step of SmolLM2 went
from 1.9 s to 12 s with one busy neighbour process (README, "Threads").

So a command (``python -m lightning_lora ...`` or the ``lightning-lora`` script) sets, before torch is imported and
only where the environment does not set them already:

- ``OMP_NUM_THREADS``: the cores this process may run on (``os.sched_getaffinity``, so a CPU quota or ``taskset``
  is honoured) less those that other processes keep busy (measured over 0.1 s: ``core/cpu_load.py``);
- ``GOMP_SPINCOUNT``: ``SPINCOUNT`` polls before a waiting thread sleeps, short enough that a descheduled neighbour
  costs little, long enough that a quiet machine keeps its speed.

Then ``fit`` follows the load (``train/cpu_threads.py``): between steps it uses only the cores that other processes
leave free, since a thread sharing its core with a busy neighbour slows every parallel region down to its pace.

``lightning_lora/__init__.py`` calls ``apply_for_commands()`` first thing; the Python API (``import lightning_lora``
in your own program) changes nothing. ``LIGHTNING_LORA_THREADS=keep`` leaves OpenMP's defaults.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from lightning_lora.core.cpu_load import others_now, threads_for, usable_cores

SPINCOUNT = 10_000
APPLIED: dict[str, str] = {}  # what apply_for_commands set in this process
KEEP_ENV = "LIGHTNING_LORA_THREADS"
_OURS = ("lightning_lora", "lightning-lora")


def cpu_settings(environ: Mapping[str, str], cores: int, others: float = 0.0) -> dict[str, str]:
    """The variables to set: ``OMP_NUM_THREADS`` (the cores that other processes, keeping ``others`` cores busy,
    leave free; at least 1) and ``GOMP_SPINCOUNT``, each only when ``environ`` lacks it (a given ``OMP_WAIT_POLICY``
    also keeps the spin count as it is); nothing with ``LIGHTNING_LORA_THREADS=keep``."""
    if keeps(environ):
        return {}
    out = {}
    if "OMP_NUM_THREADS" not in environ:
        out["OMP_NUM_THREADS"] = str(threads_for(max(1, cores), others, max(1, cores)))
    if "GOMP_SPINCOUNT" not in environ and "OMP_WAIT_POLICY" not in environ:
        out["GOMP_SPINCOUNT"] = str(SPINCOUNT)
    return out


def keeps(environ: Mapping[str, str]) -> bool:
    """``LIGHTNING_LORA_THREADS=keep``: OpenMP's own defaults, nothing set or followed."""
    return environ.get(KEEP_ENV, "").strip().lower() == "keep"


def is_command(orig_argv: list[str] | None = None, argv0: str | None = None) -> bool:
    """True in ``python -m lightning_lora[.x] ...`` and in the ``lightning-lora`` script, False elsewhere."""
    orig_argv = list(getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv)
    for i, arg in enumerate(orig_argv):
        module = orig_argv[i + 1] if arg == "-m" and i + 1 < len(orig_argv) else arg[2:] if arg.startswith("-m") else None
        if module is not None:
            return module.split(".")[0] in _OURS
    argv0 = (sys.argv[0] if sys.argv else "") if argv0 is None else argv0
    return Path(argv0).name in _OURS


def apply_for_commands() -> dict[str, str]:
    """In a command, set ``cpu_settings`` in ``os.environ`` (before torch is imported); return what was set."""
    if not is_command():
        return {}
    busy = others_now(0.1) if "OMP_NUM_THREADS" not in os.environ and not keeps(os.environ) else None
    settings = cpu_settings(os.environ, usable_cores(), busy or 0.0)
    os.environ.update(settings)
    APPLIED.update(settings)
    return settings


def follows_load() -> bool:
    """Whether a fit should follow the machine's load (``train/cpu_threads.py``): the command chose the thread count
    itself (the environment gave no ``OMP_NUM_THREADS``)."""
    return "OMP_NUM_THREADS" in APPLIED


if __name__ == "__main__":  # python -m lightning_lora.commands.threads: what a command runs with
    import torch

    print({k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")},
          "torch threads", torch.get_num_threads())
