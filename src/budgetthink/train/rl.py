"""R1-Zero-style RL with verifiable rewards: the GRPO family (grpo, dr_grpo, rloo, reinforce_pp) and PPO.

    budgetthink rl --config recipes/tiny-countdown-grpo.yaml --out runs/rl [key=value ...] [--resume]

Each step: take the next prompts of the task (a fixed order per seed), sample n completions per prompt
through the engine (under a thinking budget if one is set) with the current weights, score them with the
task's verifier, turn scores into advantages, and update the policy for `ppo_epochs` passes over
mini-batches. Tokens the engine inserted (budget forcing) are context, never a policy-gradient target.

With a `budget_curriculum` (budget-aware RL, L1/LCPO; see curriculum.py) each group's prompt states a
drawn thinking budget, the engine may enforce it, and the reward is shaped by the thinking used against it.

Outputs in OUT: metrics.jsonl (a line per step), eval.jsonl (greedy held-out evaluation every
`eval_every` steps), checkpoints/step_N (atomic; `--resume` continues from the last), model/ (the final
policy, an ordinary model directory with a model card, README.md), metrics.png, config.yaml, ledger.jsonl (the
cost), tracking/ (with `report_to`: the same metrics, live, for TensorBoard or W&B; see tracking.py).

Sections: run state and setup, the batch's old and reference log-probs and advantages, the update,
evaluation and reporting, the loop (`train`, which reads on one screen). The settings are in rl_config.py,
the rollouts (sampling and scoring) in rollouts.py, the batch tensors and forward passes in batch.py, the
losses in losses.py and the PPO critic in critic.py.

Simplifications: one process (no data parallelism); the KL reference is the initial policy; an engine
with weights of its own (vllm) gets them through `update_weights(model)` after every policy update.
"""

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from budgetthink import model_card, tracking
from budgetthink.config import dump_config
from budgetthink.engine import Sampling
from budgetthink.errors import UserError
from budgetthink.formats import Prompter, get_format
from budgetthink.jsonl import append_jsonl, read_jsonl
from budgetthink.train import losses as L
from budgetthink.train.batch import collate, critic_forward, micro, minibatch_plan, policy_forward
from budgetthink.train.common import (
    MetricsLog,
    check_finite,
    clip_grad,
    latest_checkpoint,
    load_model,
    make_optimizer,
    make_scheduler,
    plot_metrics,
    resume_point,
    rewind_logs,
    rng_state,
    save_checkpoint,
    save_model_dir,
    say,
    seed_everything,
    set_rng_state,
)
from budgetthink.train.curriculum import rollout_metrics as curriculum_metrics
from budgetthink.train.rl_config import ALGORITHMS, CriticConfig, RLConfig  # noqa: F401  (rl.RLConfig for callers)
from budgetthink.train.rollouts import Rollout, generate, mix, rollout


