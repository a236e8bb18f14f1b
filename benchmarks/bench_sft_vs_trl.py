"""budgetthink sft against TRL's SFTTrainer on the CPU: the same model, data, batch, sequence length and loss
masking, in one process; training throughput, and ours as a share of the machine's matmul throughput.

    .venv/bin/python benchmarks/bench_sft_vs_trl.py [--n 512] [--batch-size 32] [--preset small] [--repeats 1]
    .venv/bin/python benchmarks/bench_sft_vs_trl.py --model runs/smol --shape smollm2-135m --n 64 --batch-size 4 \
        [--lora 16]                                        # a real model: SmolLM2-135M, full or LoRA on both sides

- Model: a `small`-shaped tiny Qwen2 (random weights: throughput does not depend on them), saved as a model
  directory both sides load, with the same attention kernel and dtype (`--dtype`, float32 by default); or
  `--model DIR`. `--lora R`: LoRA adapters of rank R (alpha 2R) on the same modules, through peft, on both sides.
- Data: `--n` Countdown solver traces in the tinyzero format. TRL gets them as a prompt-completion dataset
  (completion_only_loss=True: the loss on the completion only, as ours), with the same tokenizer object
  (passed explicitly as processing_class: AutoTokenizer would pick the wrong class for a qwen2 directory); the bench
  checks that both sides see the same number of tokens and supervised tokens.
- Same optimisation: AdamW (0.9, 0.95), wd 1e-4, lr 1e-3, 5% warm-up then cosine, clip 1.0, one epoch,
  `--batch-size` examples per step, max length 1024, no gradient checkpointing, no packing.
- TRL runs twice: with its default random batches, and with `train_sampling_strategy="group_by_length"`
  (its own length grouping, the fairest comparison of padding).
- Tokens per second = real (non-pad) tokens trained / seconds spent inside optimizer steps (a callback times
  TRL's steps; ours are in metrics.jsonl); end-to-end seconds (loading, tokenising, training) are reported too.
- Matmul throughput: torch.matmul of square matrices in the training dtype, best of several sizes, measured in
  the same process (paths.matmul_rate; in fp32 oneDNN's rate beside it); ours as a share of it counts 6 x
  parameters + 12 x layers x hidden x sequence length FLOPs per token (forward + backward, attention included at the batch's padded length).

Writes entry `--shape` (`tiny-small`; `... lora` with --lora) of benchmarks/results/sft_vs_trl.json.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from paths import matmul_rate, op_profile, record

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def trace_rows(n: int) -> list[dict]:
    from budgetthink.tasks import get_task

    task = get_task("countdown", split="train", template="compact")
    rows = []
    for p in task.generate(n, seed=5):
        t = task.solve(p)
        rows.append({"id": p.id, "task": p.task, "problem": p.to_dict(), "thinking": t.thinking, "answer": t.answer})
    return rows


def run_ours(model_dir: Path, data: Path, work: Path, args, dtype: str) -> dict:
    from budgetthink.config import load_config
    from budgetthink.train import sft

    out = work / "ours"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(sft.SFTConfig, None, [
        "format=tinyzero", "epochs=1", f"batch_size={args.batch_size}", "max_seq_len=1024", "lr=1e-3",
        "warmup_ratio=0.05", "betas=[0.9,0.95]", "weight_decay=1e-4", "grad_clip=1.0", f"dtype={dtype}",
        "save_every=100000", "log_every=100000",
        *(["prompt=raw"] if args.model else []),  # the text TRL gets
        *([f"lora.r={args.lora}", f"lora.alpha={2 * args.lora}"] if args.lora else [])],
        defaults={"model": str(model_dir), "data": str(data)})
    t0 = time.perf_counter()
    summary = sft.train(cfg, out)
    wall = time.perf_counter() - t0
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step_s, cpu_s = sum(r["step_s"] for r in rec), sum(r["cpu_s"] for r in rec)
    tokens = sum(r["tokens"] for r in rec)
    return {"steps": len(rec), "tokens": tokens, "target_tokens": sum(r["target_tokens"] for r in rec),
            "padded_tokens": sum(r["padded_tokens"] for r in rec), "train_s": step_s, "wall_s": wall,
            "train_cpu_s": cpu_s, "tokens_per_cpu_s": tokens / cpu_s,
            "tokens_per_s": tokens / step_s, "end_to_end_tokens_per_s": tokens / wall,
            "first_loss": rec[0]["loss"], "last_loss": rec[-1]["loss"], "dtype": summary["dtype"]}


def run_trl(model_dir: Path, rows: list[dict], work: Path, args, bf16: bool, attn: str, sampling: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from budgetthink.formats import get_format

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.cpu, self.t, self.c = 0.0, 0.0, None, None

        def on_step_begin(self, *a, **k):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            self.seconds += time.perf_counter() - self.t
            self.cpu += time.process_time() - self.c

    fmt = get_format("tinyzero")
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    data = Dataset.from_list([{"prompt": fmt.prompt(r["problem"]["prompt"]),
                               "completion": fmt.completion(r["thinking"], r["answer"])} for r in rows])
    out = work / f"trl-{sampling}"
    cfg = SFTConfig(output_dir=str(out), per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
                    num_train_epochs=1, learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.05,
                    adam_beta1=0.9, adam_beta2=0.95, weight_decay=1e-4, max_grad_norm=1.0, max_length=1024,
                    completion_only_loss=True, packing=False, padding_free=False, use_cpu=True, bf16=bf16,
                    fp16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
                    logging_steps=1, seed=0, train_sampling_strategy=sampling, disable_tqdm=True,
                    eos_token=tok.eos_token)
    timer = StepTimer()
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        from budgetthink.train.common import LoRA

        peft_config = LoraConfig(r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=LoRA().target_modules)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[timer],
                         peft_config=peft_config)
    ds = trainer.train_dataset
    tokens = sum(len(x) for x in ds["input_ids"])
    target = sum(sum(x != -100 for x in lab[1:]) for lab in ds["labels"])  # tokens with a prediction and a loss
    t1 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"steps": trainer.state.global_step, "tokens": tokens, "target_tokens": target, "train_s": timer.seconds,
            "train_cpu_s": timer.cpu, "tokens_per_cpu_s": tokens / timer.cpu,
            "train_loop_s": time.perf_counter() - t1, "wall_s": wall, "tokens_per_s": tokens / timer.seconds,
            "end_to_end_tokens_per_s": tokens / wall, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "sampling": sampling}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512, help="training examples (one epoch)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                    help="both sides' training dtype (auto: budgetthink's choice, bf16 where the CPU has it natively)")
    ap.add_argument("--repeats", type=int, default=1, help="alternate ours / TRL this many times; best of each")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's); 1 gives steadier "
                                                             "figures on a machine shared with other work")
    ap.add_argument("--model", type=Path, default=None, help="a model directory (default: a random --preset model)")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank on both sides (0: full fine-tuning)")
    ap.add_argument("--shape", default=None, help="the JSON entry (default: tiny-PRESET, + ' lora' with --lora)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    import trl

    from budgetthink import tiny
    from budgetthink.jsonl import write_jsonl
    from budgetthink.train.sft import use_bf16

    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    if args.model:
        from transformers import AutoModelForCausalLM

        model_dir, model = args.model, AutoModelForCausalLM.from_pretrained(args.model)
    else:
        model, tokenizer = tiny.init_model(args.preset, seed=0)
        model_dir = work / "model"
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    params = sum(p.numel() for p in model.parameters())
    shape = args.shape or f"tiny-{args.preset}"
    shape += " lora" if args.lora and not shape.endswith("lora") else ""
    rows = trace_rows(args.n)
    write_jsonl(work / "traces.jsonl", rows)
    bf16 = use_bf16(args.dtype, False)
    dtype = "bfloat16" if bf16 else "float32"
    attn = "eager" if bf16 else "sdpa"  # what budgetthink's `auto` picks on this CPU; TRL gets the same
    say(f"{params / 1e6:.2f}M parameters, {len(rows)} examples, batch {args.batch_size}, {dtype}, {attn} attention")

    mm = matmul_rate(torch.bfloat16 if bf16 else torch.float32)
    say(f"matmul: {mm['best']} GFLOP/s ({dtype})")
    ours, trl_random, trl_grouped = [], [], []
    for r in range(args.repeats):
        say(f"round {r + 1}: ours")
        ours.append(run_ours(model_dir, work / "traces.jsonl", work, args, dtype))
        say(f"  {ours[-1]['tokens_per_s']:.0f} tok/s")
        say(f"round {r + 1}: TRL (random batches)")
        trl_random.append(run_trl(model_dir, rows, work, args, bf16, attn, "random"))
        say(f"  {trl_random[-1]['tokens_per_s']:.0f} tok/s")
        say(f"round {r + 1}: TRL (group_by_length)")
        trl_grouped.append(run_trl(model_dir, rows, work, args, bf16, attn, "group_by_length"))
        say(f"  {trl_grouped[-1]['tokens_per_s']:.0f} tok/s")
    say("ours once more, under torch.profiler (where the time goes; not timed)")
    _, prof = op_profile(lambda: run_ours(model_dir, work / "traces.jsonl", work, args, dtype))
    o, tr, tg = (max(runs, key=lambda x: x["tokens_per_s"]) for runs in (ours, trl_random, trl_grouped))
    assert o["tokens"] == tr["tokens"] == tg["tokens"], (o["tokens"], tr["tokens"], tg["tokens"])
    assert o["target_tokens"] == tr["target_tokens"] == tg["target_tokens"], (o["target_tokens"], tr["target_tokens"])

    cfg = model.config
    mean_padded_len = o["padded_tokens"] / args.n  # ours: the padded length of a row, on average
    # full fine-tuning's count; LoRA skips the frozen weights' gradients (about 4 x params instead of 6)
    flops_per_token = (4 if args.lora else 6) * params + 12 * cfg.num_hidden_layers * cfg.hidden_size * mean_padded_len
    achieved = o["tokens"] * flops_per_token / o["train_s"] / 1e9
    result = {
        "benchmark": "sft_vs_trl",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "transformers": transformers.__version__, "trl": trl.__version__,
                    "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
        "settings": {"model": str(args.model) if args.model else f"random {args.preset} preset", "lora": args.lora,
                     "parameters": params, "examples": args.n, "batch_size": args.batch_size,
                     "max_length": 1024, "epochs": 1, "dtype": dtype, "attention": attn, "repeats": args.repeats,
                     "loss": "completion tokens only (prompt masked) on both sides"},
        "matmul_gflops": mm,
        "ours": ours, "trl_random": trl_random, "trl_group_by_length": trl_grouped,
        "ratio_vs_trl_default": o["tokens_per_s"] / tr["tokens_per_s"],
        "ratio_vs_trl_group_by_length": o["tokens_per_s"] / tg["tokens_per_s"],
        "cpu_time_ratio_vs_trl_default": o["tokens_per_cpu_s"] / tr["tokens_per_cpu_s"],
        "cpu_time_ratio_vs_trl_group_by_length": o["tokens_per_cpu_s"] / tg["tokens_per_cpu_s"],
        "end_to_end_ratio_vs_trl_default": tr["wall_s"] / o["wall_s"],
        "ours_flops_per_token": flops_per_token,
        "ours_achieved_gflops": achieved,
        "ours_share_of_matmul": achieved / mm["best"],
        "ours_profile": prof,
        "target": {"ratio_min": 1.5, "met": o["tokens_per_s"] / tr["tokens_per_s"] >= 1.5},
    }
    result["command"] = "python benchmarks/bench_sft_vs_trl.py " + " ".join(sys.argv[1:])
    record(RESULTS / "sft_vs_trl.json", shape, result, {
        "ratio_vs_trl_default": result["ratio_vs_trl_default"],
        "ratio_vs_trl_group_by_length": result["ratio_vs_trl_group_by_length"],
        "share_of_matmul": result["ours_share_of_matmul"], "target_share": 0.7,
        "share_met": result["ours_share_of_matmul"] >= 0.7,
        # share = matmul_share x (the products' own rate / the peak): what removing everything else would leave
        "matmul_share": prof["matmul_share"],
        "products_share_of_peak": result["ours_share_of_matmul"] / prof["matmul_share"]})
    shutil.rmtree(work, ignore_errors=True)
    say(f"ours {o['tokens_per_s']:.0f} tok/s; TRL {tr['tokens_per_s']:.0f} (random) / {tg['tokens_per_s']:.0f} "
        f"(group_by_length): {result['ratio_vs_trl_default']:.2f}x / {result['ratio_vs_trl_group_by_length']:.2f}x; "
        f"ours at {achieved:.1f} GFLOP/s = {result['ours_share_of_matmul']:.0%} of matmul ({mm['best']} GFLOP/s)")
    print(json.dumps({k: result[k] for k in ("ratio_vs_trl_default", "ratio_vs_trl_group_by_length",
                                             "ours_share_of_matmul")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
