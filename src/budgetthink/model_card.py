"""The model card: a README.md in every model directory a stage saves, saying how the model was made.

    write(out / "model", out, stage="rl")    # rl and sft: OUT/model/README.md, read from the run's files in OUT
    write(out, out, stage="tiny")            # tiny: the build directory is the model directory

Everything on the card is read from what the run left in its directory, after the run's ledger line is
written: config.yaml (rl, sft) or build_report.json (tiny), metrics.jsonl, eval.jsonl (rl's held-out
evaluations), summary.json (sft) and ledger.jsonl (the bill, with the base model's own ledger when the base
was made here). The card has Hugging Face's metadata header (library_name, base_model, tags), then: the
command, the base model, the data, the steps, the held-out results, the bill, the config.
"""

import time
from pathlib import Path

import yaml

from budgetthink.jsonl import atomic_write_text, read_jsonl

CARD = "README.md"


def _read(path: Path):
    if not path.is_file():
        return None
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    return yaml.safe_load(path.read_text())  # JSON is YAML


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_num(x) for x in row) + " |" for row in rows])


# --- what each stage made -------------------------------------------------------------------------------------
def _rl(run: Path) -> dict:
    cfg = _read(run / "config.yaml") or {}
    metrics = _read(run / "metrics.jsonl") or []
    evals = _read(run / "eval.jsonl") or []
    if cfg.get("train_file"):
        data = f"training problems from `{cfg['train_file']}`"
    else:
        data = (f"{cfg.get('train_size')} `{cfg.get('task')}` problems generated from the task's train split "
                f"(seed {cfg.get('seed')}, options {cfg.get('task_options') or {}})")
    held = (f"`{cfg['eval_file']}`" if cfg.get("eval_file") else
            f"{cfg.get('eval_size')} problems of the test split (disjoint from training and from the tiny base's "
            "pretraining)")
    steps = {e["step"] for e in evals}
    cols = sorted(steps)[:1] + sorted(steps)[-1:] if len(steps) > 1 else sorted(steps)
    keys = [k for k in ("accuracy", "reward", "format_rate", "response_len_mean", "truncated")
            if any(k in e for e in evals)] + sorted({k for e in evals for k in e if k.startswith(("mean@", "pass@"))})
    rows = []
    for budget in sorted({e.get("budget") for e in evals}, key=lambda b: -1 if b is None else b):
        at = {e["step"]: e for e in evals if e.get("budget") == budget}
        label = "" if budget is None else f" (stated budget {budget})"
        rows += [[k + label] + [at.get(s, {}).get(k, "") for s in cols] for k in keys]
    table = _table(["metric"] + [f"step {s}" for s in cols], rows)
    results = (f"Greedy decoding on the held-out set ({held}):\n\n{table}"
               if rows else "No held-out evaluation ran (eval_every: 0 or eval_size: 0).")
    return {"kind": f"RL ({cfg.get('algorithm')})", "base": cfg.get("model"), "config": cfg,
            "tags": ["rl", cfg.get("algorithm"), cfg.get("task")], "data": data,
            "steps": f"{metrics[-1]['step'] if metrics else 0} of max_steps {cfg.get('max_steps')}, "
                     f"{cfg.get('prompts_per_step')} prompts x {cfg.get('n')} samples each",
            "results": results}


def _sft(run: Path) -> dict:
    cfg = _read(run / "config.yaml") or {}
    s = _read(run / "summary.json") or {}
    data = (f"`{cfg.get('data')}`: {s.get('examples')} traces ({s.get('target_tokens')} target tokens) in the "
            f"`{cfg.get('format')}` format; {s.get('truncated', 0)} truncated and {s.get('dropped_too_long', 0)} "
            f"dropped at max_seq_len {cfg.get('max_seq_len')}")
    results = (f"Final training loss {_num(s.get('final_loss'))}. This stage measures nothing held out: run "
               "`budgetthink eval --model DIR` for accuracy over thinking budgets.")
    return {"kind": "SFT (distillation)", "base": cfg.get("model"), "config": cfg, "tags": ["sft", "distillation"],
            "data": data, "steps": f"{s.get('steps')} optimizer steps of {cfg.get('batch_size')} examples "
                                   f"({cfg.get('epochs')} epochs planned)", "results": results}


