"""Does our GRPO learn as fast per step as TRL's GRPOTrainer? Same start, reward, problems and hyper-parameters,
same number of steps, several seeds; writes benchmarks/results/bench_rl_vs_trl.{json,png}.

    python benchmarks/bench_rl_vs_trl.py [--base DIR] [--steps 12] [--seeds 0,1] [--eval-n 200]

Start: the `small` tiny base (tiny.cached_build, built here if not cached). Reward: a stand-in that this base
can learn within a few steps, so that a difference in learning speed is visible above the noise: 1 if the
completion's <answer> contains '/', else 0 (the base uses division in a few percent of its answers). Both
sides: 16 Countdown prompts (train split) per step, 8 completions of up to 128 tokens at temperature 1 (no
top-k/top-p), GRPO advantages (group mean and std), token-mean loss (TRL's "dapo"), clip 0.2, one update per
batch, no KL term, lr 1e-4 constant after no warm-up, gradient clip 1.0, fp32. The problems are the same set;
each side draws them in its own order.

Reported per seed and side: the sampled reward at every step, and the held-out rate (greedy, the same
engine and `--eval-n` test-split prompts for both) before and after. The comparison: the reward gain per step
(mean of the last three steps minus the first step, over the steps between), mean over seeds.
"""

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from paths import ROOT, shown

sys.path.insert(0, str(ROOT / "src"))

from budgetthink.jsonl import atomic_write_json, write_jsonl
from budgetthink.tasks import Score

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def stand_in_reward(completion: str) -> float:
    """1 if the (last) answer uses a division: a behaviour the base shows rarely and can learn quickly."""
    found = ANSWER.findall(completion)
    return float(bool(found) and "/" in found[-1])


def problems_for(seed: int, n_train: int, n_eval: int):
    from budgetthink import tiny
    from budgetthink.tasks import get_task

    train = get_task("countdown", split="train", **tiny.COUNTDOWN).generate(n_train, seed=100 + seed)
    held = get_task("countdown", split="test", **tiny.COUNTDOWN).generate(n_eval, seed=tiny.EVAL_SEED_OFFSET)
    return train, held


def held_out_rate(model_dir: Path, held: list) -> float:
    from budgetthink.engine import Sampling, load_engine
    from budgetthink.formats import get_format

    fmt = get_format("tinyzero")
    engine = load_engine(str(model_dir), device="cpu")
    outs = engine.generate([fmt.prompt(p.prompt) for p in held], Sampling(temperature=0.0, max_tokens=128), fmt=fmt)
    return statistics.mean(stand_in_reward(o.text) for o in outs)


def run_ours(args, base: Path, train_file: Path, seed: int, out: Path) -> list[float]:
    from budgetthink.config import load_config
    from budgetthink.train import rl

    cfg = load_config(rl.RLConfig, None, [
        f"model={base}", f"train_file={train_file}", "eval_size=0", "eval_every=0", f"max_steps={args.steps}",
        f"save_every={args.steps}", "prompts_per_step=16", "n=8", "max_response_tokens=128", "temperature=1.0",
        "top_k=0", "top_p=1.0", f"optim.lr={args.lr}", "optim.warmup_steps=0", "optim.grad_clip=1.0",
        "algorithm=grpo", "loss_agg=token-mean", "clip_low=0.2", "clip_high=0.2", "kl_coef=0", "dtype=float32",
        "device=cpu", f"seed={seed}", "format=tinyzero", "task=countdown"])
    real = rl._data

    def data(c):
        task, train, held = real(c)
        task.score = lambda problem, completion: Score(stand_in_reward(completion), stand_in_reward(completion) == 1,
                                                       True, None)
        return task, train, held

    rl._data = data
    try:
        records = rl.train(cfg, out)
    finally:
        rl._data = real
    return [r["reward_mean"] for r in records]


