"""Test-time scaling evaluation: budget sweeps, s1's metrics, parallel voting, and a report to look at.

    budgetthink eval --model runs/tiny --task countdown --n 200 --seed 0 \\
        --budgets 16,32,64,128 --extensions 0,1,2,4 --samples 8 --out runs/eval
    budgetthink eval --model runs/rl --model runs/rl-budget --task countdown --n 200 \\
        --budgets 16,32,64,128 --budget-in-prompt --out runs/eval-budget

For each model and *method* (how a budget is imposed), every *setting* is run on the same N problems:

| method          | prompt states B | engine forces      | settings                                    |
| forced          | no              | max B (s1 BF)      | one per budget B; one per extension count N |
| stated          | yes             | no (safety cap 4B) | one per budget B                            |
| stated+forced   | yes             | max B              | one per budget B                            |

An extension setting (method `forced` only) suppresses the end of thinking N times, appending the
extension string ("Wait"), under a thinking cap of the largest budget (`extension_max_thinking`); N=0 is
the model thinking as long as it likes up to that cap. The sequential settings decode greedily. With
`samples` K > 1, each method also draws K samples per problem at `temperature` under the smallest budget
(`parallel_budget`) for parallel scaling.

Metrics (s1 §3.2), per model and method, over its sequential settings A (x = a setting's mean thinking
tokens per problem, f = its accuracy):
- **Control**: share of runs whose thinking stayed within the requested bounds (a budget setting: at most B
  thinking tokens, at least the minimum; an extension setting: at most the cap, and N extensions made unless
  the cap came first). s1 writes it 1/|A| sum_a 1[a_min <= a <= a_max]; here every sample is a run.
- **Scaling**: mean slope of accuracy over thinking tokens across all pairs of settings,
  1/C(|A|,2) sum_{a<b} (f(b) - f(a)) / (b - a). Units: **percentage points of accuracy per 1,000 thinking
  tokens** (the model's own tokens, sampled only). Pairs with equal token counts have no slope and are
  left out. Negative when more thinking makes it worse.
- **Performance**: the best accuracy over the settings (percent).
- **Control error**: mean |used - B| / B over the samples of the budget settings (LCPO's measure of how
  closely a stated budget is followed; 0 is exact).
- **Parallel scaling** (s1 Fig. 4b): for k = 1, 2, 4, ..., K, majority-vote accuracy over k samples against
  the mean *total* thinking tokens of those k samples, so voting is compared with sequential forcing at
  the same token cost; and pass@k by the unbiased estimator 1 - C(n-c, k) / C(n, k).

Majority vote: each sample votes with its extracted answer, whitespace removed (no answer: no vote); the
answers scored correct vote together, since each is equivalent to the reference and so to one another
(wrong answers merge only when their text is the same, e.g. math's `1/2` and `0.5` would count apart when
both are wrong). The most votes wins; a tie goes to the answer whose first vote came earliest in sample
order. The vote is correct when the winning answer is.
For k < K the K samples are cut into floor(K/k) disjoint groups of k in order, and the group results are
averaged.

Outputs in `--out`: results.json (rows per setting, parallel rows, summary), samples.jsonl (one line per
sample; a rerun with the same settings skips the settings already there), scaling.png and report.html
(report.py draws and writes those two).
"""

import hashlib
import json
import platform
import shlex
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from budgetthink.config import Config
from budgetthink.errors import UserError
from budgetthink.jsonl import iter_jsonl
from budgetthink.report import plot, render_html, short_name

METHODS = ("forced", "stated", "stated+forced")
DELIMITER_ROOM = 16  # sampled tokens allowed per end of thinking on top of the budgets (s1's is ~5 tokens)
STATED_CAP_FACTOR = 4  # `stated` runs are unforced, but thinking is cut at 4x the stated budget so runs end


