"""Hand-off to veRL (multi-node RL on Ray): `budgetthink export verl --task T --n-train N --n-test M --out DIR`.

    export_verl("countdown", n_train=327_680, n_test=1_024, out="verl-countdown", seed=0)

writes into DIR:
- `train.parquet`, `test.parquet`: veRL's RL dataset schema, one row per problem:
      data_source   the task name ("countdown"), which veRL passes to the reward function
      prompt        chat messages [{"role": "user", "content": <the whole prompt text>}]
      ability       "math"
      reward_model  {"style": "rule", "ground_truth": <Problem.answer>}   (countdown: {"target", "numbers"})
      extra_info    {"split", "index", "id", "problem": <the Problem as JSON>}
  Train and test come from one `generate(n_train + n_test + n_test, seed)` draw; test problems whose prompt
  is also in train are skipped, so the two never share a prompt.
- `reward.py`: `compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float`, which
  rebuilds the Problem and calls this project's scorer (`get_task(task, **options).score`); veRL loads it
  with `importlib.util.spec_from_file_location`, so budgetthink must be installed where veRL's workers run.
- `run_ppo.sh`, `run_grpo.sh`: `python3 -m verl.trainer.main_ppo` with TinyZero's hyper-parameters,
  the reward wired through `custom_reward_function.path/.name`.
- `export.json`: what was written and with which settings.

The prompt content is the complete text a base model sees (the task's template plus the format's opening
think delimiter, as TinyZero's data has it), so the scripts hand veRL a chat template that passes the first
message through unchanged: the model sees exactly that text, and the completion scored is only what it writes.
Countdown and multiply default to the task's `base` template (TinyZero's prompt) unless `template` is given.
"""

import json
import os
import tempfile
from pathlib import Path

from budgetthink.errors import UserError
from budgetthink.formats import get_format
from budgetthink.jsonl import atomic_write_json, atomic_write_text
from budgetthink.tasks import get_task

ABILITY = "math"  # TinyZero's label for countdown and arithmetic; math problems are math too

REWARD_PY = '''"""veRL reward function for budgetthink's {task!r} task, written by `budgetthink export verl`.

veRL: custom_reward_function.path=<this file> custom_reward_function.name=compute_score
It scores each response with budgetthink's own scorer, so budgetthink must be installed on every worker.
"""

import json

from budgetthink.tasks import Problem, get_task

TASK = {task!r}
TASK_OPTIONS = {options!r}
_task = None


def _plain(value):
    """numpy arrays and scalars (from parquet readers) -> plain lists, ints, floats; dicts recursively."""
    if isinstance(value, dict):
        return {{k: _plain(v) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    return value


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """Reward of `solution_str` (the response alone) against `ground_truth`, as budgetthink scores it."""
    global _task
    if _task is None:
        _task = get_task(TASK, **TASK_OPTIONS)
    problem = None
    if isinstance(extra_info, dict) and extra_info.get("problem"):
        problem = Problem.from_dict(json.loads(extra_info["problem"]))
    if problem is None:
        problem = Problem(id="", task=TASK, prompt="", answer=None)
    problem.answer = _plain(ground_truth)
    return float(_task.score(problem, solution_str).reward)
'''

