"""The honest bill: a cost ledger for every stage, the bill over runs, and projections at full scale.

Every command that does work wraps its work in `stage_ledger`:

    with stage_ledger(out_dir, stage="rl", config=cfg) as entry:
        ...
        entry.add(tokens_generated=n_new, tokens_trained=n_seq)
        entry.add(api_model="gpt-4o-mini", api_input_tokens=812, api_output_tokens=4096)
        entry.checkpoint()    # optional, e.g. after each checkpoint: a run killed later still shows on the bill

On exit, also on an exception or Ctrl-C (status "error" / "interrupted"), one line is appended to
`out_dir/ledger.jsonl` (line-atomic): stage, start and end time, wall seconds, device and count, device-hours,
tokens generated and trained, teacher API tokens, and the cost in dollars from the price table
(`prices.yaml` beside this file; override with `--prices FILE` or $BUDGETTHINK_PRICES). A device or API model
without a price makes the line *unpriced* (cost null), never zero. In a multi-process run only rank 0 writes;
the command passes the totals of all ranks.

`budgetthink cost RUN_DIR [RUN_DIR ...] [--json]` -> `cost(run_dirs, as_json)`: the bill, per line, per stage
and in total (the sum of the priced lines), with the unpriced lines and what no ledger can price (the base
model's pretraining, with the published figures where known) named as such. Every line is repriced with one
price table, so one bill has one set of prices.

`budgetthink estimate --recipe Y --gpu h100 --gpus 16 [--mfu 0.4]` -> `estimate(...)`: wall time, GPU-hours
and dollars for a recipe from FLOPs: 6 x parameters x tokens to train, 2 x parameters x tokens to generate,
at `mfu` of the GPU's dense bf16 peak. Recipe keys it reads (plain YAML; the first key found wins):
  model                                              name (Qwen2.5 sizes known) or local model directory
  params | estimate.params                           parameter count, overrides the model's
  stage | estimate.stage                             sft or rl (else: rl if a group size is given, sft if epochs)
  SFT: epochs | num_epochs | num_train_epochs        (default 1)
       estimate.tokens | data_tokens | train_tokens  tokens of one epoch of data (or --tokens)
  RL:  max_steps | total_steps | estimate.steps
       batch_size | prompts_per_step | train_batch_size                   prompts per step
       group_size | num_generations | n_samples | rollout_n | samples_per_prompt   (default 1)
       max_prompt_tokens | max_prompt_length | prompt_length
       max_new_tokens | max_response_tokens | max_response_length | response_length | max_completion_length
         (else budget.max_thinking_tokens + budget.max_answer_tokens)
       ppo_epochs | num_iterations | update_epochs   passes over each batch (default 1)
       algorithm: ppo | advantage: gae | critic      a critic of the policy's size is trained too
       kl_coef | beta | kl.beta                      > 0: a reference model runs a forward pass
"""

import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from budgetthink.errors import UserError
from budgetthink.jsonl import append_jsonl, read_jsonl

LEDGER_FILE = "ledger.jsonl"
DEFAULT_PRICES = Path(__file__).with_name("prices.yaml")


# ---------------------------------------------------------------- price table

def _yaml_mapping(path: Path, not_found: str, not_a_mapping: str) -> dict:
    """The mapping in YAML file `path` (empty file: {}); UserError `not_found`, or naming the file when it is not
    valid YAML or not a mapping."""
    if not path.is_file():
        raise UserError(not_found)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {not_a_mapping}")
    return data