# ---------------------------------------------------------------------------------------------------------
# Pure metrics
# ---------------------------------------------------------------------------------------------------------
def within_bounds(thinking_tokens: int, extensions: int = 0, *, max_tokens: int | None = None,
                  min_tokens: int = 0, min_extensions: int = 0) -> bool:
    """Did one run's thinking stay within the requested bounds? Reaching the maximum excuses missing
    extensions (budget forcing makes none after the maximum)."""
    if thinking_tokens < min_tokens:
        return False
    if max_tokens is not None and thinking_tokens > max_tokens:
        return False
    capped = max_tokens is not None and thinking_tokens >= max_tokens
    return extensions >= min_extensions or capped


def control(flags: list[bool]) -> float | None:
    """Share of runs within bounds (0..1); None without runs."""
    return sum(map(bool, flags)) / len(flags) if flags else None


def control_error(used: list[int], budgets: list[int]) -> float | None:
    """Mean |used - B| / B over runs (0 is exact; 0.5 means half a budget off on average)."""
    pairs = [(u, b) for u, b in zip(used, budgets, strict=True) if b]
    return sum(abs(u - b) / b for u, b in pairs) / len(pairs) if pairs else None


def scaling(tokens: list[float], accuracies: list[float]) -> float | None:
    """s1's Scaling: mean over pairs of settings of (f(b) - f(a)) / (b - a), in accuracy units per token.

    Give accuracies in percent and multiply by 1000 for percentage points per 1,000 tokens (what the report
    shows). Pairs with equal token counts are left out; None if no pair has a slope."""
    slopes = []
    for i in range(len(tokens)):
        for j in range(i + 1, len(tokens)):
            if tokens[i] != tokens[j]:
                slopes.append((accuracies[j] - accuracies[i]) / (tokens[j] - tokens[i]))
    return sum(slopes) / len(slopes) if slopes else None


def performance(accuracies: list[float]) -> float | None:
    """s1's Performance: the best accuracy."""
    return max(accuracies) if accuracies else None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i), stable for large n
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def vote_key(extracted: str | None, correct: bool = False) -> str | None:
    """What a sample votes for: its extracted answer without whitespace (None: no answer, no vote).
    Correct answers all vote together: each is equivalent to the reference, hence to one another."""
    if extracted is None:
        return None
    if correct:
        return "<correct>"
    key = "".join(str(extracted).split())
    return key or None