# TinyZero's recipe (Jiayi-Pan/TinyZero scripts/train_tiny_zero.sh),
# in veRL 0.9's config keys. Shared by both scripts; each adds its algorithm's lines.
SCRIPT_HEAD = '''#!/usr/bin/env bash
# {title} on budgetthink's {task!r} export, with TinyZero's hyper-parameters (Jiayi-Pan/TinyZero,
# scripts/train_tiny_zero.sh): 256 prompts a step, prompts of at most 256 and responses of at most 1024
# tokens, sampling at temperature 1, PPO mini-batch 64 and micro-batch 8 (over all GPUs), actor lr 1e-6,
# entropy bonus 0.001, clip 0.2, one PPO epoch, vLLM at 40% of GPU memory, 15 epochs, validation (greedy)
# and checkpoints every 100 steps.
{algo_note}
#
#   pip install verl vllm budgetthink        # on every node: reward.py calls budgetthink's scorer
#   BASE_MODEL=Qwen/Qwen2.5-3B N_GPUS=2 bash {name} [more hydra overrides, e.g. trainer.total_epochs=1]
#
# Written for veRL 0.9's trainer config (verl/trainer/config/ppo_trainer.yaml). TinyZero trained the 3B model
# on 2 GPUs with rollout tensor parallelism 2; models up to 1.5B fit one GPU; 0.5B did not learn to reason.
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
: "${{BASE_MODEL:?set BASE_MODEL to a Hugging Face model id or directory, e.g. Qwen/Qwen2.5-3B}}"
N_GPUS="${{N_GPUS:-2}}"
NNODES="${{NNODES:-1}}"
ROLLOUT_TP_SIZE="${{ROLLOUT_TP_SIZE:-$N_GPUS}}"
EXPERIMENT_NAME="${{EXPERIMENT_NAME:-{task}-{algo}}}"
MICRO=$(( 8 / (N_GPUS * NNODES) ))   # TinyZero's micro-batch of 8 is over all GPUs
[ "$MICRO" -ge 1 ] || MICRO=1
# The prompt already is the whole text the model sees: a chat template that passes it through unchanged.
PASS_THROUGH='{{{{ messages[0].content }}}}'

python3 -m verl.trainer.main_ppo \\
  data.train_files="$HERE/train.parquet" \\
  data.val_files="$HERE/test.parquet" \\
  data.train_batch_size=256 \\
  data.max_prompt_length=256 \\
  data.max_response_length=1024 \\
  "++data.apply_chat_template_kwargs.chat_template='$PASS_THROUGH'" \\
  actor_rollout_ref.model.path="$BASE_MODEL" \\
  "actor_rollout_ref.model.custom_chat_template='$PASS_THROUGH'" \\
  actor_rollout_ref.actor.optim.lr=1e-6 \\
  actor_rollout_ref.actor.ppo_mini_batch_size=64 \\
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu="$MICRO" \\
  actor_rollout_ref.actor.ppo_epochs=1 \\
  actor_rollout_ref.actor.clip_ratio=0.2 \\
  actor_rollout_ref.actor.entropy_coeff=0.001 \\
  actor_rollout_ref.rollout.name=vllm \\
  actor_rollout_ref.rollout.temperature=1.0 \\
  actor_rollout_ref.rollout.gpu_memory_utilization=0.4 \\
  actor_rollout_ref.rollout.tensor_model_parallel_size="$ROLLOUT_TP_SIZE" \\
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu="$MICRO" \\
  actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu="$MICRO" \\
  custom_reward_function.path="$HERE/reward.py" \\
  custom_reward_function.name=compute_score \\
  ++reward.custom_reward_function.path="$HERE/reward.py" \\
  ++reward.custom_reward_function.name=compute_score \\
  trainer.logger='["console"]' \\
  trainer.project_name=budgetthink \\
  trainer.experiment_name="$EXPERIMENT_NAME" \\
  trainer.n_gpus_per_node="$N_GPUS" \\
  trainer.nnodes="$NNODES" \\
  trainer.total_epochs=15 \\
  trainer.save_freq=100 \\
  trainer.test_freq=100 \\
  trainer.val_before_train=False \\
'''

PPO_TAIL = '''  algorithm.adv_estimator=gae \\
  algorithm.gamma=1.0 \\
  algorithm.lam=1.0 \\
  algorithm.use_kl_in_reward=True \\
  algorithm.kl_ctrl.kl_coef=0.001 \\
  actor_rollout_ref.rollout.n=1 \\
  actor_rollout_ref.actor.use_kl_loss=False \\
  critic.optim.lr=1e-5 \\
  critic.model.path="$BASE_MODEL" \\
  critic.ppo_micro_batch_size_per_gpu="$MICRO" \\
  "$@"
'''
PPO_NOTE = ("# PPO: a critic (lr 1e-5) and GAE with gamma = lambda = 1, one sample per prompt, KL to the reference\n"
            "# model 0.001 as a penalty in the reward.")

