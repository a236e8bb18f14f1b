"""GPU check: vLLM engine speed with and without budget forcing, and one SFT and one GRPO step of the torch
trainer in bf16 (tokens/s and model FLOPs utilisation), on random-initialised models of real shapes.

    bash benchmarks/gpu/check.sh                        # one H100/H200, a few minutes: Qwen2.5-0.5B and 3B shapes
    python benchmarks/gpu/check.py --dry-run --out X    # any CPU: the same code paths on a tiny shape (~2 min)

No download is possible on the GPU machines either, so each model is built here from its config (written
inline below, Qwen2.5's published shapes), with random weights (bf16 on disk) and a byte-level tokenizer of
the model's full vocabulary size (every id decodes). Each model runs in its own subprocess (GPU memory and
vLLM's state are freed between them):

1. **SFT step**: `budgetthink.train.sft` (setup + train_step) on synthetic traces of `seq` tokens, batch
   `sft_batch`, bf16 autocast over fp32 weights; one warm-up step, then `steps` timed steps.
2. **RL**: `budgetthink.train.rl.setup` with engine vllm (colocated, when vLLM imports; else torch), then
   a. engine speed on `prompts` Countdown prompts x n: vLLM's own `LLM.generate` (the ceiling), our engine
      without a budget, and with budget forcing (min/max thinking, one extension, an answer cap);
   b. one GRPO step: `update_weights` (trainer -> engine), `rollout`, `update`, each timed.

MFU = achieved FLOPs / peak, with FLOPs per trained token = 6 * N + 12 * layers * width * seq (N: weights
that multiply: every linear layer and the output layer, the input embedding lookup excluded; the second term
is attention, PaLM's convention) and peak the GPU's dense bf16 figure (H100/H200 SXM: 989 TFLOP/s). A GRPO
update trains prompt + completion tokens (the prompt of a group is shared in the forward, so this over-counts
a little). Writes one JSON (machine, settings, per model each part's raw figures; an error is recorded, not
raised, so one failing part leaves the others' figures).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Qwen2.5 shapes (their config.json files); tied embeddings up to 3B.
MODELS = {
    "qwen2.5-0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                     "tie_word_embeddings": True},
    "qwen2.5-3b": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                   "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": True},
    # --dry-run: a tiny shape with the same code paths (head size 32: vLLM's CPU kernels need >= 32)
    "dry": {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": 1024, "max_position_embeddings": 1024, "rope_theta": 10000.0,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
}
# workloads: SFT batch x seq (steps timed after a warm-up); engine prompts x n x max_tokens; GRPO prompts x n
WORK = {
    "qwen2.5-0.5b": {"sft_batch": 8, "seq": 2048, "steps": 2, "prompts": 128, "n": 8, "max_tokens": 512,
                     "rl_prompts": 32, "rl_n": 8, "rl_tokens": 512, "micro": 16},
    "qwen2.5-3b": {"sft_batch": 4, "seq": 2048, "steps": 2, "prompts": 128, "n": 8, "max_tokens": 512,
                   "rl_prompts": 16, "rl_n": 8, "rl_tokens": 512, "micro": 8},
    "dry": {"sft_batch": 2, "seq": 64, "steps": 1, "prompts": 4, "n": 2, "max_tokens": 24, "rl_prompts": 2,
            "rl_n": 2, "rl_tokens": 16, "micro": 4},
}
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, SXM figures


def peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# --- the model ---------------------------------------------------------------------------------------------------
def build_tokenizer(vocab_size: int):
    """A byte-level BPE without merges: the 256 byte symbols, then 2- and 3-symbol strings up to the model's
    vocabulary (so any sampled id decodes), end-of-text / pad specials and the tinyzero think tags."""
    from itertools import product

    from tokenizers import AddedToken, Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    added = ["<|endoftext|>", "<|pad|>", "<think>", "</think>"]
    alphabet = sorted(ByteLevel.alphabet())
    vocab, want = {}, vocab_size - len(added)
    for length in (1, 2, 3):
        for combo in product(alphabet, repeat=length):
            if len(vocab) == want:
                break
            vocab["".join(combo)] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added[:2]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added[2:]])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   model_max_length=1 << 20)


def build_model(name: str, out: Path) -> dict:
    """Write a random-initialised model of the named shape (bf16 weights on disk) with its tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    t0 = time.perf_counter()
    shape = MODELS[name]
    tok = build_tokenizer(shape["vocab_size"])
    eos, pad = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|pad|>")
    config = Qwen2Config(**shape, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad, use_sliding_window=False)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"params": params, "build_s": round(time.perf_counter() - t0, 1)}


def flops_per_token(config, seq: float) -> float:
    """6 N + 12 L d T (see the module docstring); N = linear layers + output layer."""
    d, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * config.intermediate_size  # q, k+v, o, gate/up/down
    return 6 * (L * per_layer + V * d) + 12 * L * d * seq


