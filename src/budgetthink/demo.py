"""The main job: every stage on the tiny model, and what each bought.

    budgetthink demo --out runs/demo            # about 30 minutes on 2 cores (make demo)
    budgetthink demo --out runs/demo --quick    # under 5 minutes: the `test` preset base, smaller settings

Stages, each resumable (a demo interrupted and rerun picks up where it stopped):
1. base:    build and pretrain the tiny model (reused from a cache keyed by its settings)
2. rl:      R1-Zero-style GRPO on Countdown from the base (recipes/tiny-countdown-grpo.yaml)
3. distill: the Countdown solver's traces; curate: 1,000 of them, s1-style but length-neutral; sft: fine-tune the base on them
4. eval:    base, RL and SFT models over a sweep of thinking budgets, and majority voting
5. the bill for the whole run, and 6. DIR/report.html with the plots, the tables and the bill.
"""

import html
import json
import os
import shutil
import sys
import time
from pathlib import Path

from pydantic import BaseModel, Field

from budgetthink.errors import UserError
from budgetthink.jsonl import atomic_write_json, atomic_write_text

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


class DemoSettings(BaseModel):
    """How big each stage of the demo is."""

    preset: str = Field("small", description="tiny model preset for the base")
    rl_steps: int = Field(60, description="GRPO steps")
    rl_overrides: list[str] = Field(default_factory=list, description="extra overrides for the RL recipe")
    distill_n: int = Field(4000, description="solver traces to distil")
    curate_n: int = Field(1000, description="traces kept by s1-style curation")
    sft_overrides: list[str] = Field(default_factory=list, description="extra overrides for the SFT recipe")
    eval_n: int = Field(200, description="held-out problems per evaluation setting")
    budgets: list[int] = Field([16, 32, 64, 128, 256], description="maximum thinking budgets swept")
    samples: int = Field(8, description="samples per problem for majority voting")


FULL = DemoSettings()
QUICK = DemoSettings(preset="test", rl_steps=4, rl_overrides=["eval_every=2", "eval_size=32", "save_every=2", "prompts_per_step=8",
                                               "n=4", "max_response_tokens=128"],
                     distill_n=600, curate_n=300, sft_overrides=["epochs=1", "log_every=5"], eval_n=32,
                     budgets=[16, 64, 256], samples=4)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _done(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _stage(out: Path, name: str, fn) -> dict:
    """Run a stage once: its summary lands in out/.done/NAME.json, and a rerun skips it."""
    marker = out / ".done" / f"{name}.json"
    if (summary := _done(marker)) is not None:
        _say(f"{name}: done before, skipped")
        return summary
    _say(f"{name}: running")
    t0 = time.time()
    summary = fn() or {}
    summary["wall_s"] = round(time.time() - t0, 1)
    atomic_write_json(marker, summary)
    return summary


def _fresh_or_resume(run_dir: Path, latest_checkpoint) -> bool:
    """Resume a training stage from its last checkpoint; one killed before its first starts afresh."""
    if latest_checkpoint(run_dir) is not None:
        return True
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return False


def _recipe(name: str) -> Path:
    path = RECIPES / name
    if not path.exists():
        raise UserError(f"recipe {path} not found; run the demo from a budgetthink checkout (make demo)")
    return path


def run(out: Path, quick: bool = False, preset: str | None = None, cache_dir: Path | None = None) -> dict:
    from budgetthink import evaluate, tiny
    from budgetthink.bill import cost, make_bill
    from budgetthink.config import load_config
    from budgetthink.data.curate import curate
    from budgetthink.data.distill import distill
    from budgetthink.train import rl, sft

    s = (QUICK if quick else FULL).model_copy(update={"preset": preset} if preset else {})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir or os.environ.get("BUDGETTHINK_CACHE", Path.home() / ".cache" / "budgetthink"))
    atomic_write_json(out / "demo_settings.json", {"quick": quick, **s.model_dump()})

    def base():
        built = tiny.cached_build(s.preset, cache_dir, progress=True)
        if (out / "base").exists():
            shutil.rmtree(out / "base")
        shutil.copytree(built, out / "base")  # the run owns its base (and its ledger line for pretraining)
        report = json.loads((out / "base" / "build_report.json").read_text())
        _say(tiny.summary(report))
        return {"model": str(out / "base"), "check": report["check"]}

    b = _stage(out, "base", base)

    def rl_stage():
        cfg = load_config(rl.RLConfig, _recipe("tiny-countdown-grpo.yaml"),
                          [f"model={b['model']}", f"max_steps={s.rl_steps}", *s.rl_overrides])
        rl.train(cfg, out / "rl", resume=_fresh_or_resume(out / "rl", rl.latest_checkpoint))
        return {"model": str(out / "rl" / "model")}

    r = _stage(out, "rl", rl_stage)

    traces, selected = out / "distill" / "traces.jsonl", out / "curate" / "selected.jsonl"
    _stage(out, "distill", lambda: distill("countdown", "solver", s.distill_n, traces, seed=1,
                                           task_options={"split": "train"}))
    _stage(out, "curate", lambda: curate(traces, s.curate_n, selected, seed=0, prefer_long=False, force=True))

    def sft_stage():
        cfg = load_config(sft.SFTConfig, _recipe("tiny-s1-sft.yaml"),
                          [f"model={b['model']}", f"data={selected}", *s.sft_overrides])
        sft.train(cfg, out / "sft", resume=_fresh_or_resume(out / "sft", sft.latest_checkpoint))
        return {"model": str(out / "sft" / "model")}

    f = _stage(out, "sft", sft_stage)

    models = [b["model"], r["model"], f["model"]]
    _stage(out, "eval", lambda: {"summary": evaluate.run(
        models, "countdown", s.eval_n, seed=7, budgets=s.budgets, samples=s.samples, out=out / "eval",
        task_options={"split": "test"}, command=" ".join(["budgetthink", *sys.argv[1:]]))["summary"]})

    bill = make_bill([out])
    cost([out])
    atomic_write_json(out / "bill.json", bill)
    page = report(out, bill)
    _say(f"report: {page}")
    print(page)
    return {"report": str(page), "bill": bill.get("total")}


