"""Experiment tracking: a training loop's metrics, live, in TensorBoard, Weights & Biases or trackio.

    tracker = start(cfg.report_to, out, stage="rl", config=cfg, resume_step=run.step)
    tracker.log(record, step)                                          # a metrics.jsonl record
    tracker.table("completions", ["prompt", "completion", "reward"], rows, step)
    tracker.finish()

`report_to` (in every training config; `--report-to` on the command line) names the trackers: none (the
default), tensorboard, wandb, trackio, or several (`tensorboard,wandb`). Each is an optional extra
(`pip install 'budgetthink[tensorboard]'`); naming one that is not installed is a config error, raised
before any model is loaded.

Where each one writes (OUT is the run's output directory):
- tensorboard: OUT/tracking/tensorboard; watch with `tensorboard --logdir OUT/tracking`. A resumed run
  purges the steps after its checkpoint, so a curve never has a doubled tail.
- wandb: OUT/tracking/wandb, offline unless $WANDB_MODE says otherwise, so nothing leaves the machine
  (`wandb sync OUT/tracking/wandb/offline-run-*` uploads it later). Project: $WANDB_PROJECT or budgetthink.
- trackio: its local database ($TRACKIO_DIR, default ~/.cache/huggingface/trackio), project
  $TRACKIO_PROJECT or budgetthink; `trackio show --project budgetthink` opens the dashboard. What trackio
  prints goes to stderr (stdout carries a command's results).

Names: every number of a record under its metrics.jsonl name, and also under TRL's name where TRL logs the
same quantity (TRL_NAMES), so a dashboard made for TRL's GRPOTrainer reads these runs. The run's resolved
config (and the command that started it) is logged once, at the start; a run is named after OUT.
"""

import atexit
import importlib.util
import math
import os
import shlex
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator

TRACKERS = ("tensorboard", "wandb", "trackio")
PROJECT = "budgetthink"  # the wandb / trackio project unless $WANDB_PROJECT / $TRACKIO_PROJECT is set

# metrics.jsonl name -> TRL's name for the same quantity (GRPOTrainer, and the Trainer's learning rate)
TRL_NAMES = {
    "reward_mean": "reward",
    "zero_spread_groups": "frac_reward_zero_std",
    "response_len_mean": "completions/mean_length",
    "response_len_max": "completions/max_length",
    "truncated": "completions/clipped_ratio",
    "clip_frac": "clip_ratio/region_mean",  # tokens whose loss took the clipped branch
    "lr": "learning_rate",
}  # reward_std, kl, entropy, loss and grad_norm already have TRL's names


