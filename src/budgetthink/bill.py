"""The bill: what the runs under some directories spent, per line, per stage and in total, and what it leaves out.

`budgetthink cost RUN_DIR [RUN_DIR ...] [--json]` -> `cost(run_dirs, as_json)`. Every ledger line is repriced
with one price table, so one bill has one set of prices; the total is the sum of the priced lines, and a line
without a price is shown as unpriced, never as $0. The bill names what it does not hold:
  - the pretraining of every base model this project did not make (published figures where known); a model made
    here (the tiny default) has its own ledger, which the bill follows and adds;
  - the tail of every unfinished stage: a stage whose last line is `running` was killed (or is still running) and
    is billed up to its last checkpoint; the time between that checkpoint and the kill is on no ledger.
"""

import json
import re
from pathlib import Path

from budgetthink.errors import UserError
from budgetthink.jsonl import read_jsonl
from budgetthink.ledger import LEDGER_FILE
from budgetthink.prices import api_entry, load_prices, price_line


def ledger_files(run_dirs: list) -> list[Path]:
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


def make_bill(run_dirs: list, prices: str | Path | None = None, follow_models: bool = True) -> dict:
    """The bill as a dict: lines, stages, total, unpriced, not_on_bill, prices. See `cost` for printing."""
    table = load_prices(prices)
    files = [f.resolve() for f in ledger_files(run_dirs)]
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
    # a stage whose last line is a checkpoint never closed: billed up to that checkpoint, the rest is missing
    unfinished = [{"stage": r["stage"], "file": r["file"], "id": r["id"], "start": r["start"],
                   "billed_until": r["end"], "billed_wall_s": r["wall_s"],
                   "missing": "the time from its last checkpoint until the process stopped (killed, or still "
                              "running): no line records it"} for r in lines if r["status"] == "running"]

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
            "unfinished": unfinished, "tiny_pretraining_in_bill": tiny_in_bill, "prices": used}


def money(x: float | None) -> str:
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


def hours(s: float) -> str:
    return f"{s:,.1f} s" if s < 120 else f"{s / 60:,.1f} min" if s < 7200 else f"{s / 3600:,.2f} h"


def cost(run_dirs: list, as_json: bool = False, prices: str | Path | None = None) -> dict:
    """`budgetthink cost`: print the bill of the runs under `run_dirs` (rich tables, or JSON) and return it."""
    result = make_bill(run_dirs, prices)
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
        t.add_row(stage, hours(r["wall_s"] or 0), f"{r['device_count']}x {r['device_key'] or r['device']}",
                  _devh(r["device_hours"]), _count(r["tokens_generated"]), _count(r["tokens_trained"]),
                  f"{_count(r['api_input_tokens'])}/{_count(r['api_output_tokens'])}", money(r["cost"]))
    con.print(t)

    s = Table(title="By stage", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("stage", "lines", "wall", "dev-h", "gen", "trained", "API in/out", "cost", "unpriced"):
        s.add_column(col, justify="left" if col == "stage" else "right", min_width=8 if col in ("cost", "unpriced") else None)
    tot = result["total"]
    for r in result["stages"] + [{"stage": "TOTAL", **tot}]:
        s.add_row(r["stage"], str(r["lines"]), hours(r["wall_s"]), _devh(r["device_hours"]),
                  _count(r["tokens_generated"]), _count(r["tokens_trained"]),
                  f"{_count(r['api_input_tokens'])}/{_count(r['api_output_tokens'])}", money(r["cost"]),
                  str(r["unpriced_lines"]))
    con.print(s)
    con.print(f"Total of the priced lines: [bold]{money(tot['cost'])}[/bold] "
              f"({tot['priced_lines']} of {tot['lines']} lines priced; {tot['unpriced_lines']} unpriced).")
    for r in result["lines"]:
        if r["unpriced"]:
            con.print(f"  - unpriced: {r['stage']} ({r['start']}): {'; '.join(r['unpriced'])}")
    for u in result["unfinished"]:
        con.print(f"  - unfinished: {u['stage']} (started {u['start']}) has no closing line: billed up to its last "
                  f"checkpoint at {u['billed_until']} ({hours(u['billed_wall_s'] or 0)} of it)")

    con.print("\n[bold]Not on this bill[/bold] (no ledger can price it):")
    for item in result["not_on_bill"]:
        tokens = f"{_count(item['tokens'])} tokens" if item["tokens"] else "tokens unknown"
        con.print(f"  - pretraining of {item['model']}: {tokens} ({item['tokens_note']}); compute: "
                  f"{item['compute'] or 'unknown'} ({item['compute_note']}). Source: {item['source'] or 'none'}.")
    for u in result["unfinished"]:
        con.print(f"  - {u['stage']} (started {u['start']}) after its last checkpoint at {u['billed_until']}: "
                  f"{u['missing']}")
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

