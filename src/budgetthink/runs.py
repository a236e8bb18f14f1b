"""Several runs side by side, for the user without a tracker: `budgetthink runs compare DIR [DIR ...]`.

    result = compare([Path("runs/grpo"), Path("runs/dr_grpo")], png=Path("compare.png"))

Each DIR is a directory `budgetthink rl` or `budgetthink sft` wrote. The table (stdout) has a row per run:
its kind (the RL algorithm, or sft), steps, the last logged value of each metric, its wall time and cost
(its own ledger.jsonl); the PNG has a panel per metric with a line per run. RL's evaluation before training
(step 0) is only in eval.jsonl, so it is read from there. Metrics: `--metrics a,b` or those of METRICS that
any run logged.
"""

import json
from pathlib import Path

import numpy as np
import yaml

from budgetthink.errors import UserError
from budgetthink.jsonl import read_jsonl

METRICS = ["reward_mean", "accuracy", "eval_accuracy", "response_len_mean", "kl", "entropy", "loss", "grad_norm"]


def load(run: Path) -> dict:
    """A run's records (step 0's held-out evaluation first when there is one), kind and own bill."""
    from budgetthink.bill import make_bill as bill
    from budgetthink.ledger import LEDGER_FILE

    run = Path(run)
    if not (run / "metrics.jsonl").is_file():
        raise UserError(f"{run}: no metrics.jsonl; pass directories written by `budgetthink rl` or `budgetthink sft`")
    records = read_jsonl(run / "metrics.jsonl")
    start = [e for e in read_jsonl(run / "eval.jsonl") if e["step"] == 0] if (run / "eval.jsonl").is_file() else []
    if start:  # one line per evaluation budget: their mean, as the loop's own eval_* fields are
        records = [{"step": 0, **{f"eval_{k}": float(np.mean([e[k] for e in start])) for k in ("accuracy", "reward")}},
                   *records]
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    total = bill([run], follow_models=False)["total"] if (run / LEDGER_FILE).is_file() else None
    return {"run": str(run), "kind": cfg.get("algorithm") or cfg.get("stage") or "?", "records": records,
            "steps": max((r.get("step", 0) for r in records), default=0),
            "wall_s": total["wall_s"] if total else None,
            "cost": total["cost"] if total and not total["unpriced_lines"] else None}


def last(records: list[dict], key: str):
    """The last value a run logged for `key` (None if it never did)."""
    return next((r[key] for r in reversed(records) if r.get(key) is not None), None)


def plot(runs: list[dict], metrics: list[str], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, metrics):
        for r in runs:
            pts = [(x["step"], x[key]) for x in r["records"] if x.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 40 else None, label=r["run"])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def compare(dirs: list[Path], png: Path, metrics: list[str] | None = None, as_json: bool = False) -> dict:
    """Print the table of the runs in `dirs` (or JSON) and write the PNG; returns what was printed."""
    if not dirs:
        raise UserError("no run directories; pass one or more, e.g. budgetthink runs compare runs/a runs/b")
    runs = [load(d) for d in dirs]
    logged = {k for r in runs for x in r["records"] for k, v in x.items() if v is not None}
    if metrics:
        missing = [m for m in metrics if m not in logged]
        if missing:
            raise UserError(f"no run logged {', '.join(missing)}; metrics they logged: "
                            f"{', '.join(sorted(logged - {'step'}))}")
    else:
        metrics = [m for m in METRICS if m in logged]
    if not metrics:
        raise UserError(f"none of {', '.join(METRICS)} was logged; pass --metrics with some of: "
                        f"{', '.join(sorted(logged - {'step'}))}")
    table = [{"run": r["run"], "kind": r["kind"], "steps": r["steps"],
              **{m: last(r["records"], m) for m in metrics}, "wall_s": r["wall_s"], "cost": r["cost"]} for r in runs]
    result = {"metrics": metrics, "runs": table, "png": str(plot(runs, metrics, png))}
    if as_json:
        print(json.dumps(result))
    else:
        _print(table, metrics, result["png"])
    return result


def _print(table: list[dict], metrics: list[str], png: str) -> None:
    from rich.console import Console
    from rich.table import Table

    fmt = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    t = Table(title="runs compared (last logged value of each metric)")
    for col in ["run", "kind", "steps", *metrics, "wall", "cost"]:
        t.add_column(col, justify="left" if col in ("run", "kind") else "right", no_wrap=col == "run")
    for row in table:
        wall = "-" if row["wall_s"] is None else f"{row['wall_s'] / 60:.1f} min"
        cost = "-" if row["wall_s"] is None else "unpriced" if row["cost"] is None else f"${row['cost']:.2f}"
        t.add_row(row["run"], row["kind"], str(row["steps"]), *[fmt(row[m]) for m in metrics], wall, cost)
    longest = max(len(row["run"]) for row in table)
    console = Console(width=max(120, longest + 16 * (len(metrics) + 4)))  # a run's path is never cut
    console.print(t)
    console.print(f"plot: {png}")