# --- the parts --------------------------------------------------------------------------------------------------
def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sft_part(model_dir: Path, work: Path, w: dict, config, peak: float | None) -> dict:
    import random

    import torch

    from budgetthink.jsonl import write_jsonl
    from budgetthink.train import sft

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789 +-*/=()\n"
    rows = []
    for i in range(w["sft_batch"] * (w["steps"] + 1)):  # one char per token; prompt + thinking + answer ~ seq
        rows.append({"id": str(i), "problem": {"prompt": "".join(rng.choices(letters, k=w["seq"] // 8))},
                     "thinking": "".join(rng.choices(letters, k=w["seq"] - w["seq"] // 8 - 32)),
                     "answer": "".join(rng.choices(letters, k=8))})
    write_jsonl(work / "traces.jsonl", rows)
    cfg = sft.SFTConfig(model=str(model_dir), data=str(work / "traces.jsonl"), format="tinyzero",
                        batch_size=w["sft_batch"], max_seq_len=w["seq"], epochs=1, max_steps=w["steps"] + 1,
                        dtype="bfloat16", save_every=10_000, log_every=10_000, group_by_length=False)
    run = sft.setup(cfg, work / "sft", resume=False)
    cache: dict = {}
    sft.train_step(run, 1, cache)  # warm-up (kernels, allocator, optimizer state)
    sync()
    t0, tokens, padded = time.perf_counter(), 0, 0
    for step in range(2, w["steps"] + 2):
        m = sft.train_step(run, step, cache)
        tokens, padded = tokens + m["tokens"], padded + m["padded_tokens"]
    sync()
    dt = time.perf_counter() - t0
    out = {"steps": w["steps"], "batch": w["sft_batch"], "seq": w["seq"], "step_s": round(dt / w["steps"], 3),
           "tokens": tokens, "tokens_per_s": round(tokens / dt, 1), "loss": m["loss"]}
    if peak:
        out["mfu"] = round(flops_per_token(config, w["seq"]) * padded / dt / peak, 4)
    if torch.cuda.is_available():
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    del run
    return out


def engine_part(run, w: dict) -> dict:
    """Tokens/s of the colocated engine: vLLM's own generate, ours without and with budget forcing."""
    from budgetthink.engine import Budget, Sampling
    from budgetthink.tasks import get_task

    prompts = [run.fmt.prompt(p.prompt) for p in get_task("countdown", split="test").generate(w["prompts"], seed=1)]
    T = w["max_tokens"]
    sampling = Sampling(temperature=1.0, max_tokens=T, seed=0)
    budget = Budget(min_thinking_tokens=T // 4, max_thinking_tokens=3 * T // 4, extensions=1, max_answer_tokens=T // 4)
    out = {"prompts": w["prompts"], "n": w["n"], "max_tokens": T, "budget_settings": budget.model_dump(),
           "engine": type(run.engine).__name__}
    if hasattr(run.engine, "llm"):
        from vllm import SamplingParams

        ids = [run.tokenizer.encode(p) for p in prompts]
        raw = SamplingParams(n=w["n"], temperature=1.0, max_tokens=T, seed=0, logprobs=0)
        run.engine.llm.generate([{"prompt_token_ids": x} for x in ids[:2]], raw, use_tqdm=False)
        t0 = time.perf_counter()
        res = run.engine.llm.generate([{"prompt_token_ids": x} for x in ids], raw, use_tqdm=False)
        dt = time.perf_counter() - t0
        n_tok = sum(len(c.token_ids) for r in res for c in r.outputs)
        out["vllm_raw"] = {"wall_s": round(dt, 3), "sampled_tokens": n_tok, "tokens_per_s": round(n_tok / dt, 1)}
    for name, b in (("plain", None), ("budget", budget)):
        run.engine.generate(prompts[:2], sampling, n=2, budget=b, fmt=run.fmt)
        t0 = time.perf_counter()
        outs = run.engine.generate(prompts, sampling, n=w["n"], budget=b, fmt=run.fmt)
        dt = time.perf_counter() - t0
        n_tok = sum(o.meta.get("sampled_tokens", sum(o.sampled)) for o in outs)
        out[name] = {"wall_s": round(dt, 3), "sampled_tokens": n_tok, "tokens_per_s": round(n_tok / dt, 1),
                     "mean_extensions": round(sum(o.extensions for o in outs) / len(outs), 3),
                     "forced_share": round(sum(o.meta.get("forced", False) for o in outs) / len(outs), 3)}
    out["budget_over_plain"] = round(out["budget"]["tokens_per_s"] / out["plain"]["tokens_per_s"], 3)
    return out


def rl_part(model_dir: Path, work: Path, w: dict, config, peak: float | None, engine: str) -> dict:
    import torch

    from budgetthink.train import rl

    cfg = rl.RLConfig(model=str(model_dir), task="countdown", format="tinyzero", engine=engine,
                      prompts_per_step=w["rl_prompts"], n=w["rl_n"], max_response_tokens=w["rl_tokens"],
                      micro_batch_size=w["micro"], dtype="bfloat16", max_steps=2, eval_every=0, eval_size=0,
                      train_size=w["rl_prompts"] * 4, save_every=10_000)
    t0 = time.perf_counter()
    run = rl.setup(cfg, work / "rl", resume=False)
    out = {"engine": engine, "setup_s": round(time.perf_counter() - t0, 1)}
    try:
        out["engine_speed"] = engine_part(run, w)
    except Exception as e:  # noqa: BLE001 -- keep the GRPO figures
        out["engine_speed"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    step = {"prompts": w["rl_prompts"], "n": w["rl_n"], "max_response_tokens": w["rl_tokens"]}
    if hasattr(run.engine, "update_weights"):
        sync()
        t0 = time.perf_counter()
        run.engine.update_weights(run.model)
        step["update_weights_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    generated, kept = rl.rollout(run, 1)
    sync()
    step["rollout_s"] = round(time.perf_counter() - t0, 3)
    step["rollout_tokens"] = sum(sum(r.completion.sampled) for r in generated)
    t0 = time.perf_counter()
    m = rl.update(run, kept, 1)
    sync()
    dt = time.perf_counter() - t0
    tokens = sum(len(r.prompt_ids) + len(r.completion.token_ids) for r in kept)
    mean_seq = tokens / max(1, len(kept))
    step |= {"update_s": round(dt, 3), "trained_tokens": tokens, "update_tokens_per_s": round(tokens / dt, 1),
             "mean_seq": round(mean_seq, 1), "grad_norm": m.get("grad_norm")}
    if peak:
        step["update_mfu"] = round(flops_per_token(config, mean_seq) * tokens / dt / peak, 4)
    if torch.cuda.is_available():
        step["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    out["grpo_step"] = step
    return out


def one(name: str, work: Path, part: Path) -> None:
    """Everything for one model, in this process; the figures go to `part` (JSON)."""
    import torch
    from transformers import AutoConfig

    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"shape": MODELS[name], "work": WORK[name]}
    model_dir = work / "model"
    res["build"] = build_model(name, model_dir)
    config, peak, w = AutoConfig.from_pretrained(model_dir), peak_flops(), WORK[name]
    try:
        import vllm  # noqa: F401

        engine = "vllm"
    except ImportError:
        engine = "torch"
    for key, fn in (("sft", lambda: sft_part(model_dir, work, w, config, peak)),
                    ("rl", lambda: rl_part(model_dir, work, w, config, peak, engine))):
        try:
            res[key] = fn()
        except Exception as e:  # noqa: BLE001 -- record and go on to the next part
            res[key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print(f"[{name}] {key}: {json.dumps(res[key])[:400]}", file=sys.stderr, flush=True)
    part.write_text(json.dumps(res, indent=2))


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "vllm"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if torch.cuda.is_available():
        info |= {"gpu": torch.cuda.get_device_name(), "gpu_memory_gib":
                 round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1), "peak_bf16_flops": peak_flops()}
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shape on whatever device (checks the code paths)")
    ap.add_argument("--models", default="qwen2.5-0.5b,qwen2.5-3b", help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--out", type=Path, help="JSON to write (default: benchmarks/results/gpu_check.json; "
                                             "a dry run: $TMPDIR/gpu_check_dry.json)")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "budgetthink-gpu-check")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per model")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one model in this process
    ap.add_argument("--part", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.one, args.work, args.part)
        return 0

    import torch

    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    args.out = args.out or (tmp / "gpu_check_dry.json" if args.dry_run else ROOT / "benchmarks" / "results" / "gpu_check.json")
    names = ["dry"] if args.dry_run else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        print(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("no GPU: this check is for a CUDA machine (use --dry-run to check the code paths on a CPU)",
              file=sys.stderr)
        return 2
    result = {"check": "gpu_check", "dry_run": args.dry_run, "machine": machine(), "models": {}}
    t_all = time.perf_counter()
    for name in names:
        work = args.work / name
        part = args.work / f"{name}.json"
        part.unlink(missing_ok=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--one", name, "--work", str(work), "--part", str(part)]
        try:
            r = subprocess.run(cmd, timeout=args.timeout, check=False, stderr=subprocess.PIPE, text=True)
            err = r.stderr
        except subprocess.TimeoutExpired as e:
            r, err = None, (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        sys.stderr.write(err[-4000:])
        res = json.loads(part.read_text()) if part.is_file() else {}
        if r is None or r.returncode != 0:
            res["error"] = "timed out" if r is None else f"exit {r.returncode}"
            res["stderr_tail"] = err[-3000:]
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        result["models"][name] = res
    result["wall_s"] = round(time.perf_counter() - t_all, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    failed = [n for n, r in result["models"].items()
              if "error" in r or any(isinstance(v, dict) and "error" in v for v in r.values())]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
