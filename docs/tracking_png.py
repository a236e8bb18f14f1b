"""Render a run's TensorBoard scalars (and its last completions table) into one PNG, as docs/tracking.png was made.

    budgetthink rl --config recipes/tiny-countdown-grpo.yaml --out runs/shot --report-to tensorboard ...
    python docs/tracking_png.py runs/shot docs/tracking.png

It reads OUT/tracking/tensorboard with TensorBoard's own EventAccumulator (what `tensorboard --logdir` shows)
and draws each tag as TensorBoard's scalars tab does: the raw values faint, the smoothed curve on top
(TensorBoard's debiased exponential moving average, smoothing 0.6). It is a rendering of the event files,
not a screenshot of the TensorBoard web page (no browser runs here).
"""

import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TAGS = ["reward", "eval_accuracy", "completions/mean_length", "entropy", "frac_reward_zero_std", "grad_norm"]
SMOOTHING = 0.6  # TensorBoard's default
COLOR = "#ff7043"  # TensorBoard's first run colour


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased for its zero start."""
    out, last = [], 0.0
    for i, v in enumerate(values):
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight ** (i + 1)))
    return out


def main(run: Path, png: Path) -> None:
    ea = EventAccumulator(str(run / "tracking" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    tags = [t for t in TAGS if t in ea.Tags()["scalars"]]
    fig = plt.figure(figsize=(13, 8.4))
    grid = fig.add_gridspec(3, 3, height_ratios=[1, 1, 0.62])
    for i, tag in enumerate(tags):
        ax = fig.add_subplot(grid[i // 3, i % 3])
        steps, values = zip(*[(e.step, e.value) for e in ea.Scalars(tag)])
        ax.plot(steps, values, color=COLOR, alpha=0.25, lw=1)
        ax.plot(steps, smooth(list(values)), color=COLOR, lw=1.8, marker="o" if len(steps) < 10 else None, ms=3)
        ax.set_title(tag, loc="left", fontsize=10)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("step", fontsize=8)
    has_table = "completions/text_summary" in ea.Tags()["tensors"]
    texts = ea.Tensors("completions/text_summary") if has_table else []
    if texts:
        last = texts[-1]
        rows = last.tensor_proto.string_val[0].decode().splitlines()
        ax = fig.add_subplot(grid[2, :])
        ax.axis("off")
        ax.set_title(f"completions (text tab), step {last.step}: prompt | completion | reward | correct",
                     loc="left", fontsize=10)
        shown = [textwrap.shorten(r.replace("<br> |", " |").replace("<br>", " / "), 150) for r in rows[2:9]]
        ax.text(0, 1, "\n".join(shown), va="top", family="monospace", fontsize=7.5, transform=ax.transAxes)
    fig.suptitle(f"{run.name}: scalars read from its TensorBoard event files "
                 f"(faint: raw, bold: smoothed {SMOOTHING})", fontsize=11)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