def _tiny(run: Path) -> dict:
    r = _read(run / "build_report.json") or {}
    corpus, train, check = r.get("corpus", {}), r.get("train", {}), r.get("check", {})
    config = {k: r.get(k) for k in ("preset", "shape", "seed", "schedule", "dtype", "recipe_version", "countdown",
                                    "format")}
    kinds = ", ".join(f"{n} {k}" for k, n in (corpus.get("kinds") or {}).items())
    data = (f"{corpus.get('documents')} generated documents ({kinds}) over "
            f"{corpus.get('countdown_problems')} Countdown problems of the pretrain split")
    rows = [[k, check[k]] for k in ("format_rate", "accuracy", "mean_reward", "thinking_closed_rate") if k in check]
    results = (f"Greedy decoding on {check.get('problems')} held-out Countdown problems (test split):\n\n"
               + _table(["metric", "value"], rows))
    return {"kind": f"tiny base ({r.get('preset')} preset, {r.get('parameters')} parameters)",
            "base": None, "config": config, "tags": ["tiny", "pretrained-here"], "data": data,
            "steps": f"{train.get('steps')} pretraining steps, {train.get('tokens')} tokens; final loss "
                     f"{_num(train.get('final_loss'))}", "results": results}


STAGES = {"rl": _rl, "sft": _sft, "tiny": _tiny}


# --- the bill ------------------------------------------------------------------------------------------------------
def _bill(run: Path) -> str:
    from budgetthink.bill import make_bill as bill
    from budgetthink.ledger import LEDGER_FILE

    if not (run / LEDGER_FILE).is_file():
        return "No ledger.jsonl in the run directory."
    b = bill([run])
    money = lambda s: f"${s['cost']:.2f}" + (f" + {s['unpriced_lines']} unpriced" if s["unpriced_lines"] else "")
    rows = [[s["stage"], f"{s['wall_s'] / 60:.1f} min", f"{s['device_hours']:.3f}", s["tokens_generated"],
             s["tokens_trained"], money(s)] for s in b["stages"]]
    t = b["total"]
    rows.append(["**total**", f"{t['wall_s'] / 60:.1f} min", f"{t['device_hours']:.3f}", t["tokens_generated"],
                 t["tokens_trained"], money(t)])
    note = (" It includes the base model's own ledger." if b["followed_models"] else "")
    return (_table(["stage", "wall", "device-hours", "tokens generated", "tokens trained", "cost"], rows) +
            f"\n\nFrom `budgetthink cost {run}` (prices: budgetthink's price table).{note}")


# --- the card -------------------------------------------------------------------------------------------------
def render(model_dir: Path, run: Path, stage: str) -> str:
    from budgetthink.tracking import command_line

    c = STAGES[stage](Path(run))
    meta = {"library_name": "transformers", **({"base_model": c["base"]} if c["base"] else {}),
            "tags": ["budgetthink", *[t for t in c["tags"] if t]]}
    base = f"`{c['base']}`" if c["base"] else "none (built and pretrained from scratch)"
    return "\n".join([
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {Path(run).resolve().name}", "",
        f"Made by budgetthink: {c['kind']}, {time.strftime('%Y-%m-%d')}.", "",
        "## How it was made", "",
        f"- command: `{command_line()}`",
        f"- base model: {base}",
        f"- data: {c['data']}",
        f"- steps: {c['steps']}", "",
        "## Held-out results", "", c["results"], "",
        "## The bill", "", _bill(Path(run)), "",
        "## Config", "", "```yaml", yaml.safe_dump(c["config"], sort_keys=False).strip(), "```", "",
        "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{model_dir}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{model_dir}")', "```", "",
    ])


def write(model_dir: Path, run: Path, stage: str) -> Path:
    """Write MODEL_DIR/README.md from the run directory's files; returns its path."""
    path = Path(model_dir) / CARD
    atomic_write_text(path, render(model_dir, run, stage))
    return path
