"""``python -m lightning_lora plot <run dir>``: the logged curves as one PNG, for those without TensorBoard's UI.

Reads the TensorBoard event files a fit wrote (Lightning's default logger; the run summary names the folder) with
TensorBoard's ``EventAccumulator``, and draws one panel per metric family: training loss, validation loss and
perplexity, DPO's rewards, tokens/s, learning rate per optimizer group. ``<run dir>`` may be a ``version_N`` folder
or any folder above one: the newest folder whose event files hold training metrics is used, so the empty folders
that failed runs leave are skipped. The PNG goes to ``<that folder>/curves.png`` unless ``--out`` says otherwise.
Needs ``tensorboard`` and ``matplotlib``.

The x axis counts optimizer steps done: Lightning logs a step's training figures and the validation that follows
it under the number of steps done *before* it, so they are drawn one step later (the run's last step is the axis's
last point); a validation logged before the first training step (``validate_before_fit``) stays at 0. Every point
gets a marker on short runs. A learning rate that never changes gets no panel: its value goes into the training
loss panel's title.

Example::

    python -m lightning_lora plot runs/quickstart/lightning_logs/version_0
"""

from __future__ import annotations

import argparse
from pathlib import Path

PANELS = (  # (title, tag prefixes), in the order drawn
    ("training loss", ("train_loss",)),
    ("validation loss", ("val_loss",)),
    ("validation perplexity", ("val_ppl",)),
    ("DPO reward accuracy", ("reward_accuracy", "val_reward_accuracy")),
    ("DPO reward margin", ("reward_margin", "val_reward_margin")),
    ("tokens/s", ("tokens_per_s",)),
    ("learning rate", ("lr-",)),
)


def _metric_tags(scalars: dict) -> list[str]:
    return [t for t in scalars if any(t.startswith(prefixes) for _, prefixes in PANELS)]


def find_run(path: str | Path) -> Path:
    """The newest folder at or under ``path`` whose TensorBoard event files hold training metrics."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist. Give the run folder the fit's summary names (logs ...).")
    folders = sorted({p.parent for p in path.rglob("events.out.tfevents.*")},
                     key=lambda d: max(p.stat().st_mtime for p in d.glob("events.out.tfevents.*")))  # fmt: skip
    if not folders:
        raise FileNotFoundError(
            f"{path} holds no TensorBoard event files. Fit with `tensorboard` installed (Lightning's default logger "
            "then writes them) and give the folder the run summary names."
        )
    for folder in reversed(folders):  # newest first; a failed run's folder has no metrics
        if _metric_tags(read_scalars(folder)):
            return folder
    raise ValueError(f"{path}: its event files hold no training metrics (runs that failed before their first step "
                     "log none). Give the folder of a run that trained.")


def read_scalars(run: str | Path) -> dict[str, list[tuple[int, float, float]]]:
    """``{tag: [(step, value, wall time), ...]}`` of every scalar in the run folder's event files."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as err:
        raise ImportError("plot needs tensorboard to read the logs. Install it: pip install tensorboard") from err
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)] for tag in acc.Tags().get("scalars", [])}


def steps_done(scalars: dict[str, list[tuple[int, float, float]]]) -> dict[str, list[tuple[int, float]]]:
    """Each metric as ``[(optimizer steps done, value)]``: logged step + 1, except the points logged before the
    first training figure (a validation before training), which stay where they are (module docstring)."""
    train = [w for tag in ("train_loss", "tokens_per_s") for _, _, w in scalars.get(tag, [])]
    first = min(train) if train else float("inf")
    return {tag: [(s + 1 if w >= first else s, v) for s, v, w in points] for tag, points in scalars.items()}


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the curves of ``run_dir`` as a PNG; return its path."""
    run = find_run(run_dir)
    scalars = steps_done(read_scalars(run))
    panels = [(title, {t: v for t, v in scalars.items() if t.startswith(prefixes)}) for title, prefixes in PANELS]
    constant = {t: v[0][1] for title, series in panels if title == "learning rate" for t, v in series.items()
                if len({round(x, 12) for _, x in v}) == 1}  # fmt: skip
    panels = [(title, series) for title, series in panels if series and not (title == "learning rate"
                                                                            and set(series) == set(constant))]
    if constant:
        note = ", ".join(f"{t.removeprefix('lr-')} {v:g}" for t, v in sorted(constant.items()))
        panels = [(f"{title} (constant learning rate: {note})" if title == "training loss" else title, series)
                  for title, series in panels]  # fmt: skip
    if not panels:
        raise ValueError(f"{run} holds no training metrics to draw (tags: {sorted(scalars) or 'none'}).")
    last = max((p[0] for series in scalars.values() for p in series), default=0)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plot needs matplotlib to draw. Install it: pip install matplotlib") from err
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, series) in zip(axes[:, 0], panels):
        for tag, points in sorted(series.items()):
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if last <= 200 else None, markersize=3, label=tag)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator

    axes[-1, 0].set_xlabel("optimizer steps done")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    pad = max(0.2, last / 60)
    axes[-1, 0].set_xlim(-pad, last + pad)  # from before training to the run's last step
    fig.tight_layout()
    out = Path(out) if out is not None else run / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")  # written whole, then renamed: never a half-written PNG
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_lora plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the run's log folder (e.g. runs/quickstart/lightning_logs/version_0)")
    parser.add_argument("--out", help="PNG to write (default: <run folder>/curves.png)")
    args = parser.parse_args(list(argv or [])[1:] if argv and argv[0] == "plot" else argv)
    print(f"curves written to {plot(args.run_dir, args.out)}")


if __name__ == "__main__":
    main()