def load_prices(path: str | Path | None = None) -> dict:
    """The default table merged with a user file (`path`, else $BUDGETTHINK_PRICES), entry by entry.

    Returns {"cpu_device", "devices", "api", "pretraining", "files"}; devices keep the user's entries first,
    so that the user's `match` patterns are tried before the defaults'."""
    table = yaml.safe_load(DEFAULT_PRICES.read_text())
    files = [str(DEFAULT_PRICES)]
    path = path or os.environ.get("BUDGETTHINK_PRICES") or None
    if path:
        p = Path(path)
        user = _yaml_mapping(p, f"price file {p} not found; pass an existing YAML file shaped like {DEFAULT_PRICES}",
                             "expected a mapping with devices:, api:, pretraining: or cpu_device:")
        unknown = set(user) - {"cpu_device", "devices", "api", "pretraining"}
        if unknown:
            raise UserError(f"{p}: unknown top-level key(s) {', '.join(sorted(unknown))}; "
                            "valid: cpu_device, devices, api, pretraining")
        for section in ("devices", "api", "pretraining"):
            entries = user.get(section) or {}
            if not isinstance(entries, dict):
                raise UserError(f"{p}: {section}: expected a mapping of name -> entry")
            merged = {}
            for key, entry in entries.items():
                if not isinstance(entry, dict):
                    raise UserError(f"{p}: {section}.{key}: expected a mapping (e.g. usd_per_hour: 2.0)")
                merged[key] = {**table[section].get(key, {}), "source": f"your price file {p}", "date": None,
                               **entry}
                need = {"devices": ["usd_per_hour"], "api": ["usd_per_million_input", "usd_per_million_output"]}
                for field in need.get(section, []):
                    value = merged[key].get(field)
                    if value is not None and not isinstance(value, int | float):
                        raise UserError(f"{p}: {section}.{key}.{field}: expected a number, got {value!r}")
                    if field not in merged[key]:
                        raise UserError(f"{p}: {section}.{key}: missing {field} (a number, or null for unknown)")
            table[section] = {**merged, **{k: v for k, v in table[section].items() if k not in merged}}
        if user.get("cpu_device"):
            table["cpu_device"] = user["cpu_device"]
        files.append(str(p))
    table["files"] = files
    return table


def device_key(name: str, prices: dict) -> str | None:
    """The price key of a device name as the ledger records it ("cpu", or torch's CUDA name); None if unknown."""
    if name == "cpu":
        return prices["cpu_device"]
    for key, entry in prices["devices"].items():
        if any(re.search(pat, name, re.IGNORECASE) for pat in entry.get("match") or []):
            return key
    return None


def api_entry(model: str, prices: dict) -> dict | None:
    """The price entry of an API model: its exact name or one of its listed aliases (no guessing)."""
    for key, entry in prices["api"].items():
        if model == key or model in (entry.get("aliases") or []):
            return {"key": key, **entry}
    return None


def price_line(line: dict, prices: dict) -> dict:
    """Cost of one ledger line: {cost_device, cost_api, cost, priced, unpriced (reasons), device_key}."""
    reasons = []
    key = line.get("device_key") if line.get("device_key_forced") else device_key(line["device"], prices)
    entry = prices["devices"].get(key) if key else None
    rate = entry.get("usd_per_hour") if entry else None
    if line.get("device_hours", 0) == 0:
        cost_device = 0.0  # nothing ran: no device price is needed
    elif rate is None:
        cost_device = None
        reasons.append(f"device {line['device']!r} has no price (add it under devices: in a price file)"
                       if key is None else f"device key {key!r} has no price in the table")
    else:
        cost_device = line["device_hours"] * float(rate)
    cost_api, api_priced = 0.0, True
    for model, use in (line.get("api") or {}).items():
        api = api_entry(model, prices)
        if use.get("reported_cost") is not None:  # the API said what it charged
            cost_api += float(use["reported_cost"])
        elif api is None:
            reasons.append(f"API model {model!r} has no price")
            api_priced = False
        else:
            cost_api += (use.get("input_tokens", 0) * float(api["usd_per_million_input"])
                         + use.get("output_tokens", 0) * float(api["usd_per_million_output"])) / 1e6
    cost_api = cost_api if api_priced else None
    priced = cost_device is not None and cost_api is not None
    return {"device_key": key, "cost_device": cost_device, "cost_api": cost_api,
            "cost": cost_device + cost_api if priced else None, "priced": priced, "unpriced": reasons}


# ---------------------------------------------------------------- the ledger

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


# ---------------------------------------------------------------- the bill

