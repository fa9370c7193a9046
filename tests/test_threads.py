"""CPU threads of the commands (commands/threads.py): what is set, when, and that torch runs with it."""

import os
import subprocess
import sys

import pytest

from lightning_lora.commands.threads import SPINCOUNT, apply_for_commands, cpu_settings, is_command


def test_settings_fill_only_what_the_environment_lacks():
    assert cpu_settings({}, 2) == {"OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": str(SPINCOUNT)}
    assert cpu_settings({"OMP_NUM_THREADS": "1"}, 8) == {"GOMP_SPINCOUNT": str(SPINCOUNT)}
    assert cpu_settings({"OMP_WAIT_POLICY": "ACTIVE"}, 4) == {"OMP_NUM_THREADS": "4"}  # the user's policy stands
    assert cpu_settings({"GOMP_SPINCOUNT": "0", "OMP_NUM_THREADS": "3"}, 4) == {}
    assert cpu_settings({"LIGHTNING_LORA_THREADS": "keep"}, 4) == {}
    # the cores other processes leave free: 2 cores, one busy neighbour -> 1 thread; never fewer than 1
    assert [cpu_settings({}, cores, others)["OMP_NUM_THREADS"] for cores, others in
            ((2, 1.0), (2, 0.4), (2, 3.0), (16, 3.2))] == ["1", "2", "1", "13"]  # fmt: skip


def test_only_commands_count_as_commands():
    assert apply_for_commands() == {}  # pytest imported lightning_lora: the Python API changes nothing
    assert is_command(["python", "-m", "lightning_lora", "fit"], "")
    assert is_command(["python", "-mlightning_lora.commands.threads"], "")
    assert is_command(["python3"], "/usr/bin/lightning-lora")
    assert not is_command(["python", "-m", "pytest", "-m", "lightning_lora"], "")  # the first -m decides
    assert not is_command(["python", "train.py"], "train.py")


@pytest.mark.slow
def test_a_command_runs_torch_with_them():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-W", "ignore::RuntimeWarning", "-m", "lightning_lora.commands.threads"],
                         env=env, capture_output=True, text=True, check=True).stdout
    # all the usable cores, less those other processes keep busy at the start (test_cpu_load.py measures that part)
    assert f"'GOMP_SPINCOUNT': '{SPINCOUNT}'" in out and 1 <= int(out.split()[-1]) <= len(os.sched_getaffinity(0))
