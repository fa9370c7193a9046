"""The load other processes put on the machine (core/cpu_load.py) and the fit's thread count that follows it
(train/cpu_threads.py). A real busy process must count, this process's own busy threads must not."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

from lightning_lora.core.cpu_load import Sample, machine_busy_seconds, others_cores, others_now
from lightning_lora.train import cpu_threads
from lightning_lora.train.cpu_threads import FollowLoad

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")


def test_busy_seconds_of_a_proc_stat_line():
    # user nice system idle iowait irq softirq steal guest guest_nice, in ticks of 1/100 s
    line = "cpu  1000 20 300 5000 400 6 7 8 90 0"
    assert machine_busy_seconds(line, 100) == pytest.approx((1000 + 20 + 300 + 6 + 7) / 100)  # no idle, iowait, steal


def test_others_are_the_machine_less_this_process():
    before, after = Sample(10.0, 100.0, 5.0), Sample(12.0, 104.5, 7.0)  # 2 s: machine 4.5 CPU s, ours 2 CPU s
    assert others_cores(before, after) == pytest.approx(1.25)
    assert others_cores(before, Sample(12.0, 101.0, 7.0)) == 0.0  # clock skew never gives a negative load


@linux
def test_a_busy_process_counts_and_our_own_busy_thread_does_not():
    quiet = others_now(0.5)
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        ours_busy = others_now(0.5)
    finally:
        stop.set()
        spinner.join()
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        theirs_busy = others_now(0.5)
    finally:
        neighbour.kill()
        neighbour.wait()
    assert ours_busy - quiet < 0.5  # our own spinning thread is ours
    assert theirs_busy - quiet > 0.5  # a neighbour spinning on one core is about one more core busy


def test_follow_load_uses_the_cores_left_free(monkeypatch):
    """Samples every 3 s: a neighbour takes one of 2 cores, then stops; the count goes 2 -> 1 -> 2."""
    samples = iter([Sample(0.0, 0.0, 0.0), Sample(1.0, 2.0, 1.0),  # 1 s: too soon, skipped
                    Sample(3.0, 6.0, 3.0),  # 3 s: machine 6 CPU s, ours 3 -> others 1 core
                    Sample(6.0, 9.0, 6.0)])  # machine 3, ours 3 -> others 0
    monkeypatch.setattr(cpu_threads, "sample", lambda: next(samples))
    counts = []
    monkeypatch.setattr(torch, "set_num_threads", counts.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: counts[-1] if counts else 2)
    callback = FollowLoad(cores=2)
    trainer = type("T", (), {"strategy": type("S", (), {"root_device": torch.device("cpu")})()})()
    callback.on_train_start(trainer, None)
    for step in range(3):
        callback.on_train_batch_end(trainer, None, None, None, step)
    assert counts == [1, 2]
    callback.on_train_end(trainer, None)
    callback.on_train_batch_end(trainer, None, None, None, 3)  # after the fit: nothing more
    assert counts == [1, 2]
