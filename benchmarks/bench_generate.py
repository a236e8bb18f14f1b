"""Generation speed: our torch engine against `model.generate` and against the naive s1 budget-forcing procedure.

    python benchmarks/bench_generate.py [--model DIR] [--prompts 64] [--n 8] [--new-tokens 128] [--repeats 3]
                                        [--threads N] [--quick]

One process, one model (the `small` tiny preset: the pretrained build from `.cache/tiny` if one exists, else
random weights of that shape, which decode at the same speed), the same Countdown prompts for every side,
sampling at temperature 1, after a warm-up. In (a) and (c) each side is timed `--repeats` times, the sides
taking turns, and the medians compared (single runs on this 2-core machine varied by +-10%). Writes benchmarks/results/bench_generate.json
with the machine, the settings, each side's raw figures and the ratios:

(a) plain sampling, prompts x n samples x new-tokens tokens each (end-of-text ignored on both sides so both
    produce exactly that many): tokens/s of our engine vs `model.generate(do_sample=True,
    num_return_sequences=n)`, in float32 and in bfloat16. Target: ours >= 3x generate in the same dtype.
(b) budget forcing with 4 extensions (tinyzero format, max 256 thinking tokens, 32 answer tokens; 16 prompts
    x n by default, `--budget-prompts`): our engine (one call, the KV cache kept across insertions) vs the
    naive procedure s1 runs: repeated `model.generate` calls that stop at the end of thinking, then cut the
    end, append "Wait" to the text, re-encode the whole text and call again (4 times), then close thinking
    and generate the answer. Compared in sampled tokens per second (the two sample different texts). The
    naive side pays for re-encoding and re-prefilling, and for `generate` keeping rows that stopped early in
    the batch until its call ends. Target: >= 3x.
(c) the cost of forcing itself: our engine with min = max = 128 thinking tokens (every end of thinking the
    model writes is removed and "Wait" inserted; then 32 answer tokens) vs the same engine unforced, both
    producing the same number of tokens per row (the unforced run's max_tokens is the forced rows' mean
    output length, inserted tokens included: each costs one forward like a sampled one). Overhead = the
    ratio of output tokens per second - 1. Target: <= 10% overhead.
Beside (a) in float32, a torch.profiler table of each side (operators by self CPU time, one more run each),
and the ceiling it implies: generate's wall time over ours' time in matrix products, the ratio ours would
reach if everything else in our engine took no time.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from paths import cpu_flags, matmul_rate, op_profile, record

from budgetthink.budget import extension_text
from budgetthink.engine import Budget, Sampling
from budgetthink.engine.torch import TorchEngine
from budgetthink.formats import get_format
from budgetthink.tasks import get_task

ROOT = Path(__file__).resolve().parent.parent


def load_small(model_dir: Path | None):
    """(model, tokenizer, description): a pretrained small tiny model if available, else random init."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from budgetthink import tiny

    candidates = [model_dir] if model_dir else sorted((ROOT / ".cache" / "tiny").glob("tiny-small-*"))
    for d in candidates:  # a finished build (a cached build writes build_report.json last)
        if d and (d / "model.safetensors").is_file() and (model_dir or (d / "build_report.json").is_file()):
            return (AutoModelForCausalLM.from_pretrained(d, local_files_only=True),
                    AutoTokenizer.from_pretrained(d, local_files_only=True), f"pretrained: {d.name}")
    model, tok = tiny.init_model("small", seed=0)
    return model, tok, "random init (small preset shape; no pretrained build found)"


def decode_shapes(config, rows: int) -> dict:
    """(m, k, n) of a decoding step's products: rows x hidden through the MLP and the lm-head."""
    h = config.hidden_size
    return {f"mlp_up {rows}x{h}x{config.intermediate_size}": (rows, h, config.intermediate_size),
            f"lm_head {rows}x{h}x{config.vocab_size}": (rows, h, config.vocab_size)}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def alternate(sides: dict, repeats: int) -> dict:
    """Run each side `repeats` times, taking turns (so that a change in the machine's load hits both sides alike):
    {name: (the last output, [wall seconds of each run])}."""
    walls = {name: [] for name in sides}
    outs = {}
    for _ in range(repeats):
        for name, fn in sides.items():
            outs[name], wall = timed(fn)
            walls[name].append(wall)
    return {name: (outs[name], walls[name]) for name in sides}


