"""The RL step's samples: the next prompts of the data order, n completions each through the engine with the
current weights (under a thinking budget or the budget curriculum's), scored by the task; dynamic sampling.

Used by train/rl.py (`budgetthink rl`), whose `Run` carries what these read: cfg, engine, model, prompter,
task, fmt, train_set and the data position.
"""

from dataclasses import dataclass

import numpy as np
import torch

from budgetthink.engine import Sampling
from budgetthink.train import losses as L


def next_problems(run, k: int) -> list:
    """The next k problems of the data order: a fresh permutation of the training set per epoch (per seed)."""
    N, picked = len(run.train_set), []
    for i in range(run.data_pos, run.data_pos + k):
        epoch = i // N
        if run._perm[0] != epoch:
            run._perm = (epoch, np.random.default_rng([run.cfg.seed, epoch]).permutation(N))
        picked.append(run.train_set[run._perm[1][i % N]])
    run.data_pos += k
    return picked


@dataclass
class Rollout:
    problem: object
    prompt_ids: list[int]
    completion: object  # engine.Completion
    score: object  # tasks.Score
    reward: float  # score.reward, shaped by the budget curriculum, plus any overlong penalty
    truncated: bool
    budget: int | None = None  # the thinking budget stated in the prompt (budget curriculum)


def generate(run, problems: list, n: int, sampling: Sampling, budgets: list | None = None) -> list[Rollout]:
    """n completions per problem through the engine, scored; prompt-major order. With `budgets` (budget
    curriculum) problem i's prompt states budgets[i], the engine enforces the curriculum's cap (one call per
    distinct cap) and the reward is shaped by the thinking used against it."""
    cfg, cur = run.cfg, run.cfg.budget_curriculum
    budgets = budgets or [None] * len(problems)
    prompts = [run.prompter.text(p.prompt, b) for p, b in zip(problems, budgets)]
    prompt_ids = [run.prompter.ids(p) for p in prompts]  # the engine and the loss see the same ids
    calls = (cur.engine_calls(budgets, base=cfg.budget) if budgets[0] is not None
             else [(cfg.budget, list(range(len(problems))))])
    if hasattr(run.engine, "update_weights") and run.synced != run.updates:  # an engine with its own weights
        run.engine.update_weights(run.model)
        run.synced = run.updates
    run.model.eval()
    comps = [None] * (len(problems) * n)
    for k, (engine_budget, idx) in enumerate(calls):
        call_sampling = sampling if len(calls) == 1 else sampling.model_copy(
            update={"seed": None if sampling.seed is None else mix(sampling.seed, k)})
        with torch.no_grad():
            outs = run.engine.generate([prompts[i] for i in idx], call_sampling, n=n, budget=engine_budget,
                                       fmt=run.fmt, prompt_ids=[prompt_ids[i] for i in idx])
        for j, c in enumerate(outs):  # prompt-major within the call
            c.prompt_index = idx[j // n]
            comps[c.prompt_index * n + j % n] = c
    rollouts = []
    for c in comps:
        problem, budget = problems[c.prompt_index], budgets[c.prompt_index]
        score = run.task.score(problem, c.text)
        reward = float(score.reward) if budget is None else cur.shape(score.reward, c.thinking_tokens, budget)
        if cfg.truncated == "soft":
            reward += float(L.overlong_penalty(torch.tensor([sum(c.sampled)]), sampling.max_tokens, cfg.overlong_cache)[0])
        rollouts.append(Rollout(problem, prompt_ids[c.prompt_index], c, score, reward, c.finish_reason == "length",
                                budget))
    return rollouts


def rollout(run, step: int) -> tuple[list[Rollout], list[Rollout]]:
    """(all rollouts of this step, the ones to train on). Dynamic sampling (DAPO) keeps only the groups whose
    accuracy lies strictly between 0 and 1 and samples further prompts, up to `max_refills` extra rounds, until
    the batch is full. It filters on correctness, not on the shaped reward: a group that differs only in format
    credit teaches the format, not the task."""
    cfg = run.cfg
    generated, kept = [], []
    for round_ in range(1 + (cfg.max_refills if cfg.dynamic_sampling else 0)):
        sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                            max_tokens=cfg.max_response_tokens, seed=mix(cfg.seed, step, round_))
        problems = next_problems(run, cfg.prompts_per_step)
        budgets = (cfg.budget_curriculum.draw(np.random.default_rng([cfg.seed, step, round_, 11]), len(problems))
                   if cfg.budget_curriculum else None)
        batch = generate(run, problems, cfg.n, sampling, budgets)
        generated += batch
        groups = [batch[i:i + cfg.n] for i in range(0, len(batch), cfg.n)]
        if cfg.dynamic_sampling:
            groups = [g for g in groups if len({r.score.correct for r in g}) > 1]
        kept += [r for g in groups for r in g]
        if len(kept) >= cfg.prompts_per_step * cfg.n:
            break
    return generated, kept[:cfg.prompts_per_step * cfg.n]


def mix(*xs: int) -> int:
    """One seed from several (the step, the round, the call), independent for each combination."""
    return int(np.random.SeedSequence(list(xs)).generate_state(1)[0])