def run_trl(args, base: Path, train: list, seed: int, out: Path) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    from budgetthink.formats import get_format

    fmt = get_format("tinyzero")
    dataset = Dataset.from_list([{"prompt": fmt.prompt(p.prompt)} for p in train])

    def reward(prompts, completions, **kwargs):
        return [stand_in_reward(c) for c in completions]

    config = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=16 * 8, num_generations=8, gradient_accumulation_steps=1,
        max_completion_length=128, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, beta=0.0, epsilon=0.2, num_iterations=1, loss_type="dapo", scale_rewards="group",
        temperature=1.0, top_p=1.0, top_k=0, max_steps=args.steps, use_cpu=True, bf16=False, fp16=False,
        report_to="none", save_strategy="no", logging_steps=1, seed=seed, dataloader_num_workers=0,
        disable_tqdm=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.train()
    trainer.model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    for name in ("generation_config.json",):  # the eval engine reads the base's stop ids
        if (base / name).exists():
            (out / "model" / name).write_text((base / name).read_text())
    return [h["reward"] for h in trainer.state.log_history if "reward" in h]


def gain_per_step(curve: list[float]) -> float:
    """(mean of the last three steps - the first step) / the steps between."""
    return (statistics.mean(curve[-3:]) - curve[0]) / (len(curve) - 2)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for seed, run in result["runs"].items():
        for side, style in (("ours", "-"), ("trl", "--")):
            c = run[side]["reward"]
            ax.plot(range(1, len(c) + 1), c, style, color="C0" if side == "ours" else "C1",
                    alpha=0.8, label=f"{side} (seed {seed})")
    ax.set_xlabel("step")
    ax.set_ylabel("sampled reward (answer uses '/')")
    ax.set_title("GRPO on the tiny base: budgetthink vs TRL GRPOTrainer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    from budgetthink import tiny

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_rl_vs_trl.json")
    args = ap.parse_args()
    base = args.base or tiny.cached_build("small")
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seed in seeds:
            train, held = problems_for(seed, 16 * args.steps, args.eval_n)
            write_jsonl(work / f"train{seed}.jsonl", [p.to_dict() for p in train])
            start = held_out_rate(base, held)
            ours = run_ours(args, base, work / f"train{seed}.jsonl", seed, work / f"ours{seed}")
            theirs = run_trl(args, base, train, seed, work / f"trl{seed}")
            runs[seed] = {"held_out_start": start,
                          "ours": {"reward": ours, "gain_per_step": gain_per_step(ours),
                                   "held_out_final": held_out_rate(work / f"ours{seed}" / "model", held)},
                          "trl": {"reward": theirs, "gain_per_step": gain_per_step(theirs),
                                  "held_out_final": held_out_rate(work / f"trl{seed}" / "model", held)}}
            print(json.dumps({seed: runs[seed]}), file=sys.stderr, flush=True)
    import trl as trl_pkg

    mean = lambda side, key: statistics.mean(r[side][key] for r in runs.values())
    summary = {"ours_gain_per_step": mean("ours", "gain_per_step"), "trl_gain_per_step": mean("trl", "gain_per_step"),
               "ours_held_out_final": mean("ours", "held_out_final"), "trl_held_out_final": mean("trl", "held_out_final"),
               "held_out_start": statistics.mean(r["held_out_start"] for r in runs.values()),
               "seeds": seeds, "steps": args.steps, "eval_problems": args.eval_n}
    summary["ours_at_least_trl"] = summary["ours_gain_per_step"] >= summary["trl_gain_per_step"]
    result = {"command": "python benchmarks/bench_rl_vs_trl.py " + " ".join(sys.argv[1:]),
              "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "torch": torch.__version__,
                          "trl": trl_pkg.__version__, "load_average_at_end": os.getloadavg()},
              "settings": {"base": shown(base), **{k: v for k, v in vars(args).items() if k not in ("base", "out")}},
              "wall_s": time.time() - t0, "summary": summary, "runs": runs}
    atomic_write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
