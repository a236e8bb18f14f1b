"""Our GRPO step against TRL's GRPOTrainer on this CPU: same model, prompts, group size, completion length,
dtype, learning rate and loss; writes benchmarks/results/bench_grpo_vs_trl.json.

    python benchmarks/bench_grpo_vs_trl.py [--steps 4] [--prompts 16] [--n 8] [--max-tokens 128] [--dtype float32]
    python benchmarks/bench_grpo_vs_trl.py --model runs/smol --steps 3 --prompts 4 --n 4 --max-tokens 64 \
        --shape smollm2-135m                                          # a real model's shapes (SmolLM2-135M)

Both sides: the `small` tiny Qwen2 (hidden 192, 8 layers, 6/3 heads, MLP 576: ~3.6M parameters) with the
character tokenizer, randomly initialised (seed 0), the same 16
Countdown prompts per step (~120 characters each, one token per character), 8 completions each of up to 128
tokens, temperature 1 with no top-k/top-p, lr 1e-4, GRPO advantages (group mean and std), token-mean loss
(TRL's default "dapo"), clip 0.2, one update per batch, beta 0 (no reference model), no gradient
checkpointing. TRL runs with use_cpu, bf16/fp16 off and the tokenizer passed explicitly as
processing_class (AutoTokenizer would load a qwen2 directory as Qwen2Tokenizer). With `--model DIR` both
sides start from that model instead (its tokenizer; prompts as raw text on both sides).

Reported per side: step time, its split into generation and the rest (scoring, log-probs, forward, backward,
optimizer), median over the steps after the first (warm-up), in wall time and in CPU time of this process
(the CPU time is the sturdier figure when other work shares the machine; the load average is recorded);
ours then runs one step more, untimed, under torch.profiler (its table of where the time goes is in the
JSON); the step-time ratio; our training throughput as a share of this machine's matmul throughput in the
dtype (paths.matmul_rate: the best of square products);
both reward curves; each side's peak memory (each side runs in a fresh process of its own: its peak resident
memory, imports included).
"""

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from paths import ROOT, cpu_flags, in_own_process, matmul_rate, op_profile, record, shown

sys.path.insert(0, str(ROOT / "src"))

from budgetthink.formats import get_format
from budgetthink.jsonl import write_jsonl
from budgetthink.tasks import get_task

PROMPT = ("Using the numbers {numbers}, create an equation that equals {target}. Use + - * / and each number "
          "once. Answer in <answer> </answer>.\n")


def build(workdir: Path, n_problems: int):
    """A random-init `small` model directory and problems with ~120-character prompts."""
    from budgetthink.tasks import Problem
    from budgetthink.tiny import init_model

    model, tok = init_model("small", seed=0)
    model_dir = workdir / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    task = get_task("countdown", split="train")
    problems = [Problem(p.id, p.task, PROMPT.format(**p.answer), p.answer, p.meta) for p in task.generate(n_problems, 0)]
    write_jsonl(workdir / "problems.jsonl", [p.to_dict() for p in problems])
    return model_dir, problems, sum(p.numel() for p in model.parameters())


