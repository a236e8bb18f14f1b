"""s1K-style curation: from a pool of teacher traces to n hard, diverse, clean ones, with an honest funnel.

    budgetthink curate --in traces.jsonl --n 1000 --out selected.jsonl \
        [--require-correct] [--max-chars 20000] [--difficulty-models runs/base,runs/instruct] \
        [--domain-field problem.meta.domain | --clusters 50] [--decontaminate eval.jsonl] [--keep-field keep] \
        [--no-prefer-long]

Stages, each optional, each counted in `funnel.json` beside `out` (as s1 reports 59,029 -> 54,116 -> 51,581
-> 24,496 -> 1,000), run in this order:

1. Quality. Drops, each reason counted: malformed lines (not JSON, or lacking id / problem / thinking /
   answer), repeated ids (the first line wins), teacher errors (`error` set by `distill`), empty thinking or
   answer, thinking or answer that contain the format's think delimiters (a broken trace), traces longer than
   `max_chars` characters (thinking + answer) or `max_thinking_tokens`, and, with `require_correct`, traces
   whose answer the task scored wrong.
2. Decontamination. Drops problems whose prompt shares a word 8-gram with a text of the `decontaminate`
   files (JSONL: the `prompt`, `question`, `problem` or `text` field; any other file: each line). Words are
   lower-cased runs of letters and digits. A prompt shorter than 8 words is contaminated if its whole word
   sequence occurs in an evaluation text. An 8-gram shared by more than 10% of the pool (and by at least 5
   problems) is prompt template, not content, and is ignored: otherwise one shared instruction would flag
   every problem. s1 decontaminated its pool first; here it runs after the cheap quality checks and before the
   costly difficulty stage, and before selection so that all n selected problems are clean.
3. Difficulty. Each of `difficulty_models` (model directories) answers every remaining problem through the
   engine, greedy, with the given budget; a problem any of them solves (the task's score of the whole
   completion is correct) is dropped. As in s1 the teacher's trace length is the difficulty measure.
4. Diversity (selection). Each problem gets a domain: `domain_field` (a dotted path into the line, e.g.
   `problem.meta.domain`), or, with `clusters=K`, k-means over TF-IDF vectors of the prompts (scikit-learn).
   Without either, Countdown problems take the shape of the solver's solution with the numbers hidden
   (`countdown:(n*n)+n`: which operations, in which nesting, solve it), multiplication problems the digit
   counts of the operands (`multiply:3x2`), and other tasks are clustered (K = sqrt of the pool, 2..50).
   Then s1's Algorithm 1: problems marked by `keep_field` are taken first; then, until n are chosen, a domain
   is picked at random, its remaining problems are ranked by trace length (longest first, ties by id) and one
   is drawn with weight 2^-rank (ranks past 63, whose weight is below 2^-63, are never drawn); a domain is
   dropped when empty. `prefer_long=False` draws uniformly within the domain instead. Where trace length is
   not what makes a problem hard it only skews the selection: the Countdown solver's trace is as long as the
   hit is late in its fixed search order, so favouring length taught the tiny model that hits come late (37%
   of the selected traces hit at line 7 or later, 23% of held-out problems). Fine-tuned 30 epochs, it missed
   early hits and reached 27.0% on held-out problems; the same pipeline with uniform draws reached 35.0%
   (benchmarks/bench_distill_tiny.py). `domain_draw="s1"` picks each domain independently and uniformly,
   exactly as the paper; the default `"rounds"` visits the domains in a fresh random order each round, one
   draw per domain, so each is picked equally often and every domain is represented once n reaches the number
   of domains.

Trace length is `thinking_tokens` when every trace in the pool has it, else the thinking's characters; the
unit is written in the funnel. Everything is deterministic for a seed. A PNG beside `out` shows the domain
histogram and the trace-length distribution of the pool entering selection and of the selection.
"""

import math
import random
import re
import sys
from collections import Counter
from pathlib import Path

from budgetthink.engine import Budget, Sampling
from budgetthink.errors import UserError
from budgetthink.formats import Prompter, get_format
from budgetthink.jsonl import atomic_write_json, fresh_output, iter_jsonl, write_jsonl
from budgetthink.tasks import Problem, get_task

NGRAM = 8
TEMPLATE_SHARE, TEMPLATE_MIN = 0.10, 5  # an n-gram in more than 10% of the pool (and >= 5 problems) is template
MAX_RANK = 63  # 2^-64 and below: never drawn
_WORD = re.compile(r"\w+")