# --- the setting -------------------------------------------------------------------------------------------
def parse_report_to(value) -> list[str]:
    """'none', 'tensorboard', 'tensorboard,wandb' or a list -> the trackers, each once. An unknown name, or one
    whose package is missing, is an error naming the fix."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in (str(x).strip().lower() for x in items):
        if item in ("", "none") or item in out:
            continue
        if item not in TRACKERS:
            raise ValueError(f"unknown tracker {item!r}; use none or any of {', '.join(TRACKERS)} "
                             "(several: tensorboard,wandb)")
        if importlib.util.find_spec(item) is None:
            raise ValueError(f"report_to {item} needs the {item} package: pip install 'budgetthink[{item}]' "
                             f"(or leave {item} out of report_to)")
        out.append(item)
    return out


ReportTo = Annotated[list[str], BeforeValidator(parse_report_to)]
REPORT_TO = ("experiment trackers to log to as the run goes: none, tensorboard, wandb (offline unless "
             "WANDB_MODE is set), trackio (local); several as a list or comma-separated")


def command_line() -> str:
    """The command that started this process, as a person would type it."""
    path = Path(sys.argv[0] if sys.argv and sys.argv[0] else "python")
    prog = path.name
    if prog == "__main__.py":  # python -m PACKAGE
        prog = "budgetthink" if path.parent.name == "budgetthink" else f"python -m {path.parent.name}"
    return " ".join([prog, shlex.join(sys.argv[1:])]).strip()


def scalars(record: dict) -> dict[str, float]:
    """The finite numbers of a record (without `step`), plus the same values under TRL's names."""
    out = {k: float(v) for k, v in record.items()
           if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
    return out | {TRL_NAMES[k]: v for k, v in out.items() if k in TRL_NAMES}


# --- the backends: log(scalars, step), table(name, columns, rows, step), finish() ------------------------------
class _TensorBoard:
    def __init__(self, root: Path, name: str, stage: str, config: dict, resume_step: int):
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events a killed run wrote after its checkpoint are dropped when the resumed run logs again
        self.writer = SummaryWriter(str(root / "tensorboard"), flush_secs=10,
                                    purge_step=resume_step + 1 if resume_step else None)
        text = f"{stage} `{command_line()}`\n\n" + _indent(yaml.safe_dump(config, sort_keys=False))
        self.writer.add_text("config", text, global_step=resume_step)

    def log(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, global_step=step)

    def table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        cell = lambda x: str(x).replace("|", "\\|").replace("\n", "<br>")  # a markdown table cell
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
        self.writer.add_text(name, "\n".join(lines), global_step=step)

    def finish(self) -> None:
        self.writer.close()


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())  # a markdown code block


class _Wandb:
    def __init__(self, root: Path, name: str, stage: str, config: dict, resume_step: int):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=name, job_type=stage,
                              dir=str(root), config={**config, "command": command_line()},
                              mode=os.environ.get("WANDB_MODE", "offline"),
                              settings=wandb.Settings(console="off", silent=True), reinit="create_new")

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        self.run.log({name: self.wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self) -> None:
        self.run.finish()


class _Trackio:
    def __init__(self, root: Path, name: str, stage: str, config: dict, resume_step: int):
        import trackio

        self.trackio = trackio
        with redirect_stdout(sys.stderr):
            self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=name, group=stage,
                                    config={**config, "command": command_line()},
                                    resume="allow" if resume_step else "never", embed=False,
                                    auto_log_cpu=False, auto_log_gpu=False)

    def log(self, values: dict, step: int) -> None:
        with redirect_stdout(sys.stderr):
            self.run.log(values, step=step)

    def table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        with redirect_stdout(sys.stderr):
            self.run.log({name: self.trackio.Table(columns=columns, data=rows)}, step=step)

    def finish(self) -> None:
        with redirect_stdout(sys.stderr):
            self.trackio.finish()  # also forgets the current run, so trackio's exit hook has nothing left to print


BACKENDS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "trackio": _Trackio}


# --- the tracker the loops hold --------------------------------------------------------------------------------
class Tracker:
    """Sends each call to every started backend; with report_to none every call does nothing."""

    def __init__(self, backends: list):
        self.backends = backends
        if backends:
            atexit.register(self.finish)  # a run that dies still flushes what it logged

    def log(self, record: dict, step: int) -> None:
        values = scalars(record)
        for b in self.backends if values else []:
            b.log(values, step)

    def table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        for b in self.backends:
            b.table(name, columns, rows, step)

    def finish(self) -> None:
        backends, self.backends = self.backends, []
        for b in backends:
            b.finish()


def start(report_to: list[str], out: Path, stage: str, config: BaseModel | dict, resume_step: int = 0,
          name: str | None = None) -> Tracker:
    """Start the trackers of `report_to` for the run in `out` (files under OUT/tracking); logs the config."""
    backends = []
    if report_to:
        root = Path(out) / "tracking"
        root.mkdir(parents=True, exist_ok=True)
        plain = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
        name = name or Path(out).resolve().name
        backends = [BACKENDS[t](root, name, stage, plain, resume_step) for t in parse_report_to(report_to)]
    return Tracker(backends)
