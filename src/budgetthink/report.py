"""The test-time scaling report of `budgetthink eval` (evaluate.py writes it): scaling.png, report.html and the
summary table printed to the terminal, from a results dict (results.json).

    budgetthink eval --model runs/tiny --model runs/sft/model --budgets 16,32,64,128 --out runs/eval
"""

import html
import json
from pathlib import Path

FIGSIZE, DPI = (10, 7), 100  # scaling.png is 1000 x 700 pixels
METHOD_LABELS = {"forced": "budget forcing", "stated": "budget in prompt", "stated+forced": "budget in prompt + forcing"}


def plot(results: dict, path: Path) -> None:
    """Accuracy over mean thinking tokens per problem: one colour per model and method; budget settings solid
    (in budget order, labelled B=...), extension settings dotted (labelled ext=N), majority vote over k
    samples dashed (labelled k=...), its x the total thinking tokens of the k samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lines = list(dict.fromkeys((r["model"], r["method"]) for r in results["rows"]))
    xs_all, notes = [], {}  # notes: (x, y, colour, below) -> labels of the points drawn there

    def draw(points, labels, style, marker, color, label, below):
        xs, ys = [max(x, 0.5) for x, _ in points], [y for _, y in points]  # 0.5: a zero stays on a log axis
        xs_all.extend(xs)
        ax.plot(xs, ys, style, marker=marker, color=color, label=label, lw=2 if style != "--" else 1.5)
        for text, x, y in zip(labels, xs, ys):
            notes.setdefault((round(x, 1), round(y, 1), color, below), []).append(text)

    for i, (model, method) in enumerate(lines):
        color, name = colors[i % len(colors)], f"{short_name(model)}: {METHOD_LABELS[method]}"
        rows = [r for r in results["rows"] if (r["model"], r["method"]) == (model, method)]
        seq = [r for r in rows if r["kind"] == "budget"]  # rows come sorted by budget
        if seq:
            draw([(r["thinking_tokens"], r["accuracy"]) for r in seq], [r["setting"] for r in seq], "-", "o",
                 color, name, False)
        ext = [r for r in rows if r["kind"] == "ext"]
        if ext:
            draw([(r["thinking_tokens"], r["accuracy"]) for r in ext], [r["setting"] for r in ext], ":", "s",
                 color, f"{short_name(model)}: extensions (\"{results.get('extension_string') or 'Wait'}\")", False)
        par = [p for p in results["parallel"] if (p["model"], p["method"]) == (model, method)]
        if par:
            draw([(p["total_thinking_tokens"], p["majority_accuracy"]) for p in par], [f"k={p['k']}" for p in par],
                 "--", "^", color, f"{name}, majority vote (B={par[0]['budget']})", True)
    # one label per spot and colour ("B=128, ext=0" where two settings coincide); colours at one spot stack
    stack: dict[tuple, int] = {}
    for (x, y, color, below), texts in notes.items():
        level = stack[(x, y, below)] = stack.get((x, y, below), -1) + 1
        dy = -11 - 9 * level if below else 5 + 9 * level
        ax.annotate(", ".join(dict.fromkeys(texts)), (x, y), textcoords="offset points", xytext=(5, dy),
                    fontsize=7, color=color)
    if xs_all and max(xs_all) / min(xs_all) > 4:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("mean thinking tokens per problem (sampled tokens; for majority vote, all k samples together)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(f"Test-time scaling on {results['task']} (n={results['n']} problems, seed {results['seed']})")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.06)
    handles, labels = ax.get_legend_handles_labels()
    rows_below = (len(labels) + 1) // 2  # the legend goes under the axes, two columns
    bottom = min(0.45, 0.03 + 0.032 * rows_below)
    if labels:
        fig.legend(handles, labels, fontsize=8, ncol=2, loc="lower center", frameon=False)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=DPI, format="png")  # no bbox_inches="tight": the image keeps FIGSIZE x DPI pixels
    plt.close(fig)


GENERIC = {"model", "hf", "final", "merged", "output"}  # folder names that say nothing about the model


def short_name(model: str) -> str:
    """A model's name in tables and legends: its directory, or its parent's for a generic folder name
    (runs/rl/model -> rl, models/smollm2/hf -> smollm2), so two models do not both read "model"."""
    p = Path(str(model))
    return (p.parent.name if p.name in GENERIC and p.parent.name else p.name) or str(model)


def _fmt(v, digits=1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c) if not isinstance(c, str) else c)}</td>" for c in row)
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(results: dict, png_name: str = "scaling.png") -> str:
    """A self-contained page: the plot (by relative path), a summary, a table per model, how it was made."""
    summary = _table(
        ["model", "method", "Control (%)", "Scaling (pp / 1k tokens)", "Performance (%)", "best setting",
         "control error", "majority@K (%)", "pass@K (%)", "K"],
        [[s["model"], s["method"], s["control"], s["scaling"], s["performance"], s["best_setting"],
          _fmt(s["control_error"], 3), s["majority_at_K"],
          s["pass_at_K"], s["K"]] for s in results["summary"]])
    per_model = []
    for model in dict.fromkeys(r["model"] for r in results["rows"]):
        rows = [[r["method"], r["setting"], r["accuracy"], _fmt(r["mean_reward"], 3), r["thinking_tokens"],
                 r["answer_tokens"], r["extensions_made"], r["control"],
                 None if r["control_error"] is None else _fmt(r["control_error"], 3), r["n"]]
                for r in results["rows"] if r["model"] == model]
        part = _table(["method", "setting", "accuracy (%)", "mean reward", "thinking tokens", "answer tokens",
                       "extensions made", "within bounds (%)", "control error", "problems"], rows)
        par = [[p["method"], p["k"], p["majority_accuracy"], p["pass_at_k"], p["total_thinking_tokens"]]
               for p in results["parallel"] if p["model"] == model]
        if par:
            part += "<h3>Parallel scaling (temperature sampling)</h3>" + _table(
                ["method", "k", "majority vote (%)", "pass@k (%)", "total thinking tokens"], par)
        per_model.append(f"<h2>{html.escape(model)}</h2>{part}")
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    settings = (f"task {results['task']} {json.dumps(results['task_options'])}, n={results['n']}, "
                f"seed={results['seed']}, format {results['format']}, engine {results['engine']}, "
                f"budgets {results['budgets']}, extensions {results['extensions']}, samples {results['samples']} "
                f"(temperature {results['temperature']}), max answer tokens {results['max_answer_tokens']}")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>budgetthink eval: {html.escape(results['task'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, td:nth-child(2) {{ text-align: left; }}
code, pre {{ background: #f6f6f6; padding: 0.2em 0.4em; white-space: pre-wrap; word-break: break-all; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
</style></head><body>
<h1>Test-time scaling: {html.escape(results['task'])}</h1>
<p><img src="{html.escape(png_name)}" alt="accuracy over mean thinking tokens"></p>
<h2>Summary (s1 metrics)</h2>
{summary}
<p>Control: share of runs whose thinking stayed within the requested bounds. Scaling: mean slope of accuracy
over thinking tokens across all pairs of settings, in percentage points per 1,000 thinking tokens.
Performance: best accuracy. Control error: mean |used &minus; B| / B over the budget settings.
Majority@K and pass@K: K samples per problem at the parallel budget; pass@k is the unbiased estimator.</p>
{''.join(per_model)}
<h2>How this was made</h2>
<p>Command:</p><pre>{html.escape(results['command'])}</pre>
<p>Settings: {html.escape(settings)}</p>
<p>Versions: {html.escape(versions)}</p>
</body></html>
"""


def summary_text(results: dict) -> str:
    """The summary as aligned text lines (what the command prints on stdout)."""
    head = f"{'model':<28} {'method':<14} {'Control%':>8} {'Scaling':>9} {'Perf%':>6} {'best':>8} {'ctl err':>7}"
    lines = [head]
    for s in results["summary"]:
        lines.append(f"{short_name(s['model'])[:28]:<28} {s['method']:<14} {_fmt(s['control']):>8} "
                     f"{_fmt(s['scaling']):>9} {_fmt(s['performance']):>6} {s['best_setting']:>8} "
                     f"{_fmt(s['control_error'], 3):>7}" + (f"  majority@{s['K']} {_fmt(s['majority_at_K'])}%"
                                                          f"  pass@{s['K']} {_fmt(s['pass_at_K'])}%" if s["K"] else ""))
    return "\n".join(lines) + "\n(Scaling: percentage points of accuracy per 1,000 thinking tokens)"