# --- (a) the peer: transformers generate ------------------------------------------------------------------------
def hf_generate(model, tok, prompts, n, new_tokens, seed, eos=True, max_new=None, stop_ids=None, stop_strings=None):
    """model.generate over left-padded prompts; returns the new token ids per sample (pads stripped)."""
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    kw = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "num_return_sequences": n,
          "pad_token_id": tok.pad_token_id}
    if eos:
        kw.update(max_new_tokens=max_new or new_tokens, eos_token_id=stop_ids or [tok.eos_token_id])
        if stop_strings:  # a delimiter of several tokens (BPE models): generate matches it as text
            kw.update(stop_strings=stop_strings, tokenizer=tok)
    else:
        kw.update(max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None)
    with torch.inference_mode():
        out = model.generate(**enc, **kw)
    return out[:, enc["input_ids"].shape[1]:].tolist()


# --- (b) the naive s1 procedure ------------------------------------------------------------------------------------
def naive_s1(model, tok, prompts, n, fmt, budget: Budget, seed):
    """s1's budget forcing with repeated generate calls on re-encoded text. Returns sampled-token count.
    The end of thinking is matched as text: on a BPE model `</think>` is several tokens."""
    eos = tok.eos_token_id
    wait = extension_text(tok, budget.extension_string)  # "Wait", or " Wait" on a word-piece tokenizer
    texts = [p for p in prompts for _ in range(n)]
    left = [budget.max_thinking_tokens] * len(texts)  # thinking budget left per row
    sampled = 0
    active = list(range(len(texts)))
    for round_ in range(budget.extensions + 1):
        if not active:
            break
        outs = hf_generate(model, tok, [texts[i] for i in active], 1, None, seed + round_,
                           max_new=max(left[i] for i in active), stop_ids=[eos], stop_strings=[fmt.think_close])
        still = []
        for i, ids in zip(active, outs):
            ids = [t for t in ids if t != tok.pad_token_id][: left[i]]
            text = tok.decode(ids, skip_special_tokens=False)
            ended = bool(ids) and (ids[-1] == eos or fmt.think_close in text)
            body = text.split(fmt.think_close)[0] if fmt.think_close in text else tok.decode(
                ids[:-1] if ended else ids, skip_special_tokens=False)
            sampled += len(ids)
            left[i] -= len(ids)
            texts[i] += body
            if ended and round_ < budget.extensions and left[i] > 0:
                texts[i] += wait  # suppress the end, append "Wait", re-encode next round
                still.append(i)
            else:
                texts[i] += fmt.think_close + budget.answer_prefix  # forced (or kept) end of thinking
        active = still
    answers = hf_generate(model, tok, texts, 1, None, seed + 99, max_new=budget.max_answer_tokens, stop_ids=[eos])
    sampled += sum(len([t for t in a if t != tok.pad_token_id]) for a in answers)
    return sampled