GRPO_TAIL = '''  algorithm.adv_estimator=grpo \\
  algorithm.use_kl_in_reward=False \\
  actor_rollout_ref.rollout.n="${N_SAMPLES:-5}" \\
  actor_rollout_ref.actor.use_kl_loss=True \\
  actor_rollout_ref.actor.kl_loss_coef=0.001 \\
  actor_rollout_ref.actor.kl_loss_type=low_var_kl \\
  "$@"
'''
GRPO_NOTE = ("# GRPO (TinyZero's alternative): no critic, N_SAMPLES responses per prompt (default 5, as in veRL's\n"
             "# GRPO examples; TinyZero names none), KL 0.001 as a low-variance (k3) loss term instead of in the reward.")


def _default_options(task: str, options: dict | None) -> dict:
    options = dict(options or {})
    if task in ("countdown", "multiply") and "template" not in options:
        options["template"] = "base"  # TinyZero's prompt, not the compact one made for the tiny model
    return options


def _rows(problems, split: str, fmt) -> list[dict]:
    return [{
        "data_source": p.task,
        "prompt": [{"role": "user", "content": fmt.prompt(p.prompt)}],
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": p.answer},
        "extra_info": {"split": split, "index": i, "id": p.id, "problem": json.dumps(p.to_dict())},
    } for i, p in enumerate(problems)]


def _write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise UserError(f"cannot store this task's answers in parquet ({e}); answers must share one type") from None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_verl(task: str, n_train: int, n_test: int, out: str | Path, seed: int = 0,
                task_options: dict | None = None, format: str = "tinyzero") -> dict:
    """Write veRL's dataset, reward module and launch scripts for `task` into `out`; returns the manifest."""
    if n_train < 1 or n_test < 1:
        raise UserError(f"--n-train and --n-test must be at least 1 (got {n_train} and {n_test})")
    options = _default_options(task, task_options)
    t = get_task(task, **options)
    fmt = get_format(format)
    problems = t.generate(n_train + 2 * n_test, seed)  # the spare n_test replace test prompts also in train
    train = problems[:n_train]
    seen = {p.prompt for p in train}
    test = [p for p in problems[n_train:] if p.prompt not in seen][:n_test]
    if len(train) < n_train or len(test) < n_test:
        raise UserError(f"{task}: only {len(train)} train and {len(test)} distinct test problems could be drawn; "
                        "lower --n-train/--n-test or widen the task's options")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_parquet(_rows(train, "train", fmt), out / "train.parquet")
    _write_parquet(_rows(test, "test", fmt), out / "test.parquet")
    atomic_write_text(out / "reward.py", REWARD_PY.format(task=task, options=options))
    for name in ("train.parquet", "test.parquet", "reward.py"):
        os.chmod(out / name, 0o644)  # readable by the Ray workers, whoever runs them
    for name, algo, title, note, tail in (("run_ppo.sh", "ppo", "PPO with a critic", PPO_NOTE, PPO_TAIL),
                                          ("run_grpo.sh", "grpo", "GRPO", GRPO_NOTE, GRPO_TAIL)):
        text = SCRIPT_HEAD.format(title=title, task=task, algo=algo, algo_note=note, name=name) + tail
        atomic_write_text(out / name, text)
        os.chmod(out / name, 0o755)
    manifest = {"task": task, "task_options": options, "format": format, "seed": seed, "n_train": len(train),
                "n_test": len(test), "files": ["train.parquet", "test.parquet", "reward.py", "run_ppo.sh",
                                               "run_grpo.sh"], "out": str(out)}
    atomic_write_json(out / "export.json", manifest)
    return manifest
