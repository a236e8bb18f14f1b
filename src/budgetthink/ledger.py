"""The ledger: one line-atomic JSONL record of what each stage spent, written whatever way the stage ends.

Every command that does work wraps its work in `stage_ledger`:

    with stage_ledger(out_dir, stage="rl", config=cfg) as entry:
        ...
        entry.add(tokens_generated=n_new, tokens_trained=n_seq)
        entry.add(api_model="gpt-4o-mini", api_input_tokens=812, api_output_tokens=4096)
        entry.checkpoint()    # e.g. after each checkpoint: a run killed later still shows on the bill

On exit, also on an exception or Ctrl-C (status "error" / "interrupted"), one line is appended to
`out_dir/ledger.jsonl`: stage, start and end time, wall seconds, device and count, device-hours, tokens
generated and trained, teacher API tokens, and the cost in dollars from the price table (`budgetthink.prices`).
`checkpoint()` appends the figures so far as a `running` line with the same id; the bill keeps the last line
of each id. A process killed outright (SIGKILL, a lost node) writes no closing line: its last `running` line is
what the bill shows, and the bill says that the time after it is missing. A stage killed before its first
checkpoint leaves no line at all. In a multi-process run only rank 0 writes; the command passes the totals of
all ranks.
"""

import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from budgetthink.errors import UserError
from budgetthink.jsonl import append_jsonl
from budgetthink.prices import device_key, load_prices, price_line

LEDGER_FILE = "ledger.jsonl"


def detect_device() -> tuple[str, int]:
    """(name, count): the CUDA device name and the GPUs this run holds, or ("cpu", usable cores).

    GPUs held = $WORLD_SIZE under a launcher, else the visible devices; $BUDGETTHINK_DEVICE_COUNT overrides."""
    name, count = "cpu", len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            count = int(os.environ.get("WORLD_SIZE") or 0) or torch.cuda.device_count()
    except ImportError:
        pass
    if os.environ.get("BUDGETTHINK_DEVICE_COUNT"):
        count = int(os.environ["BUDGETTHINK_DEVICE_COUNT"])
    return name, count


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _plain(config: Any) -> Any:
    """A JSON-able copy of a stage's configuration (pydantic model, dict, or None)."""
    if config is None:
        return None
    if hasattr(config, "model_dump"):
        return config.model_dump(mode="json")
    return json.loads(json.dumps(config, default=str))


class LedgerEntry:
    """What one stage used; `stage_ledger` writes it. Counts given to `add` accumulate."""

    def __init__(self, path: Path, stage: str, config: Any, model: str | None, device: tuple[str, int] | None,
                 device_key_: str | None, prices: dict, write: bool):
        self.path, self.stage, self.prices, self.write = path, stage, prices, write
        self.id = uuid.uuid4().hex[:12]
        self.config = _plain(config)
        if model is None and isinstance(self.config, dict) and isinstance(self.config.get("model"), str):
            model = self.config["model"]
        if model is not None and Path(model).is_dir():
            model = Path(model).resolve()  # a local model: absolute, so the bill finds it from anywhere
        self.model = str(model) if model is not None else None
        self.device, self.device_count = device or detect_device()
        forced = device_key_ or os.environ.get("BUDGETTHINK_DEVICE")
        self.device_key = forced or device_key(self.device, prices)
        self.device_key_forced = bool(forced)
        self.tokens_generated = 0
        self.tokens_trained = 0
        self.api: dict[str, dict] = {}
        self.start = time.time()

    def add(self, tokens_generated: int = 0, tokens_trained: int = 0, api_input_tokens: int = 0,
            api_output_tokens: int = 0, api_model: str | None = None, api_cost: float | None = None) -> None:
        """Add to the counts. API tokens need `api_model` (priced from the table, or by `api_cost` in dollars
        when the API reported its own cost)."""
        self.tokens_generated += int(tokens_generated)
        self.tokens_trained += int(tokens_trained)
        if api_input_tokens or api_output_tokens or api_cost is not None or api_model is not None:
            if not api_model:
                raise ValueError("entry.add: API tokens or cost need api_model (the model name sent to the API)")
            use = self.api.setdefault(api_model, {"input_tokens": 0, "output_tokens": 0, "reported_cost": None})
            use["input_tokens"] += int(api_input_tokens)
            use["output_tokens"] += int(api_output_tokens)
            if api_cost is not None:
                use["reported_cost"] = (use["reported_cost"] or 0.0) + float(api_cost)

    def line(self, status: str, error: str | None = None) -> dict:
        end = time.time()
        wall = end - self.start
        line = {
            "id": self.id, "stage": self.stage, "status": status, "error": error,
            "start": _iso(self.start), "end": _iso(end), "wall_s": wall,
            "device": self.device, "device_count": self.device_count,
            "device_key": self.device_key, "device_key_forced": self.device_key_forced,
            "device_hours": wall / 3600 * self.device_count,
            "tokens_generated": self.tokens_generated, "tokens_trained": self.tokens_trained,
            "api_input_tokens": sum(u["input_tokens"] for u in self.api.values()),
            "api_output_tokens": sum(u["output_tokens"] for u in self.api.values()),
            "api": self.api, "model": self.model,
        }
        cost = price_line(line, self.prices)
        line.update({k: cost[k] for k in ("cost_device", "cost_api", "cost", "unpriced")})
        line["prices"] = self.prices["files"]
        line["config"] = self.config
        return line

    def checkpoint(self) -> None:
        """Append the figures so far as a `running` line; the bill keeps the last line of each entry."""
        if self.write:
            append_jsonl(self.path, self.line("running"))


COUNTS = ("tokens_generated", "tokens_trained", "api_input_tokens", "api_output_tokens")


@contextmanager
def stage_ledger(out_dir: str | Path, stage: str, config: Any = None, model: str | None = None,
                 device: tuple[str, int] | None = None, device_key: str | None = None,
                 prices: str | Path | None = None) -> Iterator[LedgerEntry]:
    """Record one stage in `out_dir/ledger.jsonl`, whatever way the block ends.

    model: the base model used (default: `config.model` when it is a string); device: (name, count) to
    override detection; device_key: a price key to force (also $BUDGETTHINK_DEVICE)."""
    write = os.environ.get("RANK", "0") == "0"
    entry = LedgerEntry(Path(out_dir) / LEDGER_FILE, stage, config, model, device, device_key,
                        load_prices(prices), write)
    status, error = "ok", None
    try:
        yield entry
    except KeyboardInterrupt:
        status, error = "interrupted", "KeyboardInterrupt"
        raise
    except SystemExit as e:
        if e.code not in (None, 0):
            status, error = "error", f"SystemExit: {e.code}"
        raise
    except BaseException as e:
        status, error = "error", f"{type(e).__name__}: {e}"[:500]
        if isinstance(e, UserError) and not any(entry.line(status, error).get(k) for k in COUNTS):
            write = False  # bad input refused before any work: nothing to bill, and no directory to create
        raise
    finally:
        if write:
            append_jsonl(entry.path, entry.line(status, error))

