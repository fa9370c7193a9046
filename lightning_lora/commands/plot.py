"""``python -m lightning_lora plot <run dir>``: the logged curves as one PNG, for those without TensorBoard's UI.

Reads the TensorBoard event files a fit wrote (Lightning's default logger; the run summary names the folder) with
TensorBoard's ``EventAccumulator``, and draws one panel per metric family: training loss, validation loss and
perplexity, tokens/s, learning rate per optimizer group. ``<run dir>`` may be a ``version_N`` folder or any folder
above one (the newest folder holding event files is used). The PNG goes to ``<that folder>/curves.png`` unless
``--out`` says otherwise. Needs ``tensorboard`` and ``matplotlib``.

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
    ("tokens/s", ("tokens_per_s",)),
    ("learning rate", ("lr-",)),
)


def find_run(path: str | Path) -> Path:
    """The newest folder at or under ``path`` that holds TensorBoard event files."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist. Give the run folder the fit's summary names (logs ...).")
    events = sorted(path.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not events:
        raise FileNotFoundError(
            f"{path} holds no TensorBoard event files. Fit with `tensorboard` installed (Lightning's default logger "
            "then writes them) and give the folder the run summary names."
        )
    return events[-1].parent


def read_scalars(run: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every scalar in the run folder's event files."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as err:
        raise ImportError("plot needs tensorboard to read the logs. Install it: pip install tensorboard") from err
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags().get("scalars", [])}


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the curves of ``run_dir`` as a PNG; return its path."""
    run = find_run(run_dir)
    scalars = read_scalars(run)
    panels = [(title, {t: v for t, v in scalars.items() if t.startswith(prefixes)}) for title, prefixes in PANELS]
    panels = [(title, series) for title, series in panels if series]
    if not panels:
        raise ValueError(f"{run} has event files but no training metrics in them (tags: {sorted(scalars) or 'none'}).")
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
            ax.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3, label=tag)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
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