def field(record: dict, path: str):
    """The value at a dotted path (`problem.meta.domain`), or None."""
    node = record
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# ---- 1. quality -------------------------------------------------------------------------------------------
def quality(records: list[dict], fmt, require_correct: bool, max_chars: int | None,
            max_thinking_tokens: int | None) -> tuple[list[dict], Counter]:
    """(kept records, Counter of drop reasons)."""
    kept, dropped, seen = [], Counter(), set()
    delims = [d for d in (fmt.think_open.strip(), fmt.think_close.strip()) if d]
    for r in records:
        thinking, answer = r.get("thinking"), r.get("answer")
        if r.get("error"):
            dropped["teacher_error"] += 1
            continue
        try:
            if r.get("id") is None or not isinstance(r.get("problem"), dict):
                raise UserError("no id or problem")
            Problem.from_dict(r["problem"])
        except UserError:
            dropped["malformed"] += 1
            continue
        if not isinstance(thinking, str) or not isinstance(answer, str):
            dropped["malformed"] += 1
            continue
        if str(r["id"]) in seen:
            dropped["duplicate_id"] += 1
            continue
        seen.add(str(r["id"]))
        if not thinking.strip() or not answer.strip():
            dropped["empty"] += 1
        elif any(d in thinking or d in answer for d in delims):
            dropped["broken_delimiters"] += 1
        elif ((max_chars is not None and len(thinking) + len(answer) > max_chars)
              or (max_thinking_tokens is not None and (r.get("thinking_tokens") or 0) > max_thinking_tokens)):
            dropped["too_long"] += 1
        elif require_correct and not r.get("correct"):
            dropped["wrong"] += 1
        else:
            kept.append(r)
    return kept, dropped


# ---- 2. decontamination -----------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(ws: list[str], k: int) -> set[tuple]:
    return {tuple(ws[i:i + k]) for i in range(len(ws) - k + 1)}