# --- run state -------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What a run holds, by concern: its settings and place; the models and how they sample; the data; the
    optimisation (policy, KL controller, reference, critic); progress and bookkeeping."""

    cfg: RLConfig
    out: Path
    device: torch.device
    # models and sampling
    model: torch.nn.Module
    tokenizer: object
    engine: object
    fmt: object
    prompter: object  # formats.Prompter: task prompt -> the model's input text and ids
    # data
    task: object
    train_set: list
    eval_set: list
    # optimisation
    optimizer: torch.optim.Optimizer
    scheduler: object
    kl: L.KLController
    ref: torch.nn.Module | None = None
    critic: torch.nn.Module | None = None
    critic_opt: torch.optim.Optimizer | None = None
    critic_sched: object = None
    # progress and bookkeeping
    step: int = 0  # last completed step
    updates: int = 0  # optimizer steps taken by the policy (the engine is synced when this changes)
    synced: int = -1  # `updates` when the engine last received the weights
    data_pos: int = 0  # problems consumed from the data order
    last_ckpt: Path | None = None
    log: MetricsLog = None
    warned: set = field(default_factory=set)
    zero_reward_steps: int = 0
    _perm: tuple = (None, None)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load_problems(path: str):
    from budgetthink.tasks import Problem

    return [Problem.from_dict(r) for r in read_jsonl(path)]


def _data(cfg: RLConfig) -> tuple[object, list, list]:
    """(task, train problems, held-out problems): from files, or generated from the task's train and test
    splits (disjoint whatever the seeds)."""
    from budgetthink.tasks import get_task

    task = get_task(cfg.task, **{**cfg.task_options, "split": "train"})
    train = _load_problems(cfg.train_file) if cfg.train_file else task.generate(cfg.train_size, seed=cfg.seed)
    if cfg.eval_file:
        held = _load_problems(cfg.eval_file)
    elif cfg.eval_size:
        held = get_task(cfg.task, **{**cfg.task_options, "split": "test"}).generate(cfg.eval_size, seed=cfg.seed)
    else:
        held = []
    held_prompts = {p.prompt for p in held}
    train = [p for p in train if p.prompt not in held_prompts]
    if not train:
        raise UserError("no training problems: raise train_size or check train_file")
    return task, train, held


def setup(cfg: RLConfig, out: Path, resume: bool) -> Run:
    from budgetthink.engine import load_engine

    out.mkdir(parents=True, exist_ok=True)
    ckpt, state = resume_point(out) if resume else (None, None)  # the newest intact checkpoint
    if not resume and (latest_checkpoint(out) or (out / "metrics.jsonl").exists()):
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    seed_everything(cfg.seed)
    device = _pick_device(cfg.device)
    model, tokenizer = load_model(cfg.model, ckpt, cfg.lora, cfg.gradient_checkpointing, dtype=torch.float32,
                                  hint="build one with `budgetthink tiny --out DIR` and set model=DIR")
    model = model.to(device)
    task, train_set, eval_set = _data(cfg)
    optimizer = make_optimizer(model, cfg.optim)
    fmt = get_format(cfg.format)
    run = Run(cfg=cfg, out=out, device=device, model=model, tokenizer=tokenizer,
              engine=load_engine(model, cfg.engine, tokenizer=tokenizer, **cfg.engine_options), task=task, fmt=fmt,
              prompter=Prompter(fmt, tokenizer, cfg.prompt), train_set=train_set, eval_set=eval_set, optimizer=optimizer,
              scheduler=make_scheduler(optimizer, cfg.optim, cfg.max_steps), kl=L.KLController(
                  cfg.kl_coef, cfg.kl_target, cfg.kl_horizon), log=MetricsLog(out / "metrics.jsonl"))
    if cfg.kl_coef > 0 and not cfg.lora:  # with LoRA the reference is the base with adapters disabled
        from transformers import AutoModelForCausalLM

        run.ref = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).to(device).eval()
        run.ref.requires_grad_(False)
    if cfg.algorithm == "ppo":
        from budgetthink.train.critic import Critic

        source = ckpt / "critic" if ckpt else (cfg.critic.model or cfg.model)
        run.critic = Critic.from_pretrained(source).to(device)
        run.critic_opt = make_optimizer(run.critic, cfg.critic.optim)
        run.critic_sched = make_scheduler(run.critic_opt, cfg.critic.optim, cfg.max_steps)
    if ckpt:
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        if run.critic is not None:
            run.critic_opt.load_state_dict(state["critic_optimizer"])
            run.critic_sched.load_state_dict(state["critic_scheduler"])
        run.step, run.data_pos, run.kl.coef = state["step"], state["data_pos"], state["kl_coef"]
        run.zero_reward_steps, run.warned = state.get("zero_reward_steps", 0), set(state.get("warned", ()))
        set_rng_state(state["rng"])
        run.last_ckpt = ckpt
    elif resume:
        say(f"no checkpoint in {out}: starting from step 0")
    if resume:
        rewind_logs(out, run.step if ckpt else None)  # each log continues exactly once
    dump_config(cfg, out / "config.yaml")
    return run


def checkpoint(run: Run) -> None:
    state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), "rng": rng_state(),
             "data_pos": run.data_pos, "kl_coef": run.kl.coef, "zero_reward_steps": run.zero_reward_steps,
             "warned": sorted(run.warned)}
    modules = {}
    if run.critic is not None:
        state |= {"critic_optimizer": run.critic_opt.state_dict(), "critic_scheduler": run.critic_sched.state_dict()}
        modules["critic"] = run.critic
    run.last_ckpt = save_checkpoint(run.out, run.step, run.model, run.tokenizer, state, modules,
                                    keep=run.cfg.keep_checkpoints, stage="rl")


# --- the batch: old and reference log-probs, values, advantages ----------------------------------------------------
def _pad_cat(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])


def score_batch(run: Run, rows: list[Rollout], need_old: bool) -> dict:
    """Forward passes with no gradient over the whole batch: old log-probs (if needed), reference
    log-probs (if a KL is used), values (ppo); then advantages. All [B, T] except `scores` [B]."""
    cfg, dev = run.cfg, run.device
    T = max(max(len(r.completion.token_ids) for r in rows), 1)
    old, ref, val, ent = [], [], [], []
    with torch.no_grad():
        for mb in micro(list(range(len(rows))), cfg.micro_batch_size):
            batch = collate([rows[i] for i in mb], run.tokenizer.pad_token_id, cfg.truncated, dev)
            if need_old:
                lp, e = policy_forward(run.model, batch, cfg.temperature, True, cfg.dtype)
                old.append(lp), ent.append(e)
            if cfg.kl_coef > 0:
                if run.ref is not None:
                    ref.append(policy_forward(run.ref, batch, cfg.temperature, False, cfg.dtype)[0])
                else:
                    with run.model.disable_adapter():
                        ref.append(policy_forward(run.model, batch, cfg.temperature, False, cfg.dtype)[0])
            if run.critic is not None:
                val.append(critic_forward(run.critic, batch, cfg.dtype))
    full = collate(rows, run.tokenizer.pad_token_id, cfg.truncated, dev)
    mask = full["mask"]
    out = {"mask": mask, "scores": torch.tensor([r.reward for r in rows], device=dev)}
    if need_old:
        out["old_logp"], out["entropy"] = _pad_cat(old, T), _pad_cat(ent, T)
    if ref:
        out["ref_logp"] = _pad_cat(ref, T)
    kl_tok = None
    if cfg.kl_coef > 0 and cfg.kl_in_reward:
        kl_tok = L.kl_penalty(out["old_logp"], out["ref_logp"], cfg.kl_estimator)
        out["kl_reward"] = L.masked_mean(kl_tok, mask)
    rew = L.token_rewards(out["scores"], mask, kl_tok, run.kl.coef if kl_tok is not None else 0.0)  # [B, T]
    if cfg.algorithm == "ppo":
        out["values"] = _pad_cat(val, T)
        adv, out["returns"] = L.gae(rew, out["values"], mask, cfg.gamma, cfg.lam)
        out["adv_mean"] = L.masked_mean(adv, mask)  # before whitening (after it, the mean is 0)
        out["adv"] = L.whiten(adv, mask) if cfg.whiten_advantages else adv
    elif cfg.algorithm == "reinforce_pp":
        out["adv"] = L.reinforce_pp_advantages(rew, mask, cfg.gamma)
    else:
        seq_reward = rew.sum(dim=1) if kl_tok is not None else out["scores"]  # score - beta * sum of KL
        adv = L.outcome_advantages(cfg.algorithm, seq_reward, cfg.n, cfg.norm_adv_by_std)  # [B]
        out["adv"] = adv[:, None] * mask
    return out


# --- the update -------------------------------------------------------------------------------------------------------
def update(run: Run, rows: list[Rollout], step: int) -> dict:
    """ppo_epochs passes over the batch in mini-batches (one optimizer step each), micro-batched: the policy's
    update here, then (ppo) the critic's over the same mini-batches (critic.update)."""
    cfg = run.cfg
    B = len(rows)
    mb_size = min(cfg.mini_batch_size or B, B)
    on_policy = cfg.ppo_epochs == 1 and mb_size == B  # the ratio is exactly 1: old log-probs = detached new ones
    data = score_batch(run, rows, need_old=not on_policy or cfg.kl_in_reward)
    plan = minibatch_plan(B, cfg.n, mb_size, cfg.ppo_epochs, torch.Generator().manual_seed(mix(cfg.seed, step, 7)))
    stats: dict[str, list] = {}
    if not (cfg.algorithm == "ppo" and step <= cfg.critic.warmup_steps):  # a warm-up trains only the critic
        run.model.train()
        for mb in plan:
            mb_tokens = float(data["mask"][mb].sum().clamp(min=1.0))
            run.optimizer.zero_grad(set_to_none=True)
            for idx in micro(mb, cfg.micro_batch_size):
                batch = collate([rows[i] for i in idx], run.tokenizer.pad_token_id, cfg.truncated, run.device)
                pick = {k: v[idx][:, :batch["resp"].shape[1]] for k, v in data.items() if v.dim() == 2}
                # weight so that the sum over micro-batches is the aggregate over the whole mini-batch
                weight = float(pick["mask"].sum()) / mb_tokens if cfg.loss_agg == "token-mean" else len(idx) / len(mb)
                _actor_micro(run, batch, pick, weight, stats, step)
            gn = clip_grad(run.model.parameters(), cfg.optim.grad_clip)
            check_finite(step, run.last_ckpt, grad_norm=gn)
            run.optimizer.step()
            run.updates += 1
            stats.setdefault("grad_norm", []).append(gn)
        run.scheduler.step()
    if run.critic is not None:
        from budgetthink.train import critic

        for k, v in critic.update(run.critic, run.critic_opt, run.critic_sched, plan, rows, data, cfg,
                                  run.tokenizer.pad_token_id, run.device, lambda **x: check_finite(step, run.last_ckpt, **x)).items():
            stats.setdefault(k, []).extend(v)
    result = {k: float(np.mean(v)) for k, v in stats.items()}
    mask = data["mask"]
    if "entropy" in data:
        result["entropy"] = L.masked_mean(data["entropy"], mask).item()
    if cfg.algorithm == "ppo":
        result |= {"explained_var": L.explained_variance(data["values"], data["returns"], mask),
                   "value_mean": L.masked_mean(data["values"], mask).item(),
                   "return_mean": L.masked_mean(data["returns"], mask).item()}
    result["adv_mean"] = data.get("adv_mean", L.masked_mean(data["adv"], mask)).item()
    if "kl_reward" in data:
        result["kl"] = data["kl_reward"].item()
        result["kl_coef"] = run.kl.coef
        run.kl.update(result["kl"], n_steps=len(rows))
    return result


