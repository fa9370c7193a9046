"""plot: steps on the x axis as optimizer steps done (ending at the last one), every point drawn on short runs, no
panel for a constant learning rate, and folders of failed runs (no metrics) skipped."""

import time

import pytest

from lightning_lora.commands.plot import find_run, plot, read_scalars, steps_done


def _write(folder, scalars):
    """Event files as Lightning writes them: (tag, logged step, value), in this order of wall time."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    t = 1000.0
    for tag, step, value in scalars:
        t += 1
        writer.add_scalar(tag, value, step, walltime=t)
    writer.close()


def _run(folder, steps=6):
    # validation before training (logged at 0), then per step: train_loss and lr under the steps done before it,
    # and validations after steps 3 and 6 under 2 and 5 (Lightning's numbering)
    events = [("val_loss", 0, 3.0)]
    for s in range(steps):
        events += [("train_loss", s, 3.0 - 0.1 * s), ("lr-AdamW", s, 1e-3)]
        if s in (2, 5):
            events.append(("val_loss", s, 2.9 - 0.1 * s))
    _write(folder, events)


def test_steps_are_optimizer_steps_done_and_the_axis_ends_at_the_last(tmp_path):
    _run(tmp_path / "version_0")
    scalars = steps_done(read_scalars(tmp_path / "version_0"))
    assert [s for s, _ in scalars["train_loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in scalars["val_loss"]] == [0, 3, 6]  # before training stays at 0
    assert plot(tmp_path / "version_0", tmp_path / "c.png").stat().st_size > 0


def test_axis_limits_and_constant_lr_note(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    _run(tmp_path / "version_0")
    plot(tmp_path / "version_0", tmp_path / "c.png")
    axes = figures[0].axes
    assert [a.get_title() for a in axes] == ["training loss (constant learning rate: AdamW 0.001)", "validation loss"]
    low, high = axes[-1].get_xlim()
    assert low < 0 < 6 < high < 6.5  # from before training to the last step, no step beyond
    assert [list(line.get_xdata()) for line in axes[0].lines] == [[1, 2, 3, 4, 5, 6]]
    assert all(line.get_marker() == "o" for a in axes for line in a.lines)  # every point drawn on a short run


def test_folders_of_failed_runs_are_skipped(tmp_path):
    _run(tmp_path / "lightning_logs" / "version_0")
    time.sleep(0.05)
    _write(tmp_path / "lightning_logs" / "version_1", [("hp_metric", 0, -1.0)])  # a run that failed before step 1
    (tmp_path / "lightning_logs" / "version_2").mkdir()  # and one that left nothing
    assert find_run(tmp_path) == tmp_path / "lightning_logs" / "version_0"
    with pytest.raises(ValueError, match="hold no training metrics"):
        find_run(tmp_path / "lightning_logs" / "version_1")