def eval_texts(path: str | Path) -> list[str]:
    """Texts of an evaluation file: JSONL prompts/questions, or the lines of any other file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"decontamination file {path} not found; pass existing evaluation files")
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for r in iter_jsonl(path):
            for key in ("prompt", "question", "problem", "text"):
                value = r.get(key)
                if isinstance(value, dict):
                    value = value.get("prompt")
                if isinstance(value, str):
                    texts.append(value)
                    break
        return texts
    return [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]


def decontaminate_pool(records: list[dict], paths: list, k: int = NGRAM) -> tuple[list[dict], list[str], int]:
    """(kept records, ids dropped, template n-grams ignored)."""
    evals = [words(t) for p in paths for t in eval_texts(p)]
    prompts = [words(r["problem"]["prompt"]) for r in records]
    df = Counter(g for ws in prompts for g in ngrams(ws, k))
    template = {g for g, c in df.items() if c > TEMPLATE_SHARE * len(records) and c >= TEMPLATE_MIN}
    by_len: dict[int, set] = {k: set().union(*(ngrams(ws, k) for ws in evals)) - template}
    kept, dropped = [], []
    for r, ws in zip(records, prompts):
        m = min(k, len(ws))
        if m == 0:
            kept.append(r)
            continue
        if m not in by_len:  # a short prompt: its whole word sequence, anywhere in an evaluation text
            by_len[m] = set().union(*(ngrams(e, m) for e in evals))
        if ngrams(ws, m) & by_len[m]:
            dropped.append(str(r["id"]))
        else:
            kept.append(r)
    return kept, dropped, len(template)


# ---- 3. difficulty ----------------------------------------------------------------------------------------
def difficulty(records: list[dict], models: list, fmt, budget: Budget, max_tokens: int, batch_size: int,
               backend: str, task_options: dict) -> tuple[list[dict], dict[str, int]]:
    """(records no model solves, {model: problems it solved among those it was asked})."""
    from tqdm import tqdm

    from budgetthink.engine import load_engine

    tasks: dict[str, object] = {}
    solved_by: dict[str, int] = {}
    remaining = records
    sampling = Sampling(temperature=0.0, max_tokens=max_tokens)
    for path in models:
        if not Path(path).exists():
            raise UserError(f"difficulty model {path} not found; pass model directories to --difficulty-models")
        engine = load_engine(path, backend=backend)
        prompter = Prompter(fmt, engine.tokenizer)  # each model prompted as every command prompts it
        keep, solved = [], 0
        for start in tqdm(range(0, len(remaining), batch_size), desc=f"difficulty {Path(path).name}",
                          file=sys.stderr, unit="batch"):
            chunk = remaining[start:start + batch_size]
            problems = [Problem.from_dict(r["problem"]) for r in chunk]
            encoded = [prompter.encode(p.prompt) for p in problems]
            outs = engine.generate([t for t, _ in encoded], sampling, n=1, budget=budget, fmt=fmt,
                                   prompt_ids=[ids for _, ids in encoded])
            for r, p, c in zip(chunk, problems, outs):
                if p.task not in tasks:
                    tasks[p.task] = get_task(p.task, **task_options.get(p.task, {}))
                if tasks[p.task].score(p, c.text).correct:
                    solved += 1
                else:
                    keep.append(r)
        solved_by[str(path)] = solved
        remaining = keep
    return remaining, solved_by


# ---- 4. diversity: domains and s1's selection ------------------------------------------------------------
def _countdown_domain(problem: Problem) -> str:
    from budgetthink.tasks.countdown import search

    found = search(list(problem.answer["numbers"]), int(problem.answer["target"]))
    return "countdown:" + (re.sub(r"\d+", "n", found[1]) if found else "unsolved")


def _multiply_domain(problem: Problem) -> str:
    a, b = problem.meta.get("a"), problem.meta.get("b")
    if a is None or b is None:
        found = re.findall(r"(\d+) ?\* ?(\d+)", problem.prompt)
        if not found:
            return "multiply:unknown"
        a, b = found[-1]
    return f"multiply:{len(str(int(a)))}x{len(str(int(b)))}"


def cluster(texts: list[str], k: int, seed: int) -> list[str]:
    """k-means over TF-IDF vectors; each cluster named by its three heaviest terms."""
    from sklearn.cluster import KMeans
    from sklearn.feature_extraction.text import TfidfVectorizer

    k = max(1, min(k, len(set(texts))))
    if k == 1:
        return ["cluster-00"] * len(texts)
    try:
        vec = TfidfVectorizer(token_pattern=r"(?u)\b\w+\b", max_features=50_000)
        x = vec.fit_transform(texts)  # [N, V] sparse
    except ValueError:  # no words at all
        return ["cluster-00"] * len(texts)
    km = KMeans(n_clusters=k, random_state=seed, n_init=3).fit(x)
    terms = vec.get_feature_names_out()
    names = []
    for c in range(k):
        top = km.cluster_centers_[c].argsort()[::-1][:3]
        names.append(f"cluster-{c:02d}:" + "/".join(terms[i] for i in top))
    return [names[label] for label in km.labels_]


def domains(records: list[dict], domain_field: str | None, clusters: int | None, seed: int) -> tuple[list[str], str]:
    """(a domain per record, how they were found)."""
    if domain_field:
        values = [field(r, domain_field) for r in records]
        if records and all(v is None for v in values):
            raise UserError(f"--domain-field {domain_field!r} is in none of the traces; give a dotted path "
                            "such as problem.meta.domain, or drop it to derive domains")
        return [str(v) if v is not None else "(none)" for v in values], f"field {domain_field}"
    problems = [Problem.from_dict(r["problem"]) for r in records]
    if clusters:
        return cluster([p.prompt for p in problems], clusters, seed), f"k-means over TF-IDF, k={clusters}"
    out: list[str | None] = [None] * len(records)
    others = []
    for i, p in enumerate(problems):
        if p.task == "countdown":
            out[i] = _countdown_domain(p)
        elif p.task == "multiply":
            out[i] = _multiply_domain(p)
        else:
            others.append(i)
    how = "countdown: solution shape; multiply: operand digits"
    if others:
        k = min(50, max(2, round(math.sqrt(len(others)))))
        for i, name in zip(others, cluster([problems[i].prompt for i in others], k, seed)):
            out[i] = name
        how += f"; other tasks: k-means over TF-IDF, k={k}"
    return out, how


def select(items: list[tuple[str, str, float]], n: int, seed: int, keep: set | None = None,
           draw: str = "rounds", prefer_long: bool = True) -> list[str]:
    """s1's selection. items: (id, domain, trace length). Ids in `keep` first, then draws until n (see above)."""
    if draw not in ("rounds", "s1"):
        raise UserError(f"unknown domain draw {draw!r}; use rounds or s1")
    rng = random.Random(f"curate:{seed}")
    keep = keep or set()
    chosen = [i for i, _, _ in items if i in keep]
    pools: dict[str, list[tuple[float, str]]] = {}
    for i, d, length in items:
        if i not in keep:
            pools.setdefault(d, []).append((-float(length), i))
    for pool in pools.values():
        pool.sort()  # longest first, ties by id: rank 0 is the longest
    live = sorted(pools)
    weights = [2.0**-r for r in range(MAX_RANK + 1)]

    def draw_from(d: str) -> None:
        pool = pools[d]
        if prefer_long:
            m = min(len(pool), MAX_RANK + 1)
            rank = rng.choices(range(m), weights=weights[:m])[0]
        else:
            rank = rng.randrange(len(pool))
        chosen.append(pool.pop(rank)[1])

    while len(chosen) < n and live:
        if draw == "s1":
            order = [rng.choice(live)]
        else:
            order = live[:]
            rng.shuffle(order)
        for d in order:
            if len(chosen) >= n:
                break
            draw_from(d)
        live = [d for d in live if pools[d]]
    return chosen