def majority_vote(keys: list[str | None]) -> int | None:
    """Index of the sample whose answer wins the vote (the first sample giving it); None if nobody voted.
    Ties go to the answer whose first vote came earliest."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None
    best = max(counts, key=lambda a: (counts[a], -first[a]))
    return first[best]


def ks_up_to(K: int) -> list[int]:
    """1, 2, 4, ... up to K, with K itself last."""
    ks, k = [], 1
    while k < K:
        ks.append(k)
        k *= 2
    return ks + [K]


def parallel_scaling(problems: list[list[tuple[str | None, bool, int]]]) -> list[dict]:
    """Majority vote and pass@k for k = 1, 2, 4, ..., K.

    problems: one list per problem of its K samples, each (vote key, correct, thinking tokens).
    Returns rows {k, majority_accuracy, pass_at_k, total_thinking_tokens}: accuracies in 0..1, tokens the
    mean over problems (and groups) of the summed thinking tokens of k samples."""
    K = min(len(s) for s in problems)
    rows = []
    for k in ks_up_to(K):
        votes, totals, passes = [], [], []
        for samples in problems:
            samples = samples[:K]
            for g in range(K // k):
                group = samples[g * k:(g + 1) * k]
                winner = majority_vote([s[0] for s in group])
                votes.append(winner is not None and bool(group[winner][1]))
                totals.append(sum(s[2] for s in group))
            passes.append(pass_at_k(K, sum(bool(s[1]) for s in samples), k))
        rows.append({"k": k, "majority_accuracy": sum(votes) / len(votes), "pass_at_k": sum(passes) / len(passes),
                     "total_thinking_tokens": sum(totals) / len(totals)})
    return rows


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def aggregate(records: list[dict]) -> dict:
    """Rows, parallel rows and summary from per-sample records (see `_record`)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["model"], r["method"], r["setting"])].append(r)
    rows, parallel = [], []
    for (model, method, setting), rs in groups.items():
        head = rs[0]
        if head["kind"] == "parallel":
            by_problem: dict[int, list[dict]] = defaultdict(list)
            for r in sorted(rs, key=lambda r: r["sample"]):
                by_problem[r["problem"]].append(r)
            table = [[(vote_key(r["extracted"], r["correct"]), r["correct"], r["thinking_tokens"]) for r in samples]
                     for samples in by_problem.values()]
            for p in parallel_scaling(table):
                parallel.append({"model": model, "method": method, "setting": setting, "budget": head["budget"],
                                 **p, "majority_accuracy": 100 * p["majority_accuracy"],
                                 "pass_at_k": 100 * p["pass_at_k"]})
            continue
        budgets = [r["budget"] for r in rs] if head["kind"] == "budget" else []
        rows.append({
            "model": model, "method": method, "setting": setting, "kind": head["kind"], "budget": head["budget"],
            "extensions": head["extensions_requested"], "n": len(rs),
            "accuracy": 100 * _mean([float(r["correct"]) for r in rs]),
            "mean_reward": _mean([r["reward"] for r in rs]),
            "thinking_tokens": _mean([r["thinking_tokens"] for r in rs]),
            "answer_tokens": _mean([r["answer_tokens"] for r in rs]),
            "extensions_made": _mean([r["extensions"] for r in rs]),
            "control": 100 * control([r["within"] for r in rs]),
            "control_error": control_error([r["thinking_tokens"] for r in rs], budgets) if budgets else None,
        })
    rows.sort(key=lambda r: (r["model"], METHODS.index(r["method"]), r["kind"] != "budget",
                             r["budget"] or 0, r["extensions"]))
    summary = []
    for model, method in dict.fromkeys((r["model"], r["method"]) for r in rows):
        rs = [r for r in rows if (r["model"], r["method"]) == (model, method)]
        runs = [r for r in records if (r["model"], r["method"]) == (model, method) and r["kind"] != "parallel"]
        budget_runs = [r for r in runs if r["kind"] == "budget"]
        slope = scaling([r["thinking_tokens"] for r in rs], [r["accuracy"] for r in rs])
        best = max(rs, key=lambda r: r["accuracy"])
        par = [p for p in parallel if (p["model"], p["method"]) == (model, method)]
        summary.append({
            "model": model, "method": method,
            "control": 100 * control([r["within"] for r in runs]),
            "scaling": None if slope is None else 1000 * slope,
            "performance": best["accuracy"], "best_setting": best["setting"],
            "control_error": control_error([r["thinking_tokens"] for r in budget_runs],
                                           [r["budget"] for r in budget_runs]),
            "majority_at_K": par[-1]["majority_accuracy"] if par else None,
            "pass_at_K": par[-1]["pass_at_k"] if par else None,
            "K": par[-1]["k"] if par else None,
        })
    return {"rows": rows, "parallel": parallel, "summary": summary}


# ---------------------------------------------------------------------------------------------------------
# Settings: what each run asks of the engine
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Setting:
    label: str  # "B=16", "ext=2", "vote K=8 B=16"
    kind: str  # "budget", "ext" or "parallel"
    budget: int | None  # the requested (or stated) thinking budget B
    extensions: int  # requested extensions N
    stated: int | None  # budget written into the prompt, or None
    max_thinking: int  # what the engine caps thinking at
    bound: int  # the maximum the run should stay within (B, or the extension cap)
    samples: int  # samples per problem
    temperature: float