def _actor_micro(run: Run, batch: dict, pick: dict, weight: float, stats: dict, step: int) -> None:
    """Loss of one micro-batch of the policy: clipped surrogate (+ KL term) (- entropy bonus); backward."""
    cfg = run.cfg
    mask = pick["mask"]
    logp, ent = policy_forward(run.model, batch, cfg.temperature, entropy=True, dtype=cfg.dtype,
                               share=not cfg.gradient_checkpointing, entropy_grad=cfg.entropy_coef > 0)
    old = pick["old_logp"] if "old_logp" in pick else logp.detach()
    pg, clipped = L.policy_loss(logp, old, pick["adv"], cfg.clip_low, cfg.clip_high, cfg.dual_clip)
    agg = lambda x: L.aggregate(x, mask, cfg.loss_agg, norm_len=cfg.max_response_tokens)
    loss = agg(pg)
    if cfg.kl_coef > 0 and not cfg.kl_in_reward:
        kl = L.kl_penalty(logp, pick["ref_logp"], cfg.kl_estimator)
        loss = loss + run.kl.coef * agg(kl)
        stats.setdefault("kl", []).append(L.masked_mean(kl.detach(), mask).item())
    if cfg.entropy_coef > 0:
        loss = loss - cfg.entropy_coef * agg(ent)
    check_finite(step, run.last_ckpt, loss=loss.item())
    (loss * weight).backward()
    stats.setdefault("loss", []).append(loss.item())
    stats.setdefault("pg_loss", []).append(agg(pg.detach()).item())
    stats.setdefault("clip_frac", []).append(L.masked_mean(clipped.float(), mask).item())
    stats.setdefault("approx_kl", []).append(L.masked_mean(L.kl_penalty(old, logp.detach(), "k3"), mask).item())
    if "old_logp" not in pick:
        stats.setdefault("entropy", []).append(L.masked_mean(ent.detach(), mask).item())