def figures(outs, wall: float) -> dict:
    sampled = sum(o.meta["sampled_tokens"] for o in outs)
    output = sum(len(o.token_ids) for o in outs)  # sampled and inserted tokens kept in the text
    return {"wall_s": round(wall, 3), "completions": len(outs), "sampled_tokens": sampled,
            "output_tokens": output, "sampled_tokens_per_s": round(sampled / wall, 1),
            "output_tokens_per_s": round(output / wall, 1),
            "mean_thinking_tokens": round(sum(o.thinking_tokens for o in outs) / len(outs), 1),
            "mean_extensions": round(sum(o.extensions for o in outs) / len(outs), 2),
            "forced_share": round(sum(o.meta["forced"] for o in outs) / len(outs), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a small tiny model directory (default: .cache/tiny build or random)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--budget-prompts", type=int, default=16,
                    help="prompts for (b) (x n samples): the naive side is slow (an hour at 64 x 8 on 2 busy cores)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side in (a) and (c), taking turns; medians")
    ap.add_argument("--quick", action="store_true", help="a small smoke run (8 prompts x 2, 32 tokens); no JSON")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_generate.json")
    ap.add_argument("--shape", default="tiny-small", help="the entry this run fills in the JSON (e.g. smollm2-135m)")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.n, args.new_tokens, args.budget_prompts = 8, 2, 32, 8
    torch.set_num_threads(args.threads)
    load_at_start = round(os.getloadavg()[0], 2)
    base, tok, origin = load_small(args.model)
    fmt = get_format("tinyzero")
    prompts = [fmt.prompt(p.prompt) for p in get_task("countdown").generate(args.prompts, seed=0)]
    P, n, T = args.prompts, args.n, args.new_tokens
    results, ratios = {}, {}

    # (a) plain sampling, fp32 and bf16
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model = base.to(dtype).eval()
        engine = TorchEngine(model, tok, eos_token_ids=[])  # end-of-text ignored: exactly T tokens per row
        sampling = Sampling(temperature=1.0, max_tokens=T, seed=0)
        engine.generate(prompts[:4], sampling.model_copy(update={"max_tokens": 8}), n=2)  # warm-up
        hf_generate(model, tok, prompts[:4], 2, 8, 0, eos=False)
        runs = alternate({"ours": lambda e=engine, s=sampling: e.generate(prompts, s, n=n),
                          "generate": lambda m=model: hf_generate(m, tok, prompts, n, T, 0, eos=False)}, args.repeats)
        (outs, walls), (gen, gwalls) = runs["ours"], runs["generate"]
        wall, gwall = statistics.median(walls), statistics.median(gwalls)
        ours, theirs = sum(len(o.token_ids) for o in outs), sum(len(g) for g in gen)
        print(f"(a) {name} ours: {ours} tokens in {wall:.1f} s = {ours / wall:.0f} tok/s; generate: {theirs} tokens "
              f"in {gwall:.1f} s = {theirs / gwall:.0f} tok/s (medians of {args.repeats})", file=sys.stderr)
        results[f"a_sampling_{name}"] = {
            "ours": {"tokens": ours, "wall_s": round(wall, 3), "tokens_per_s": round(ours / wall, 1),
                     "wall_s_runs": [round(w, 3) for w in walls]},
            "transformers_generate": {"tokens": theirs, "wall_s": round(gwall, 3),
                                      "tokens_per_s": round(theirs / gwall, 1),
                                      "wall_s_runs": [round(w, 3) for w in gwalls]}}
        ratios[f"a_ours_over_generate_{name}"] = round((ours / wall) / (theirs / gwall), 2)
        if name == "float32":  # where the time goes: one more run of each side, under the profiler
            prof = {"ours": op_profile(lambda e=engine, s=sampling: e.generate(prompts, s, n=n))[1],
                    "generate": op_profile(lambda m=model: hf_generate(m, tok, prompts, n, T, 0, eos=False))[1]}
            # Our engine can go no faster than its matrix products: if nothing else took time, its run would
            # take its wall time x its matmul share, and generate's its own: the most the ratio can be.
            prof["ratio_ceiling"] = round(gwall / (wall * prof["ours"]["matmul_share"]), 2)
            results["a_profile_float32"] = prof

    # (b) budget forcing with 4 extensions vs the naive re-encode procedure (float32)
    model = base.to(torch.float32).eval()
    engine = TorchEngine(model, tok)
    budget = Budget(max_thinking_tokens=256, extensions=4, max_answer_tokens=32)
    sampling = Sampling(temperature=1.0, max_tokens=1024, seed=0)
    few = prompts[: args.budget_prompts]
    outs, wall = timed(lambda: engine.generate(few, sampling, n=n, budget=budget, fmt=fmt))
    ours_b = figures(outs, wall)
    print(f"(b) ours: {ours_b}", file=sys.stderr)
    sampled, nwall = timed(lambda: naive_s1(model, tok, few, n, fmt, budget, 0))
    naive_b = {"wall_s": round(nwall, 3), "sampled_tokens": sampled, "sampled_tokens_per_s": round(sampled / nwall, 1)}
    print(f"(b) naive: {naive_b}", file=sys.stderr)
    results["b_budget_4_extensions"] = {"prompts": len(few), "samples_per_prompt": n, "budget": budget.model_dump(),
                                        "ours": ours_b, "naive_s1_generate": naive_b}
    ratios["b_ours_over_naive_tokens_per_s"] = round(ours_b["sampled_tokens_per_s"] / naive_b["sampled_tokens_per_s"], 2)

    # (c) forced vs unforced, the same output tokens per row (end-of-text ignored)
    engine = TorchEngine(model, tok, eos_token_ids=[])
    forced_budget = Budget(min_thinking_tokens=T, max_thinking_tokens=T, max_answer_tokens=32)
    def run_forced():
        return engine.generate(prompts, Sampling(temperature=1.0, max_tokens=4 * T, seed=0), n=n, budget=forced_budget,
                               fmt=fmt)

    per_row = round(sum(len(o.token_ids) for o in run_forced()) / (P * n))  # the forced rows' mean output length
    runs = alternate({"forced": run_forced,
                      "unforced": lambda: engine.generate(prompts, Sampling(temperature=1.0, max_tokens=per_row, seed=0),
                                                          n=n, fmt=fmt)}, args.repeats)
    (forced, fwalls), (plain, pwalls) = runs["forced"], runs["unforced"]
    f_fig, p_fig = figures(forced, statistics.median(fwalls)), figures(plain, statistics.median(pwalls))
    print(f"(c) forced: {f_fig}\n(c) unforced: {p_fig}", file=sys.stderr)
    results["c_forced_vs_unforced"] = {"budget": forced_budget.model_dump(), "unforced_max_tokens": per_row,
                                       "forced": {**f_fig, "wall_s_runs": [round(w, 3) for w in fwalls]},
                                       "unforced": {**p_fig, "wall_s_runs": [round(w, 3) for w in pwalls]}}
    ratios["c_forcing_overhead"] = round(p_fig["output_tokens_per_s"] / f_fig["output_tokens_per_s"] - 1, 3)

    report = {
        "benchmark": "bench_generate",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "transformers": __import__("transformers").__version__,
                    "cpu_flags": cpu_flags(),
                    "load_average_1min_at_start": load_at_start,
                    "matmul_gflops_float32": matmul_rate(shapes=decode_shapes(base.config, P * n)),
                    "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
        "settings": {"model": origin, "preset": None if args.model else "small",
                     "parameters": sum(p.numel() for p in base.parameters()),
                     "prompts": P, "samples_per_prompt": n, "new_tokens": T, "temperature": 1.0,
                     "task": "countdown", "format": "tinyzero", "peer": "transformers model.generate",
                     "attention": {"ours": "budgetthink_rows (shared prompt prefix, grouped heads folded)",
                                   "generate": base.config._attn_implementation}},
        "results": results,
        "ratios": ratios,
        "targets": {"a": ">= 3x generate in the same dtype", "b": ">= 3x naive", "c": "<= 10% overhead"},
        "notes": f"(a) and (c): the median of {args.repeats} timed runs per side, the sides taking turns, in one "
                 "process; (b): one run per side. A 2-core machine: see the load average.",
    }
    print(json.dumps(ratios, indent=2))
    if not args.quick:
        report["command"] = "python benchmarks/bench_generate.py " + " ".join(sys.argv[1:])
        prof = results["a_profile_float32"]
        summary = {"ours_over_generate_float32": ratios["a_ours_over_generate_float32"], "target": 3.0,
                   "met": ratios["a_ours_over_generate_float32"] >= 3.0,
                   "ratio_ceiling": prof["ratio_ceiling"], "ours_matmul_share": prof["ours"]["matmul_share"],
                   "fraction_of_ceiling": round(ratios["a_ours_over_generate_float32"] / prof["ratio_ceiling"], 2),
                   "ours_over_naive_forcing": ratios["b_ours_over_naive_tokens_per_s"], "target_naive": 3.0,
                   "forcing_overhead": ratios["c_forcing_overhead"], "target_overhead": 0.10}
        record(args.out, args.shape, report, summary)
        print(f"wrote {args.out} ({args.shape})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