def make_settings(method: str, budgets: list[int], extensions: list[int], samples: int, temperature: float,
                  extension_max_thinking: int, parallel_budget: int) -> list[Setting]:
    stated, forced = method != "forced", method != "stated"
    cap = (lambda b: b) if forced else (lambda b: STATED_CAP_FACTOR * b)
    out = [Setting(f"B={b}", "budget", b, 0, b if stated else None, cap(b), b, 1, 0.0) for b in budgets]
    if method == "forced":
        out += [Setting(f"ext={e}", "ext", None, e, None, extension_max_thinking, extension_max_thinking, 1, 0.0)
                for e in extensions]
    if samples > 1:
        b = parallel_budget
        out.append(Setting(f"vote K={samples} B={b}", "parallel", b, 0, b if stated else None, cap(b), b,
                           samples, temperature))
    return out


def _record(model, method, s: Setting, index: int, problem, sample: int, completion, score, sig: str) -> dict:
    t = completion.thinking_tokens
    return {
        "sig": sig, "model": model, "method": method, "setting": s.label, "kind": s.kind, "budget": s.budget,
        "extensions_requested": s.extensions, "problem": index, "problem_id": problem.id, "sample": sample,
        "thinking_tokens": t, "answer_tokens": completion.answer_tokens, "extensions": completion.extensions,
        "finish_reason": completion.finish_reason, "reward": score.reward, "correct": bool(score.correct),
        "formatted": bool(score.formatted), "extracted": score.extracted,
        "within": within_bounds(t, completion.extensions, max_tokens=s.bound, min_extensions=s.extensions),
        "text": completion.text,
    }