def matmul_params(model_dir: Path) -> int:
    """Parameters that take part in a matmul per token (linear layers and the tied output head)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))


def run_ours(args, model_dir: Path, workdir: Path) -> dict:
    from budgetthink.config import load_config
    from budgetthink.train import rl

    cfg = load_config(rl.RLConfig, None, [
        f"model={model_dir}", f"train_file={workdir / 'problems.jsonl'}", "eval_size=0", "eval_every=0",
        f"max_steps={args.steps + 1}", f"save_every={args.steps + 1}", f"prompts_per_step={args.prompts}", f"n={args.n}",
        f"max_response_tokens={args.max_tokens}", "temperature=1.0", "top_k=0", "top_p=1.0", f"optim.lr={args.lr}",
        "optim.grad_clip=1.0", "algorithm=grpo", "loss_agg=token-mean", "clip_low=0.2", "clip_high=0.2",
        "kl_coef=0", f"micro_batch_size={args.micro}", f"dtype={args.dtype}", "device=cpu", "seed=0",
        *(["prompt=raw"] if args.model else [])])
    cpu = {"generate": [], "train": []}
    profiles, rss_before = {}, []
    real_rollout, real_update = rl.rollout, rl.update

    def timed(fn, key):
        def wrapper(*a, **k):
            c = time.process_time()
            if len(cpu[key]) == args.steps:  # one step more than timed, under the profiler
                rss_before.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
                out, profiles[key] = op_profile(lambda: fn(*a, **k))
            else:
                out = fn(*a, **k)
            cpu[key].append(time.process_time() - c)
            return out
        return wrapper

    rl.rollout, rl.update = timed(real_rollout, "generate"), timed(real_update, "train")
    try:
        t = time.perf_counter()
        records = rl.train(cfg, workdir / "ours")
        wall = time.perf_counter() - t
    finally:
        rl.rollout, rl.update = real_rollout, real_update
    steps = [{k: r[k] for k in ("step", "step_s", "generate_s", "train_s", "reward_mean", "tokens_generated",
                                "response_len_mean")} for r in records]
    for s, g, u in zip(steps, cpu["generate"], cpu["train"]):
        s |= {"generate_cpu_s": g, "train_cpu_s": u, "step_cpu_s": g + u}
    return {"wall_s": wall, "steps": steps[:args.steps], "profile_extra_step": profiles,
            "peak_rss_mib_before_profile": rss_before[0]}  # the profiler's records take memory too


def run_trl(args, model_dir: Path, workdir: Path, problems: list) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    fmt = get_format("tinyzero")
    task = get_task("countdown")
    by_prompt = {fmt.prompt(p.prompt): p for p in problems}
    dataset = Dataset.from_list([{"prompt": fmt.prompt(p.prompt)} for p in problems])

    def reward(prompts, completions, **kwargs):
        return [task.score(by_prompt[p], c).reward for p, c in zip(prompts, completions)]

    times = {"step": [], "generate": [], "rollout": [], "step_cpu": [], "generate_cpu": [], "rollout_cpu": []}

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            times["step"].append(time.perf_counter() - self.t)
            times["step_cpu"].append(time.process_time() - self.c)

    config = GRPOConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=args.prompts * args.n, num_generations=args.n,
        gradient_accumulation_steps=1, max_completion_length=args.max_tokens, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, beta=0.0, epsilon=0.2, num_iterations=1,
        loss_type="dapo", scale_rewards="group", temperature=1.0, top_p=1.0, top_k=0, max_steps=args.steps,
        use_cpu=True, bf16=args.dtype == "bfloat16", fp16=False, gradient_checkpointing=False, report_to="none",
        save_strategy="no", logging_steps=1, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir) if args.model else PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Clock()])
    for name, key in (("_generate", "generate"), ("_generate_and_score_completions", "rollout")):
        real = getattr(trainer, name)

        def timed(*a, _real=real, _key=key, **k):
            t, c = time.perf_counter(), time.process_time()
            out = _real(*a, **k)
            times[_key].append(time.perf_counter() - t)
            times[f"{_key}_cpu"].append(time.process_time() - c)
            return out

        setattr(trainer, name, timed)
    t = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    lengths = [h.get("completions/mean_length") for h in trainer.state.log_history if "reward" in h]
    steps = [{"step": i + 1, "step_s": times["step"][i], "generate_s": times["generate"][i],
              "rollout_s": times["rollout"][i], "train_s": times["step"][i] - times["generate"][i],
              "step_cpu_s": times["step_cpu"][i], "generate_cpu_s": times["generate_cpu"][i],
              "train_cpu_s": times["step_cpu"][i] - times["generate_cpu"][i],
              "reward_mean": rewards[i] if i < len(rewards) else None,
              "response_len_mean": lengths[i] if i < len(lengths) else None} for i in range(len(times["step"]))]
    return {"wall_s": wall, "steps": steps}


def median_after_first(steps: list[dict], key: str) -> float:
    vals = [s[key] for s in steps[1:]] or [s[key] for s in steps]
    return statistics.median(vals)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--micro", type=int, default=64, help="our micro-batch (completions per forward/backward)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--model", type=Path, default=None, help="a model directory to start both sides from "
                    "(default: a random `small` tiny Qwen2)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_grpo_vs_trl.json")
    ap.add_argument("--shape", default="tiny-small", help="the entry this run fills in the JSON (e.g. smollm2-135m)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # and in each side's own process

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir, problems, n_params = build(workdir, args.prompts * (args.steps + 1))
        if args.model:
            model_dir, n_params = args.model, None  # counted below, as the matmul parameters
        ours = in_own_process(run_ours, args, model_dir, workdir)
        trl = None if args.skip_trl else in_own_process(run_trl, args, model_dir, workdir, problems)
        n_matmul = matmul_params(model_dir)
        n_params = n_params or n_matmul
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    rate = matmul_rate(dtype)
    peak = rate["best"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model) if args.model else None
    prompt_tokens = statistics.mean(len(tok.encode(get_format("tinyzero").prompt(p.prompt))) if tok else
                                    len(get_format("tinyzero").prompt(p.prompt)) for p in problems)  # tiny: 1 char = 1 token
    for side in filter(None, (ours, trl)):
        for key in ("step_s", "generate_s", "train_s", "step_cpu_s", "generate_cpu_s", "train_cpu_s"):
            side[f"median_{key}"] = median_after_first(side["steps"], key)
    # our training throughput: 6 flops per matmul parameter per token (forward + backward), over train_s; a
    # group's prompt goes through the model once (shared prefix), so prompt tokens count once per prompt
    train_flops = [6 * n_matmul * (s["tokens_generated"] + prompt_tokens * args.prompts) for s in ours["steps"]]
    ours["train_gflops"] = statistics.median([f / s["train_s"] / 1e9 for f, s in zip(train_flops, ours["steps"])][1:]
                                             or [train_flops[0] / ours["steps"][0]["train_s"] / 1e9])
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cores": os.cpu_count(), "cpu_flags": cpu_flags(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "settings": {**{k: (shown(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "params": n_params, "matmul_params": n_matmul, "prompt_tokens_mean": prompt_tokens},
        "matmul_gflops": rate,
        "ours": ours, "trl": trl,
        "ours_train_share_of_matmul_peak": ours["train_gflops"] / peak,
    }
    if trl:
        import trl as trl_pkg

        result["settings"]["trl_version"] = trl_pkg.__version__
        result["step_time_ratio_trl_over_ours"] = trl["median_step_s"] / ours["median_step_s"]
        result["step_cpu_ratio_trl_over_ours"] = trl["median_step_cpu_s"] / ours["median_step_cpu_s"]
        result["load_average_at_end"] = os.getloadavg()
    result["command"] = "python benchmarks/bench_grpo_vs_trl.py " + " ".join(sys.argv[1:])
    share = result["ours_train_share_of_matmul_peak"]
    # The training half can reach the peak only as far as it multiplies matrices, and its products only as
    # fast as they run at this model's shapes: share = matmul_share x (the products' own rate / the peak).
    mm_share = ours["profile_extra_step"]["train"]["matmul_share"]
    summary = {"train_share_of_matmul_peak": share, "target_share": 0.7, "share_met": share >= 0.7,
               "train_matmul_share": mm_share, "train_products_share_of_peak": share / mm_share}
    if trl:
        ratio = result["step_time_ratio_trl_over_ours"]
        summary |= {"ratio_trl_over_ours": ratio, "target": 3.0, "met": ratio >= 3.0,
                    "peak_rss_mib": {"ours": ours["peak_rss_mib_before_profile"],
                                     "trl": trl["peak_rss_mib"]}}
    record(args.out, args.shape, result, summary)
    print(f"ours: {ours['median_step_s']:.2f} s/step (generate {ours['median_generate_s']:.2f}, "
          f"train {ours['median_train_s']:.2f}); training {ours['train_gflops']:.1f} GFLOP/s = "
          f"{result['ours_train_share_of_matmul_peak']:.0%} of the {peak:.0f} GFLOP/s matmul peak ({args.dtype})")
    if trl:
        print(f"trl:  {trl['median_step_s']:.2f} s/step (generate {trl['median_generate_s']:.2f}, "
              f"rest {trl['median_train_s']:.2f}); ratio trl/ours = {result['step_time_ratio_trl_over_ours']:.2f}x "
              f"(CPU time: {result['step_cpu_ratio_trl_over_ours']:.2f}x)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
