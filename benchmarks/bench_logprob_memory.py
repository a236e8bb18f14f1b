"""Peak memory and time of the RL update's forward + backward on a real model's shapes: our log-probs through
the lm-head in chunks (train/batch.policy_forward) against the whole [rows, tokens, vocabulary] logits (the
model's own forward, then log-softmax and gather). Writes benchmarks/results/logprob_memory.json (an entry per
setting: with and without gradient checkpointing).

    python benchmarks/bench_logprob_memory.py --model runs/smol [--rows 16] [--tokens 512] [--threads 2] \
        [--gradient-checkpointing]

Each side runs in a fresh process (its peak resident memory is its own). The rollouts are synthetic: random
completion tokens after a 40-token prompt, n=4 per prompt, fp32; the same batch and weights on both sides, and
the two sides' log-probs are compared (they must agree to 1e-4).
"""

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from paths import ROOT, cpu_flags, in_own_process, record, shown

sys.path.insert(0, str(ROOT / "src"))


def side(name: str, model_dir: str, rows: int, tokens: int, checkpointing: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from budgetthink.train import losses as L
    from budgetthink.train.batch import collate, policy_forward

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.train()
    g = torch.Generator().manual_seed(0)
    V, n = model.config.vocab_size, 4
    prompts = [torch.randint(0, V, (40,), generator=g).tolist() for _ in range(rows // n)]
    fake = [SimpleNamespace(prompt_ids=prompts[i // n], truncated=False,
                            completion=SimpleNamespace(token_ids=torch.randint(0, V, (tokens,), generator=g).tolist(),
                                                       sampled=[True] * tokens)) for i in range(rows)]
    batch = collate(fake, 0, "keep", "cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    if name == "chunked":
        logp, _ = policy_forward(model, batch, 1.0, entropy=True, dtype="float32", share=not checkpointing)
    else:  # the whole logits of every completion token, as a plain implementation holds them
        ids = torch.cat([batch["p_ids"][batch["row_prompt"]], batch["resp"]], 1)
        pos = torch.cat([batch["p_pos"][batch["row_prompt"]], batch["c_pos"]], 1)
        logits = model(input_ids=ids, attention_mask=batch["attn"], position_ids=pos,
                       logits_to_keep=tokens + 1).logits[:, :-1].float()  # [rows, tokens, V]
        logp = L.token_logprobs(logits, batch["resp"])
        with torch.no_grad():
            L.entropy_from_logits(logits)  # the entropy metric, as ours computes it
    (logp * batch["mask"]).sum().backward()
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": round(seconds, 2), "peak_above_model_mib": round(peak - before),
            "logp_head": logp[0, :8].tolist()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (both sides)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "logprob_memory.json")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    res = {}
    for name in ("chunked", "whole logits"):
        res[name] = in_own_process(side, name, str(args.model), args.rows, args.tokens, args.gradient_checkpointing)
        print(f"{name}: {res[name]['seconds']} s, peak {res[name]['peak_rss_mib']} MiB", file=sys.stderr)
    import torch

    agree = torch.allclose(torch.tensor(res["chunked"]["logp_head"]), torch.tensor(res["whole logits"]["logp_head"]),
                           atol=1e-4)
    run = {"command": "python benchmarks/bench_logprob_memory.py " + " ".join(sys.argv[1:]),
           "model": shown(args.model), "rows": args.rows, "tokens": args.tokens,
           "gradient_checkpointing": args.gradient_checkpointing, "log_probs_agree": agree,
           "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "cpu_flags": cpu_flags(),
                       "threads": args.threads, "torch": torch.__version__, "load_average_at_end": os.getloadavg()},
           "sides": res}
    summary = {"peak_rss_mib": {k: v["peak_rss_mib"] for k, v in res.items()},
               "seconds": {k: v["seconds"] for k, v in res.items()}, "log_probs_agree": agree}
    key = "gradient checkpointing" if args.gradient_checkpointing else "no checkpointing"
    record(args.out, key, run, summary)
    print(json.dumps(summary), file=sys.stderr)


if __name__ == "__main__":
    main()