# --- the report -------------------------------------------------------------------------------------------------
def _img(out: Path, rel: str, alt: str) -> str:
    return f'<figure><img src="{rel}" alt="{alt}"><figcaption>{alt}</figcaption></figure>' if (out / rel).exists() else ""


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _num(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def report(out: Path, bill: dict) -> Path:
    """DIR/report.html: one page with every stage's plot and table, and the bill."""
    from budgetthink.report import short_name

    base = _done(out / ".done" / "base.json") or {}
    evals = json.loads((out / "eval" / "results.json").read_text()) if (out / "eval" / "results.json").exists() else {}
    funnel = json.loads((out / "curate" / "funnel.json").read_text()) if (out / "curate" / "funnel.json").exists() else {}
    rl_evals = [json.loads(x) for x in (out / "rl" / "eval.jsonl").read_text().splitlines()] \
        if (out / "rl" / "eval.jsonl").exists() else []
    check = base.get("check", {})
    total = bill.get("total") or {}
    parts = [
        "<h1>budgetthink demo</h1>",
        "<p>Every stage on the tiny model, on this machine. Numbers are measured by this run.</p>",
        "<h2>1. The base model</h2>",
        _table(["held-out problems", "format", "correct", "thinking closed"],
               [[check.get("problems"), _pct(check.get("format_rate")), _pct(check.get("accuracy")),
                 _pct(check.get("thinking_closed_rate"))]]),
        "<h2>2. R1-Zero-style RL (GRPO)</h2>",
        _table(["step", "held-out reward", "held-out accuracy"],
               [[e.get("step"), f"{e.get('reward', 0):.3f}", _pct(e.get("accuracy"))] for e in rl_evals]),
        _img(out, "rl/metrics.png", "reward, accuracy and response length over RL steps"),
        "<h2>3. Distil, curate, fine-tune (s1)</h2>",
        _table(["curation stage", "count"], [[st["stage"], st["count"]] for st in funnel.get("stages", [])]),
        _img(out, "curate/curation.png", "curation: domains and trace lengths before and after"),
        _img(out, "sft/metrics.png", "SFT loss"),
        "<h2>4. Test-time scaling</h2>",
        _img(out, "eval/scaling.png", "accuracy over thinking tokens: budget forcing (solid) and majority vote (dashed)"),
        '<p>Full tables: <a href="eval/report.html">eval/report.html</a></p>',
        _table(["model", "method", "Control (%)", "Scaling (points / 1k tokens)", "Performance (%)",
                "majority@K (%)", "pass@K (%)"],
               [[short_name(v["model"]), v["method"], _num(v.get("control")), _num(v.get("scaling")),
                 _num(v.get("performance")), _num(v.get("majority_at_K")), _num(v.get("pass_at_K"))]
                for v in evals.get("summary", [])]),
        "<h2>5. The bill</h2>",
        _table(["stage", "wall", "device-hours", "tokens generated", "tokens trained", "cost ($)"],
               [[ln["stage"], f"{ln['wall_s']:.0f} s", f"{ln['device_hours']:.4f}", ln["tokens_generated"],
                 ln["tokens_trained"], "unpriced" if ln.get("cost") is None else f"{ln['cost']:.4f}"]
                for ln in bill.get("lines", [])]),
        (f"<p>Total of priced lines: ${total.get('cost') or 0:.4f} over {total.get('device_hours', 0):.3f} "
         f"device-hours; unpriced lines: {total.get('unpriced_lines', 0)}. A CPU is priced at $0 (your own machine); "
         f"see <code>budgetthink cost {html.escape(str(out))}</code> for the sources of every price.</p>"),
    ]
    style = ("body{font-family:sans-serif;max-width:980px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "img{max-width:100%}figcaption{color:#555;font-size:90%}")
    page = out / "report.html"
    atomic_write_text(page, f"<!doctype html><html><head><meta charset='utf-8'><title>budgetthink demo</title>"
                            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
    return page