def parse_ints(text: str | list[int] | None, flag: str) -> list[int]:
    """`"16,32,64"` -> [16, 32, 64] for a comma-separated flag (empty: [])."""
    if text is None:
        return []
    if isinstance(text, (list, tuple)):
        return [int(x) for x in text]
    try:
        return [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise UserError(f"{flag} takes whole numbers separated by commas, e.g. 16,32,64 (got {text!r})") from None


def versions(engine: str = "torch") -> dict:
    import budgetthink

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers") + (("vllm",) if engine == "vllm" else ()):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    out["budgetthink"] = budgetthink.__version__
    return out


# ---------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------
def fingerprint(model: str) -> str:
    """Names, sizes and times of a model directory's weight files, hashed: a retrained model at the same path
    does not reuse the samples of the old one."""
    path = Path(model)
    files = sorted(f for f in path.glob("*") if f.suffix in (".safetensors", ".bin", ".pt")) if path.is_dir() else []
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha1(json.dumps([str(model), stamp]).encode()).hexdigest()[:12]


def _check(models, n, budgets, extensions, samples, methods):
    if not models:
        raise UserError("no model given; pass --model DIR (repeat it to compare models)")
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    if not budgets or any(not isinstance(b, int) or b < 1 for b in budgets):
        raise UserError(f"--budgets must be positive token counts, e.g. 16,32,64,128 (got {budgets})")
    if any(not isinstance(e, int) or e < 0 for e in extensions):
        raise UserError(f"--extensions must be counts >= 0, e.g. 0,1,2,4 (got {extensions})")
    if samples < 1:
        raise UserError(f"--samples must be at least 1, got {samples}")
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UserError(f"unknown method(s) {bad or methods}; use {', '.join(METHODS)}")


class EvalConfig(Config):
    """Settings of `budgetthink eval`: what is run on which problems (the models, the output directory and the
    engine are given beside it). The budget sweep's bounds are checked in _check, with the flags' names."""

    task: str = Field(description="task name: countdown, multiply or math")
    n: int = Field(description="problems (the same for every model and setting)")
    seed: int = Field(0, description="seeds the problems and sampling")
    budgets: list[int] = Field(description="maximum thinking budgets of the budget settings (sorted, deduplicated)")
    extensions: list[int] = Field(default_factory=list, description="extension counts of the extension settings")
    samples: int = Field(1, description="K samples per problem for majority vote and pass@k (1: none)")
    methods: list[str] | None = Field(None, description="several of forced, stated, stated+forced; None: from "
                                      "budget_in_prompt and force")
    budget_in_prompt: bool = Field(False, description="state each budget in the prompt (method stated[+forced])")
    force: bool = Field(True, description="enforce each budget by budget forcing")
    fmt: str = Field("tinyzero", description="think format: tinyzero, s1 or r1")
    prompt: str = Field("auto", description="prompt style (formats.Prompter): auto, chat or raw")
    task_options: dict = Field(default_factory=dict, description="options passed to the task (e.g. split)")
    max_answer_tokens: int = Field(64, description="cap on sampled answer tokens after thinking ends")
    temperature: float = Field(1.0, description="temperature of the K samples (the sweeps decode greedily)")
    parallel_budget: int | None = Field(None, description="thinking budget of the K samples; None: the smallest")
    extension_max_thinking: int | None = Field(None, description="thinking cap of the extension settings; None: "
                                               "the largest budget")
    extension_string: str | None = Field(None, description="appended at each extension; None: Budget's default")
    batch_size: int = Field(64, ge=1, description="problems per engine call")
    device: str | None = Field(None, description="device of a loaded engine (None: its default)")
    dtype: str | None = Field(None, description="dtype of a loaded engine (None: its default)")


def _run(models: list[str], cfg: EvalConfig, out: Path, engine="torch", command: str | None = None,
         quiet: bool = False) -> dict:
    """Evaluate `models` under `cfg`; write results.json, samples.jsonl, scaling.png and report.html under
    `out`; return the results dict. `engine` is a backend name ("torch", "vllm") or an object with the engine's
    `generate` (used for every model)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from budgetthink.engine import Budget, Sampling, load_engine
    from budgetthink.formats import Prompter, get_format
    from budgetthink.jsonl import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl, write_jsonl
    from budgetthink.tasks import get_task

    methods = cfg.methods
    if methods is None:
        if not cfg.budget_in_prompt and not cfg.force:
            raise UserError("with neither budget forcing nor --budget-in-prompt every budget is the same run; "
                            "drop --no-force or add --budget-in-prompt")
        methods = ["stated+forced" if cfg.force else "stated"] if cfg.budget_in_prompt else ["forced"]
    models, budgets, extensions = [str(m) for m in models], sorted(set(cfg.budgets)), sorted(set(cfg.extensions))
    samples, seed, max_answer_tokens = cfg.samples, cfg.seed, cfg.max_answer_tokens
    _check(models, cfg.n, budgets, extensions, samples, methods)
    ext_cap = cfg.extension_max_thinking or budgets[-1]
    par_budget = cfg.parallel_budget or budgets[0]
    form = get_format(cfg.fmt)
    the_task = get_task(cfg.task, **cfg.task_options)
    problems = the_task.generate(cfg.n, seed)
    if not problems:
        raise UserError(f"task {cfg.task!r} gave no problems; check its options (e.g. the problem file)")
    n = len(problems)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"task": cfg.task, "task_options": cfg.task_options, "n": n, "seed": seed, "format": cfg.fmt,
              "max_answer_tokens": max_answer_tokens, "temperature": cfg.temperature,
              "extension_string": cfg.extension_string, "ext_cap": ext_cap, "parallel_budget": par_budget,
              "engine": engine if isinstance(engine, str) else type(engine).__name__}
    sig = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]

    # resume: keep the complete settings of an earlier run with the same signature and unchanged weights
    samples_path = out / "samples.jsonl"
    old = read_jsonl(samples_path, skip_bad=True) if samples_path.exists() else []
    prints = {m: fingerprint(m) for m in models}
    kept = [r for r in old if r.get("sig") == sig and r.get("weights") == prints.get(r["model"], r.get("weights"))]
    if len(kept) != len(old):
        write_jsonl(samples_path, kept)
    done: dict[tuple, int] = defaultdict(int)
    for r in kept:
        done[(r["model"], r["method"], r["setting"])] += 1

    plan = [(m, meth, s) for m in models for meth in methods
            for s in make_settings(meth, budgets, extensions, samples, cfg.temperature, ext_cap, par_budget)]
    records = []
    console = Console(stderr=True, quiet=quiet)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        loaded = {}
        for model, method, s in plan:
            key, want = (model, method, s.label), n * s.samples
            if done.get(key) == want:
                records += [r for r in kept if (r["model"], r["method"], r["setting"]) == key]
                continue
            if done.get(key):  # a partial setting (killed mid-way): drop it and redo it
                kept = [r for r in kept if (r["model"], r["method"], r["setting"]) != key]
                write_jsonl(samples_path, kept)
            if model not in loaded:
                loaded.clear()  # one model in memory at a time
                options = {k: v for k, v in (("device", cfg.device), ("dtype", cfg.dtype)) if v is not None}
                eng = engine if not isinstance(engine, str) else load_engine(model, backend=engine, **options)
                loaded[model] = eng, Prompter(form, eng.tokenizer, cfg.prompt)
                loaded[model][1].check_thinking()  # every setting here is a thinking budget
            eng, prompter = loaded[model]
            budget = Budget(max_thinking_tokens=s.max_thinking, extensions=s.extensions,
                            extension_string=cfg.extension_string, max_answer_tokens=max_answer_tokens)
            # max_tokens counts every sampled token, removed end-of-thinking tokens included: leave room for them
            room = s.max_thinking + max_answer_tokens + DELIMITER_ROOM * (s.extensions + 1)
            sampling = Sampling(temperature=s.temperature, max_tokens=room, seed=seed)
            bar = progress.add_task(f"{short_name(model)} {method} {s.label}", total=want)
            new = []
            for start in range(0, n, cfg.batch_size):
                chunk = problems[start:start + cfg.batch_size]
                encoded = [prompter.encode(p.prompt, s.stated) for p in chunk]
                outs = eng.generate([t for t, _ in encoded], sampling, n=s.samples, budget=budget, fmt=form,
                                    prompt_ids=[ids for _, ids in encoded])
                if len(outs) != len(chunk) * s.samples:
                    raise RuntimeError(f"engine returned {len(outs)} completions for {len(chunk)} x {s.samples}")
                for j, c in enumerate(outs):
                    i = start + j // s.samples
                    p = problems[i]
                    new.append(_record(model, method, s, i, p, j % s.samples, c, the_task.score(p, c.text), sig)
                               | {"weights": prints[model]})
                progress.advance(bar, len(outs))
            append_jsonl(samples_path, new)
            records += new

    results = {"command": command or shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]),
               "versions": versions(config["engine"]), "models": models, "methods": list(methods),
               "budgets": budgets, "extensions": extensions, "samples": samples, **config, **aggregate(records)}
    atomic_write_json(out / "results.json", results)
    tmp_png = out / ".scaling.png.tmp"
    plot(results, tmp_png)
    tmp_png.replace(out / "scaling.png")
    atomic_write_text(out / "report.html", render_html(results))
    return results


def run(models: list[str], task: str, n: int, seed: int, budgets: list[int], extensions: list[int] = (),
        out: Path = Path("eval"), engine="torch", command: str | None = None, quiet: bool = False,
        **settings) -> dict:
    """`_run` with an EvalConfig of these settings, recorded as the `eval` stage in OUT/ledger.jsonl (tokens
    generated over all settings)."""
    from pydantic import ValidationError

    from budgetthink.config import explain
    from budgetthink.ledger import stage_ledger

    try:
        cfg = EvalConfig(task=task, n=n, seed=seed, budgets=list(budgets), extensions=list(extensions or []),
                         **settings)
    except ValidationError as e:
        raise explain(EvalConfig, e, "eval settings") from None

    samples = Path(out) / "samples.jsonl"
    done = len(list(iter_jsonl(samples))) if samples.exists() else 0
    with stage_ledger(out, stage="eval", model=None) as entry:
        results = _run(models, cfg, Path(out), engine, command, quiet)
        entry.add(tokens_generated=sum(len(r.get("token_ids") or []) or
                                       int(r.get("thinking_tokens") or 0) + int(r.get("answer_tokens") or 0)
                                       for r in list(iter_jsonl(samples))[done:]))
    return results