def _ledger_files(run_dirs: list) -> list[Path]:
    files = []
    for d in run_dirs:
        p = Path(d)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(p.rglob(LEDGER_FILE))
            if not found:
                raise UserError(f"{p}: no {LEDGER_FILE} under it; pass a directory a budgetthink command wrote")
            files += found
        else:
            raise UserError(f"{p}: no such file or directory; pass run directories (or ledger.jsonl files)")
    return files


def _model_ledger(model: str) -> Path | None:
    """The ledger of a model this project made: a ledger.jsonl in the model's directory or just above it."""
    p = Path(model)
    if not p.is_dir():
        return None
    for d in (p, p.parent):
        if (d / LEDGER_FILE).is_file():
            return d / LEDGER_FILE
    return None


def _pretraining(model: str, prices: dict) -> dict:
    name = model.lower()
    for family, facts in prices["pretraining"].items():
        if any(re.search(pat, name) for pat in facts.get("match") or []):
            return {"model": model, "family": family, "tokens": facts.get("tokens"),
                    "tokens_note": facts.get("tokens_note"), "compute": facts.get("compute"),
                    "compute_note": facts.get("compute_note"), "source": facts.get("source")}
    return {"model": model, "family": None, "tokens": None, "tokens_note": "unknown (no published figure on file)",
            "compute": None, "compute_note": "unknown", "source": None}


def bill(run_dirs: list, prices: str | Path | None = None, follow_models: bool = True) -> dict:
    """The bill as a dict: lines, stages, total, unpriced, not_on_bill, prices. See `cost` for printing."""
    table = load_prices(prices)
    files = [f.resolve() for f in _ledger_files(run_dirs)]
    seen: set[Path] = set()
    latest: dict[tuple, dict] = {}  # (file, id) -> last line of that entry
    queue = list(dict.fromkeys(files))
    followed: list[str] = []
    while queue:
        f = queue.pop(0)
        if f in seen:
            continue
        seen.add(f)
        for n, line in enumerate(read_jsonl(f)):
            latest[(f, line.get("id") or f"line{n}")] = {**line, "file": str(f)}
            src = _model_ledger(line["model"]) if follow_models and line.get("model") else None
            if src is not None and src.resolve() not in seen:  # a model made here: follow it to its own ledger
                followed.append(str(src.resolve()))
                queue.append(src.resolve())

    lines = []
    for line in latest.values():
        cost = price_line(line, table)
        lines.append({k: line.get(k) for k in (
            "file", "id", "stage", "status", "error", "start", "end", "wall_s", "device", "device_count",
            "device_hours", "tokens_generated", "tokens_trained", "api_input_tokens", "api_output_tokens",
            "model")} | cost)
    lines.sort(key=lambda r: r["start"] or "")

    stages: dict[str, dict] = {}
    sums = ("wall_s", "device_hours", "tokens_generated", "tokens_trained", "api_input_tokens", "api_output_tokens")
    for r in lines:
        s = stages.setdefault(r["stage"], {"stage": r["stage"], "lines": 0, "unpriced_lines": 0, "cost": 0.0,
                                           **{k: 0 for k in sums}})
        s["lines"] += 1
        for k in sums:
            s[k] += r[k] or 0
        if r["priced"]:
            s["cost"] += r["cost"]
        else:
            s["unpriced_lines"] += 1
    total = {"lines": len(lines), "priced_lines": sum(r["priced"] for r in lines),
             "unpriced_lines": sum(not r["priced"] for r in lines),
             "cost": sum(r["cost"] for r in lines if r["priced"]),
             **{k: sum(r[k] or 0 for r in lines) for k in sums}}

    # what no ledger prices: the pretraining of every base model this project did not make (no ledger of its own)
    bases = sorted({r["model"] for r in lines if r.get("model") and not _model_ledger(r["model"])})
    not_on_bill = [_pretraining(m, table) for m in bases]
    tiny_in_bill = any(r["stage"] == "tiny" for r in lines)

    used_devices = {r["device_key"] for r in lines if r["device_key"]}
    used_api = {api_entry(m, table)["key"] for line in latest.values() for m in (line.get("api") or {})
                if api_entry(m, table)}
    used = {"devices": {k: {f: table["devices"][k].get(f) for f in ("usd_per_hour", "unit", "date", "source")}
                        for k in sorted(used_devices) if k in table["devices"]},
            "api": {k: {f: table["api"][k].get(f) for f in ("usd_per_million_input", "usd_per_million_output",
                                                             "date", "source")} for k in sorted(used_api)},
            "files": table["files"]}
    return {"ledgers": [str(f) for f in sorted(seen)], "followed_models": followed, "lines": lines,
            "stages": list(stages.values()), "total": total, "not_on_bill": not_on_bill,
            "tiny_pretraining_in_bill": tiny_in_bill, "prices": used}