# ---- the plot ----------------------------------------------------------------------------------------------
def plot(path: Path, pool_domains: list[str], pool_lengths: list[float], sel_domains: list[str],
         sel_lengths: list[float], unit: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    counts, chosen = Counter(pool_domains), Counter(sel_domains)
    names = [d for d, _ in counts.most_common(40)]
    x = np.arange(len(names))
    ax1.bar(x - 0.2, [counts[d] / max(1, len(pool_domains)) for d in names], 0.4, label=f"pool ({len(pool_domains)})")
    ax1.bar(x + 0.2, [chosen[d] / max(1, len(sel_domains)) for d in names], 0.4, label=f"selected ({len(sel_domains)})")
    ax1.set_xticks(x, [n[:24] for n in names], rotation=75, fontsize=7)
    ax1.set_ylabel("share of problems")
    ax1.set_title(f"domains ({len(counts)} in pool, {len(chosen)} selected"
                  + (", 40 largest shown)" if len(counts) > 40 else ")"))
    ax1.legend()
    if pool_lengths:
        bins = np.linspace(0, max(pool_lengths) or 1, 40)
        ax2.hist(pool_lengths, bins=bins, density=True, alpha=0.5, label="pool")
        if sel_lengths:
            ax2.hist(sel_lengths, bins=bins, density=True, alpha=0.5, label="selected")
    ax2.set_xlabel(f"trace length ({unit})")
    ax2.set_ylabel("density")
    ax2.set_title("trace length before and after selection")
    ax2.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_funnel(funnel: dict) -> str:
    """`59,029 -> 54,116 -> ...` with stage names."""
    return " -> ".join(f"{s['count']:,} ({s['stage']})" for s in funnel["stages"])


# ---- the command ------------------------------------------------------------------------------------------
def _curate(inp: str | Path, n: int | None, out: str | Path, seed: int = 0, require_correct: bool = False,
           max_chars: int | None = None, max_thinking_tokens: int | None = None, difficulty_models=(),
           difficulty_budget: Budget | None = None, difficulty_max_tokens: int = 256, batch_size: int = 16,
           engine: str = "torch", domain_field: str | None = None, clusters: int | None = None,
           decontaminate=(), keep_field: str | None = None, domain_draw: str = "rounds", prefer_long: bool = True,
           fmt: str = "tinyzero", task_options: dict | None = None, funnel_path: str | Path | None = None,
           plot_path: str | Path | None = None, force: bool = False) -> dict:
    """Select up to n traces from `inp` into `out`; returns the funnel (also written to funnel.json).

    n=None keeps every survivor of the filters (no selection). task_options: {task name: options} used to
    score difficulty-model answers. funnel_path / plot_path default to funnel.json / curation.png beside out."""
    if n is not None and n < 1:
        raise UserError(f"--n must be a positive number of traces, got {n}")
    for name, value in (("--max-chars", max_chars), ("--max-thinking-tokens", max_thinking_tokens),
                        ("--clusters", clusters)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    think_fmt = get_format(fmt)
    out = fresh_output(out, force, inputs=[inp])
    funnel_path = Path(funnel_path) if funnel_path else out.parent / "funnel.json"
    plot_path = Path(plot_path) if plot_path else out.parent / "curation.png"

    bad: dict = {}
    records = list(iter_jsonl(inp, skip_bad=True, stats=bad))
    if not records:
        raise UserError(f"{inp} holds no traces ({bad.get('bad', 0)} malformed lines); write traces with "
                        "`budgetthink distill` first")
    stages = [{"stage": "input", "count": len(records) + bad.get("bad", 0), "note": "lines read, malformed included"}]

    pool, dropped = quality(records, think_fmt, require_correct, max_chars, max_thinking_tokens)
    if bad.get("bad"):
        dropped["malformed"] += bad["bad"]
    stages.append({"stage": "quality", "count": len(pool), "dropped": dict(dropped),
                   "settings": {"require_correct": require_correct, "max_chars": max_chars,
                                "max_thinking_tokens": max_thinking_tokens}})

    files = [str(f) for f in decontaminate or ()]
    if files:
        pool, gone, template = decontaminate_pool(pool, files)
        stages.append({"stage": "decontamination", "count": len(pool), "enabled": True, "files": files,
                       "ngram": NGRAM, "dropped": len(gone), "dropped_ids": gone[:100],
                       "template_ngrams_ignored": template})
    else:
        stages.append({"stage": "decontamination", "count": len(pool), "enabled": False})

    models = [str(m) for m in difficulty_models or ()]
    if models and pool:
        pool, solved_by = difficulty(pool, models, think_fmt, difficulty_budget or Budget(), difficulty_max_tokens,
                                     batch_size, engine, task_options or {})
        stages.append({"stage": "difficulty", "count": len(pool), "enabled": True, "solved_by": solved_by})
    else:
        stages.append({"stage": "difficulty", "count": len(pool), "enabled": bool(models)})

    unit = "thinking_tokens" if pool and all(isinstance(r.get("thinking_tokens"), int) for r in pool) else "chars"
    lengths = {str(r["id"]): float(r["thinking_tokens"] if unit == "thinking_tokens" else len(r["thinking"]))
               for r in pool}
    doms, how = domains(pool, domain_field, clusters, seed) if pool else ([], "none")
    dom_of = {str(r["id"]): d for r, d in zip(pool, doms)}
    keep = {str(r["id"]) for r in pool if keep_field and field(r, keep_field)}
    if n is None:
        chosen = [str(r["id"]) for r in pool]
    else:
        chosen = select([(str(r["id"]), d, lengths[str(r["id"])]) for r, d in zip(pool, doms)], n, seed, keep,
                        domain_draw, prefer_long)
    by_id = {str(r["id"]): r for r in pool}
    selected = []
    for i in chosen:
        r = dict(by_id[i])
        r["curation"] = {"domain": dom_of[i], "length": lengths[i], "length_unit": unit, "kept": i in keep}
        selected.append(r)
    stages.append({"stage": "diversity", "count": len(selected), "enabled": n is not None, "domains_by": how,
                   "draw": domain_draw, "prefer_long": prefer_long, "domains_in_pool": len(set(doms)),
                   "domains_selected": len({dom_of[i] for i in chosen}), "kept": len(keep),
                   "length_unit": unit, "length_selected": sum(lengths[i] for i in chosen)})
    if n is not None and len(keep) > n:
        stages[-1]["note"] = f"{len(keep)} traces marked to keep exceed n={n}; all were kept"

    write_jsonl(out, selected)
    funnel = {"input": str(inp), "out": str(out), "n": n, "seed": seed, "stages": stages,
              "counts": [s["count"] for s in stages], "length_unit": unit,
              "correct_selected": sum(bool(r.get("correct")) for r in selected)}
    funnel["funnel"] = format_funnel(funnel)
    atomic_write_json(funnel_path, funnel)
    plot(plot_path, doms, list(lengths.values()), [dom_of[i] for i in chosen], [lengths[i] for i in chosen], unit)
    print(f"curate: {funnel['funnel']}", file=sys.stderr)
    return funnel


def curate(inp: str | Path, n: int | None, out: str | Path, **kwargs) -> dict:
    """`_curate`, recorded as the `curate` stage in the ledger beside `out`."""
    from budgetthink.ledger import stage_ledger

    with stage_ledger(Path(out).parent, stage="curate", model=None):
        return _curate(inp, n, out, **kwargs)