# --- evaluation and reporting ------------------------------------------------------------------------------------------
def evaluate(run: Run, step: int) -> dict:
    """Held-out evaluation: greedy accuracy and mean reward (TinyZero's validation score), at `eval_max_tokens`
    (default: the model's whole context, not the rollout cap); with `eval_samples` k > 0 also mean@k and pass@k
    of k samples per problem at the rollout temperature (less noisy than one greedy answer per problem).

    With a budget curriculum, once per evaluation budget B (stated in the prompt, enforced as in training):
    a line per B in eval.jsonl, and the returned record holds the means over budgets plus
    `accuracy_B<b>` and `budget_error_B<b>` per budget."""
    cfg, cur = run.cfg, run.cfg.budget_curriculum
    context = getattr(run.model.config, "max_position_embeddings", None) or 2048
    longest = max(len(run.prompter.encode(p.prompt)[1]) for p in run.eval_set)
    cap = cfg.eval_max_tokens or max(1, context - longest - 16)  # room for what budget forcing inserts
    greedy = Sampling(temperature=0.0, max_tokens=cap)

    def rolls_of(sampling: Sampling, n: int, budget: int | None) -> list[Rollout]:
        out = []
        for i in range(0, len(run.eval_set), max(1, cfg.eval_batch_size // n)):
            chunk = run.eval_set[i:i + max(1, cfg.eval_batch_size // n)]
            out += generate(run, chunk, n, sampling, None if budget is None else [budget] * len(chunk))
        return out

    lines = []
    for budget in (cur.eval_points() if cur else [None]):
        rolls = rolls_of(greedy, 1, budget)
        line = {"step": step, "n": len(rolls),
                "reward": float(np.mean([r.score.reward for r in rolls])),
                "accuracy": float(np.mean([r.score.correct for r in rolls])),
                "format_rate": float(np.mean([r.score.formatted for r in rolls])),
                "response_len_mean": float(np.mean([len(r.completion.token_ids) for r in rolls])),
                "tokens_generated": int(sum(sum(r.completion.sampled) for r in rolls)),
                "truncated": float(np.mean([r.truncated for r in rolls]))}
        if cfg.eval_samples and budget is None:
            k = cfg.eval_samples
            sampled = rolls_of(Sampling(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, max_tokens=cap,
                                        seed=mix(cfg.seed, step, 13)), k, None)
            correct = np.array([r.score.correct for r in sampled], dtype=float).reshape(-1, k)  # [problems, k]
            line |= {f"mean@{k}": float(correct.mean()), f"pass@{k}": float(correct.max(axis=1).mean()),
                     "sampled_truncated": float(np.mean([r.truncated for r in sampled]))}
            line["tokens_generated"] += int(sum(sum(r.completion.sampled) for r in sampled))
        if budget is not None:
            line = {"step": step, "budget": budget, **line, **curriculum_metrics(cur, rolls)}
        append_jsonl(run.out / "eval.jsonl", line)
        lines.append(line)
    record = {k: float(np.mean([x[k] for x in lines])) for k in ("reward", "accuracy", "format_rate")}
    record |= {k: v for k, v in lines[0].items() if k.startswith(("mean@", "pass@"))}
    record["tokens_generated"] = sum(x["tokens_generated"] for x in lines)
    for x in lines if cur else []:
        record |= {f"accuracy_B{x['budget']}": x["accuracy"], f"budget_error_B{x['budget']}": x["budget_error"]}
    return record


COMPLETION_COLUMNS = ["prompt", "completion", "reward", "correct"]


def completion_rows(generated: list[Rollout], n: int) -> list[list]:
    """The first sampled completion of each prompt, as rows of COMPLETION_COLUMNS (for the trackers)."""
    return [[r.problem.prompt, r.completion.text, r.reward, bool(r.score.correct)] for r in generated[::n]]


def rollout_metrics(generated: list[Rollout], n: int) -> dict:
    rewards = np.array([r.reward for r in generated])
    groups = rewards.reshape(-1, n)
    lengths = [sum(r.completion.sampled) for r in generated]
    return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "accuracy": float(np.mean([r.score.correct for r in generated])),
            "format_rate": float(np.mean([r.score.formatted for r in generated])),
            "no_answer": float(np.mean([r.score.extracted is None for r in generated])),
            "score_timeouts": int(sum(getattr(r.score, "reason", None) == "timeout" for r in generated)),
            "zero_spread_groups": float(np.mean(groups.max(axis=1) == groups.min(axis=1))) if n > 1 else None,
            "response_len_mean": float(np.mean(lengths)), "response_len_max": int(max(lengths)),
            "truncated": float(np.mean([r.truncated for r in generated])),
            "tokens_generated": int(sum(lengths))}


def warnings(run: Run, m: dict) -> None:
    """The two silent failures users report most: reward stuck at 0, and truncated completions."""
    cfg = run.cfg
    run.zero_reward_steps = run.zero_reward_steps + 1 if m["reward_mean"] == 0 else 0
    if run.zero_reward_steps >= cfg.warn_after and "zero" not in run.warned:
        run.warned.add("zero")
        say(f"warning: reward has been 0 for {run.zero_reward_steps} steps: {m['no_answer']:.0%} of completions "
            f"have no answer tag, {m['truncated']:.0%} were truncated at max_response_tokens="
            f"{cfg.max_response_tokens}; check the format ({cfg.format}) and the prompt template")
    if m["truncated"] > cfg.warn_truncated and cfg.truncated == "keep" and "truncated" not in run.warned:
        run.warned.add("truncated")
        say(f"warning: {m['truncated']:.0%} of completions hit max_response_tokens={cfg.max_response_tokens} "
            "and were cut off (they usually score 0); raise max_response_tokens, or set truncated=mask or soft")


def finish(run: Run) -> None:
    """The final policy as an ordinary model directory and the plot of reward, accuracy, length."""
    save_model_dir(run.model.merge_and_unload() if run.cfg.lora else run.model, run.tokenizer, run.out / "model")
    records = run.log.read()  # eval steps carry eval_accuracy; the evaluation before training is in eval.jsonl
    first = [r["accuracy"] for r in read_jsonl(run.out / "eval.jsonl") if r["step"] == 0] if (
        run.out / "eval.jsonl").exists() else []
    if first:
        records.insert(0, {"step": 0, "eval_accuracy": float(np.mean(first))})
    plot_metrics(records, ["reward_mean", "accuracy", "eval_accuracy", "response_len_mean"],
                 run.out / "metrics.png", title=f"{run.cfg.algorithm} on {run.cfg.task}")


# --- the loop ------------------------------------------------------------------------------------------------------------
def train(cfg: RLConfig, out: Path, resume: bool = False) -> list[dict]:
    """Run (or resume) RL into `out`; returns the metrics records. The run's cost goes to OUT/ledger.jsonl."""
    from tqdm import tqdm

    from budgetthink.ledger import stage_ledger

    out = Path(out)
    with stage_ledger(out, stage="rl", config=cfg) as bill:
        run = setup(cfg, out, resume)
        tracker = tracking.start(cfg.report_to, out, stage="rl", config=cfg, resume_step=run.step)
        if run.step == 0 and cfg.eval_every and run.eval_set:
            ev = evaluate(run, 0)
            bill.add(tokens_generated=ev["tokens_generated"])
            tracker.log({f"eval_{k}": v for k, v in ev.items() if k not in ("tokens_generated", "format_rate")}, 0)
        timed = cfg.max_minutes is not None  # then the number of steps is not known in advance
        bar = tqdm(total=None if timed else cfg.max_steps, initial=run.step, file=sys.stderr, dynamic_ncols=True,
                   desc=f"rl {cfg.algorithm}" + (f" (up to {cfg.max_minutes:g} min)" if timed else ""))
        trained_s = sum(r["generate_s"] + r["train_s"] for r in run.log.read())  # on resume: the time so far
        for step in range(run.step + 1, cfg.max_steps + 1):
            t0 = time.perf_counter()
            lr = run.scheduler.get_last_lr()[0]
            generated, rows = rollout(run, step)  # n completions per prompt with the current weights, scored
            t1 = time.perf_counter()
            stats = update(run, rows, step) if rows else {}  # advantages, then ppo_epochs x mini-batches
            t2 = time.perf_counter()
            trained_s += t2 - t0
            last = step == cfg.max_steps or (cfg.max_minutes is not None and trained_s >= cfg.max_minutes * 60)
            run.step = step
            budget_stats = {} if cfg.budget_curriculum is None else curriculum_metrics(cfg.budget_curriculum, generated)
            m = {"step": step, **rollout_metrics(generated, cfg.n), **budget_stats, "groups_trained": len(rows) // cfg.n,
                 "kl": None, "entropy": None, "loss": None, "grad_norm": None, **stats, "lr": lr,
                 "generate_s": t1 - t0, "train_s": t2 - t1}
            bill.add(tokens_generated=m["tokens_generated"], tokens_trained=cfg.ppo_epochs * sum(
                len(r.prompt_ids) + len(r.completion.token_ids) for r in rows))
            if cfg.eval_every and run.eval_set and (step % cfg.eval_every == 0 or last):
                ev = evaluate(run, step)
                bill.add(tokens_generated=ev["tokens_generated"])
                m |= {f"eval_{k}": v for k, v in ev.items() if k not in ("tokens_generated", "format_rate")}
            m["step_s"] = time.perf_counter() - t0
            run.log.append(m)
            tracker.log(m, step)
            if cfg.log_completions_every and step % cfg.log_completions_every == 0:
                tracker.table("completions", COMPLETION_COLUMNS, completion_rows(generated, cfg.n), step)
            warnings(run, m)
            if step % cfg.save_every == 0 or last:
                checkpoint(run)
                bill.checkpoint()
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward_mean']:.3f}", acc=f"{m['accuracy']:.2f}")
            if last:
                break
        bar.close()
        finish(run)
        tracker.finish()
    model_card.write(out / "model", out, stage="rl")  # after the ledger line, so the card carries the bill
    return run.log.read()