def _money(x: float | None) -> str:
    if x is None:
        return "unpriced"
    return "$0" if x == 0 else "<$0.01" if abs(x) < 0.01 else f"${x:,.2f}"


def _devh(x: float) -> str:
    return "0" if x == 0 else "<0.001" if x < 0.001 else f"{x:,.3f}"


def _count(n: float) -> str:
    """1234 -> 1.23k, 18e12 -> 18T: short counts for narrow tables."""
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def _hours(s: float) -> str:
    return f"{s:,.1f} s" if s < 120 else f"{s / 60:,.1f} min" if s < 7200 else f"{s / 3600:,.2f} h"


def cost(run_dirs: list, as_json: bool = False, prices: str | Path | None = None) -> dict:
    """`budgetthink cost`: print the bill of the runs under `run_dirs` (rich tables, or JSON) and return it."""
    result = bill(run_dirs, prices)
    if as_json:
        print(json.dumps(result, indent=2))
        return result
    from rich import box
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title="Ledger lines (gen / trained: tokens generated / trained; dev-h: device-hours)",
              box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("stage", "wall", "device", "dev-h", "gen", "trained", "API in/out", "cost"):
        t.add_column(col, justify="left" if col in ("stage", "device") else "right",
                     min_width=8 if col == "cost" else None, no_wrap=col == "device")
    for r in result["lines"]:
        stage = r["stage"] if r["status"] == "ok" else f"{r['stage']} ({r['status']})"
        t.add_row(stage, _hours(r["wall_s"] or 0), f"{r['device_count']}x {r['device_key'] or r['device']}",
                  _devh(r["device_hours"]), _count(r["tokens_generated"]), _count(r["tokens_trained"]),
                  f"{_count(r['api_input_tokens'])}/{_count(r['api_output_tokens'])}", _money(r["cost"]))
    con.print(t)

    s = Table(title="By stage", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("stage", "lines", "wall", "dev-h", "gen", "trained", "API in/out", "cost", "unpriced"):
        s.add_column(col, justify="left" if col == "stage" else "right", min_width=8 if col in ("cost", "unpriced") else None)
    tot = result["total"]
    for r in result["stages"] + [{"stage": "TOTAL", **tot}]:
        s.add_row(r["stage"], str(r["lines"]), _hours(r["wall_s"]), _devh(r["device_hours"]),
                  _count(r["tokens_generated"]), _count(r["tokens_trained"]),
                  f"{_count(r['api_input_tokens'])}/{_count(r['api_output_tokens'])}", _money(r["cost"]),
                  str(r["unpriced_lines"]))
    con.print(s)
    con.print(f"Total of the priced lines: [bold]{_money(tot['cost'])}[/bold] "
              f"({tot['priced_lines']} of {tot['lines']} lines priced; {tot['unpriced_lines']} unpriced).")
    for r in result["lines"]:
        if r["unpriced"]:
            con.print(f"  - unpriced: {r['stage']} ({r['start']}): {'; '.join(r['unpriced'])}")
        if r["status"] == "running":
            con.print(f"  - unfinished: {r['stage']} ({r['start']}) never closed its line (killed, or still "
                      "running); its figures run to its last checkpoint")

    con.print("\n[bold]Not on this bill[/bold] (no ledger can price it):")
    for item in result["not_on_bill"]:
        tokens = f"{_count(item['tokens'])} tokens" if item["tokens"] else "tokens unknown"
        con.print(f"  - pretraining of {item['model']}: {tokens} ({item['tokens_note']}); compute: "
                  f"{item['compute'] or 'unknown'} ({item['compute_note']}). Source: {item['source'] or 'none'}.")
    if result["tiny_pretraining_in_bill"]:
        con.print("  - (the tiny model's pretraining is on the bill: it is the `tiny` stage above)")
    if not result["not_on_bill"] and not result["tiny_pretraining_in_bill"]:
        con.print("  - the base model's pretraining: no line names a model, so it cannot be identified")
    con.print("\nPrices used (re-priced with one table: " + ", ".join(result["prices"]["files"]) + "):")
    for k, e in result["prices"]["devices"].items():
        con.print(f"  - {k}: ${e['usd_per_hour']}/{e['unit']}-hour ({e['date']}; {e['source']})")
    for k, e in result["prices"]["api"].items():
        con.print(f"  - {k}: ${e['usd_per_million_input']} in / ${e['usd_per_million_output']} out per million "
                  f"tokens ({e['date']}; {e['source']})")
    return result


# ---------------------------------------------------------------- the estimator

# Total parameters of the Qwen2.5 family (Hugging Face model cards, "Number of Parameters"; embeddings included).
QWEN25_PARAMS = {"0.5b": 0.49e9, "1.5b": 1.54e9, "3b": 3.09e9, "7b": 7.61e9, "14b": 14.7e9, "32b": 32.5e9,
                 "72b": 72.7e9}


def model_params(model: str) -> tuple[float, str]:
    """(parameter count, where it comes from) for a Qwen2.5 name or a local model directory."""
    name = model.lower()
    m = re.search(r"(\d+(?:\.\d+)?)b\b", name)
    if re.search(r"qwen2[._-]?5", name) and m and f"{m[1]}b" in QWEN25_PARAMS:
        return QWEN25_PARAMS[f"{m[1]}b"], f"Qwen2.5-{m[1].upper()}B model card (total parameters)"
    if (Path(model) / "config.json").is_file():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(model)
        with torch.device("meta"):
            net = AutoModelForCausalLM.from_config(cfg)
        return float(sum(p.numel() for p in net.parameters())), f"counted from {model}/config.json"
    raise UserError(f"unknown parameter count for model {model!r}; pass --params N or add `params:` to the recipe "
                    f"(known: Qwen2.5 {', '.join(QWEN25_PARAMS)}, or a local model directory)")


def _get(recipe: dict, keys: list[str]) -> tuple[Any, str | None]:
    """The first of the (dotted) keys present in the recipe, and which one it was."""
    for key in keys:
        node: Any = recipe
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node, key
    return None, None


RL_GROUP_KEYS = ["group_size", "num_generations", "n_samples", "rollout_n", "samples_per_prompt"]


def estimate(recipe_path: str | Path, gpu: str = "h100", gpus: int = 1, mfu: float = 0.4,
             tokens: float | None = None, gen_tokens: float | None = None, params: float | None = None,
             gen_mfu: float | None = None, prices: str | Path | None = None, as_json: bool = False) -> dict:
    """`budgetthink estimate`: project wall time, GPU-hours and dollars of a recipe on `gpus` x `gpu`.

    tokens: SFT: tokens of one epoch of data; RL: tokens through the policy per update pass in total
    (prompts + responses). gen_tokens: RL: tokens generated in total (default: every response at its maximum
    length, an upper bound). gen_mfu: utilisation while generating (default `mfu`; decoding is often lower)."""
    path = Path(recipe_path)
    recipe = _yaml_mapping(path, f"recipe {path} not found; pass a YAML file (see recipes/)",
                           "expected a mapping of key: value at the top level")
    table = load_prices(prices)
    if gpu not in table["devices"] or not table["devices"][gpu].get("peak_bf16_tflops"):
        known = [k for k, e in table["devices"].items() if e.get("peak_bf16_tflops")]
        raise UserError(f"unknown GPU {gpu!r} (no peak_bf16_tflops in the price table); known: {', '.join(known)}")
    if gpus < 1 or not 0 < mfu <= 1 or (gen_mfu is not None and not 0 < gen_mfu <= 1):
        raise UserError("--gpus must be >= 1 and --mfu / --gen-mfu within (0, 1]")
    dev = table["devices"][gpu]
    peak = float(dev["peak_bf16_tflops"]) * 1e12
    gen_mfu = mfu if gen_mfu is None else gen_mfu
    assumptions = []

    model = recipe.get("model")
    p_value, p_key = _get(recipe, ["params", "estimate.params"])
    if params is not None:
        n_params, p_source = float(params), "--params"
    elif p_value is not None:
        n_params, p_source = float(p_value), f"recipe key {p_key}"
    elif isinstance(model, str):
        n_params, p_source = model_params(model)
    else:
        raise UserError(f"{path}: no `model:` or `params:`; pass --params N")

    stage, _ = _get(recipe, ["stage", "estimate.stage"])
    if stage is None:
        stage = "rl" if _get(recipe, RL_GROUP_KEYS)[0] is not None else "sft" if _get(
            recipe, ["epochs", "num_epochs", "num_train_epochs"])[0] is not None else None
        if stage is None:
            raise UserError(f"{path}: cannot tell whether this is an SFT or RL recipe; add `stage: sft` or `stage: rl`")
        assumptions.append(f"stage read as {stage} from the recipe's keys")
    stage = str(stage).lower()
    flops: dict[str, float] = {}
    counts: dict[str, Any] = {}

    if stage == "sft":
        epochs, _ = _get(recipe, ["epochs", "num_epochs", "num_train_epochs"])
        if epochs is None:
            epochs = 1
            assumptions.append("1 epoch (the recipe names none)")
        t_value, _ = _get(recipe, ["estimate.tokens", "data_tokens", "train_tokens"])
        if tokens is None and t_value is None:
            raise UserError(f"{path}: no token count of the training data; pass --tokens N (tokens in one epoch)")
        per_epoch = float(tokens if tokens is not None else t_value)
        trained = per_epoch * float(epochs)
        counts = {"tokens_per_epoch": per_epoch, "epochs": epochs, "tokens_trained": trained, "tokens_generated": 0}
        flops["train"] = 6 * n_params * trained
        assumptions.append("every data token is trained on once per epoch; padding and attention FLOPs not counted")
    elif stage == "rl":
        steps, _ = _get(recipe, ["max_steps", "total_steps", "estimate.steps"])
        prompts, _ = _get(recipe, ["batch_size", "prompts_per_step", "train_batch_size"])
        group, _ = _get(recipe, RL_GROUP_KEYS)
        prompt_len, _ = _get(recipe, ["max_prompt_tokens", "max_prompt_length", "prompt_length"])
        resp_len, _ = _get(recipe, ["max_new_tokens", "max_response_tokens", "max_response_length",
                                    "response_length", "max_completion_length"])
        if resp_len is None and _get(recipe, ["budget.max_thinking_tokens"])[0] is not None:
            resp_len = (_get(recipe, ["budget.max_thinking_tokens"])[0]
                        + (_get(recipe, ["budget.max_answer_tokens"])[0] or 0))
        missing = [n for n, v in (("max_steps", steps), ("batch_size", prompts), ("max_prompt_tokens", prompt_len),
                                  ("max_new_tokens", resp_len)) if v is None]
        if missing and not (tokens is not None and gen_tokens is not None):
            raise UserError(f"{path}: RL recipe lacks {', '.join(missing)}; add them or pass --tokens and --gen-tokens")
        if group is None:
            group = 1
            assumptions.append("1 sample per prompt (no group size in the recipe)")
        passes, _ = _get(recipe, ["ppo_epochs", "num_iterations", "update_epochs"])
        passes = passes or 1
        rollouts = (steps or 0) * (prompts or 0) * group
        generated = float(gen_tokens) if gen_tokens is not None else float(rollouts * resp_len)
        if gen_tokens is None:
            assumptions.append("every response runs to its maximum length (an upper bound)")
        prompt_tokens = float((steps or 0) * (prompts or 0) * (prompt_len or 0))  # prefilled once per group
        trained = float(tokens) if tokens is not None else rollouts * (prompt_len or 0) + generated
        assumptions.append("prompts are prefilled once per group and run at their maximum length")
        algo = str(recipe.get("algorithm") or recipe.get("advantage") or "").lower()
        critic = algo in ("ppo", "gae") or bool(recipe.get("critic"))
        kl, _ = _get(recipe, ["kl_coef", "beta", "kl.beta"])
        flops["generate"] = 2 * n_params * (generated + prompt_tokens)
        flops["train"] = 6 * n_params * trained * passes
        if kl:
            flops["reference"] = 2 * n_params * trained
        if critic:
            flops["critic"] = 6 * n_params * trained * passes + 2 * n_params * trained
            assumptions.append("the critic has the policy's size")
        assumptions.append("log-probabilities of the sampling policy come with generation (no extra forward)")
        counts = {"steps": steps, "prompts_per_step": prompts, "samples_per_prompt": group, "rollouts": rollouts,
                  "max_prompt_tokens": prompt_len, "max_response_tokens": resp_len, "update_passes": passes,
                  "tokens_generated": generated, "tokens_prefilled": prompt_tokens, "tokens_trained": trained,
                  "critic": critic, "reference_model": bool(kl)}
    else:
        raise UserError(f"{path}: stage {stage!r} unknown; use sft or rl")

    train_flops = sum(v for k, v in flops.items() if k != "generate")
    wall = train_flops / (gpus * peak * mfu) + flops.get("generate", 0.0) / (gpus * peak * gen_mfu)
    gpu_hours = wall * gpus / 3600
    rate = dev.get("usd_per_hour")
    result = {
        "recipe": str(path), "stage": stage, "model": model, "params": n_params, "params_source": p_source,
        "gpu": gpu, "gpus": gpus, "peak_bf16_tflops": dev["peak_bf16_tflops"], "peak_source": dev.get("peak_source"),
        "mfu": mfu, "gen_mfu": gen_mfu, **counts, "flops": {**flops, "total": sum(flops.values())},
        "wall_s": wall, "wall_h": wall / 3600, "gpu_hours": gpu_hours,
        "usd_per_gpu_hour": rate, "price_date": dev.get("date"), "price_source": dev.get("source"),
        "cost_usd": gpu_hours * float(rate) if rate is not None else None,
        "assumptions": assumptions + [
            "FLOPs: 6 x params x tokens to train (forward + backward), 2 x params x tokens to generate",
            f"each GPU sustains {mfu:.0%} of its dense bf16 peak while training"
            + (f", {gen_mfu:.0%} while generating" if "generate" in flops else ""),
            "no time for data loading, checkpoints, evaluation or start-up"],
    }
    if as_json:
        print(json.dumps(result, indent=2))
        return result
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Estimate: {path.name} on {gpus} x {gpu}", show_header=False)
    t.add_row("model", f"{model} ({n_params / 1e9:.3g}B parameters; {p_source})")
    for k, v in counts.items():
        t.add_row(k.replace("_", " "), f"{v:,.4g}" if isinstance(v, float) else str(v))
    for k, v in flops.items():
        t.add_row(f"FLOPs {k}", f"{v:.3e}")
    t.add_row("peak per GPU", f"{dev['peak_bf16_tflops']} TFLOP/s bf16 dense ({dev.get('peak_source')})")
    t.add_row("wall time", _hours(wall))
    t.add_row("GPU-hours", f"{gpu_hours:,.2f}")
    t.add_row("cost", f"{_money(result['cost_usd'])} at ${rate}/GPU-hour (price of {dev.get('date')})")
    con = Console()
    con.print(t)
    con.print(f"Price source: {dev.get('source')}")
    con.print("Assumptions:")
    for a in result["assumptions"]:
        con.print(f"  - {a}")
    return result
