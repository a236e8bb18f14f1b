"""Distillation fine-tuning (s1's SFT): teach a model to write a teacher's thinking and answer.

    budgetthink sft --config recipes/tiny-s1-sft.yaml --model runs/tiny-small --data selected.jsonl --out runs/sft
    budgetthink sft --config recipes/tiny-s1-sft.yaml --model runs/tiny-small --data selected.jsonl --out runs/sft --resume
    accelerate launch --multi_gpu --num_processes 2 -m budgetthink sft --config ... --out DIR   # 2 CPU processes (gloo)
    accelerate launch --config_file recipes/accelerate/fsdp.yaml -m budgetthink sft --config recipes/s1-qwen2.5-32b.yaml \
        --data s1K.jsonl --out runs/s1-32b                                                    # s1 on 16 GPUs

Data: JSONL traces as `distill` / `curate` write them; each line needs `problem` (a Problem dict with its
`prompt`), `thinking` and `answer` (lines whose `error` is set are skipped and counted). Each is rendered in
the think format through `formats.Prompter` (`prompt: auto`: the tokenizer's chat template then the opening
delimiter when the model has a template, as s1 did with Qwen2.5-Instruct; else fmt.prompt(problem.prompt)), stating the line's `budget` when it
has one (a trace written under a thinking budget, as `distill --stated-budgets` writes); target =
fmt.completion(thinking, answer) + end-of-text. Prompt and target are tokenized separately (as a generation
engine sees them) and the loss covers the target tokens only: prompt and padding labels are -100.

Batches: `batch_size` examples per optimizer step in total over all processes, a fixed plan per seed: each
epoch a fresh permutation, cut into windows of 16 batches whose examples are sorted by length before being cut
into batches, batch order shuffled (so a batch holds examples of similar length and padding costs little).
Every process builds the same plan, takes every W-th example of the step's batch (sorted by length), and runs
it in micro-batches of `micro_batch_size`; every process runs the same number of micro-batches (a process with
fewer pads with zero-weight ones) so sharded (FSDP / ZeRO-3) forwards stay in step. Rows are right-padded and
attention is causal, so no token ever attends to padding or to another example; no attention mask is needed.

Loss: the sum of the negative log-likelihoods of the step's target tokens over all processes, divided by the
step's total count of target tokens (every process knows it: the plan is shared). Each process back-propagates
its own sum times W / count, which data-parallel gradient averaging turns into the global mean: 1 and 2
processes at the same global batch give the same loss and update.

max_seq_len: an example longer than it is cut to its first max_seq_len tokens (`truncation: truncate`, what
s1's TRL setup did; it loses the end of the trace and its answer) or left out (`truncation: drop`). The count
is printed and written to summary.json (s1: a 4,096 limit cut 74% of s1K and cost 20 points on AIME24).

Outputs in OUT: config.yaml; metrics.jsonl (per step: loss, lr, grad_norm, tokens_per_s, ...);
checkpoints/step_N (atomic: model/, state.pt with optimizer, scheduler, RNG, step; `--resume` continues from
the last, and the data plan is a function of the step, so it picks up the exact next batch); model/ (the final
model, an ordinary model directory with its tokenizer, LoRA merged, and a model card README.md); metrics.png
(loss, lr, grad norm); summary.json; ledger.jsonl; tracking/ (with `report_to`, see tracking.py).

Limitations: with FSDP or DeepSpeed the checkpoint holds the full model and the schedule but not the sharded
optimizer moments (a resume restarts them, with a warning); DeepSpeed needs one micro-batch per process per
step (its engine steps inside backward) and its own `gradient_clipping` setting.
"""

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from budgetthink import model_card, tracking
from budgetthink.config import Config, dump_config
from budgetthink.errors import UserError
from budgetthink.jsonl import atomic_write_json, iter_jsonl
from budgetthink.train.common import (
    LoRA,
    MetricsLog,
    Optim,
    check_finite,
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

IGNORE = -100  # label of a token that carries no loss
LENGTH_WINDOW = 16  # batches per window whose examples are sorted by length together


# --- configuration --------------------------------------------------------------------------------------------
class SFTConfig(Config):
    """Settings of `budgetthink sft`. Shared keys (model, format, seed, max_steps) mean the same as in every
    other recipe. The defaults are s1's for real models; the tiny recipe sets its own."""

    model: str = Field(description="model directory (or hub id on a machine that has it) to fine-tune")
    data: str | None = Field(None, description="JSONL of traces (distill/curate output); usually given by --data")
    format: Literal["tinyzero", "s1", "r1"] = Field("s1", description="think format the traces are rendered in")
    prompt: Literal["auto", "chat", "raw"] = Field(
        "auto", description="prompt style (formats.Prompter): auto = the tokenizer's chat template when it has one "
                            "(instruct models, as s1 did), else the plain prompt; chat insists on it; raw never uses it")
    seed: int = Field(0, description="seeds the data order and LoRA initialisation")
    epochs: int = Field(5, ge=1, description="passes over the data (s1: 5)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (None: all epochs); "
                                                          "the schedule spans the steps actually run")
    batch_size: int = Field(16, ge=1, description="examples per optimizer step, over all processes (s1: 16)")
    micro_batch_size: int | None = Field(None, ge=1, description="examples per forward/backward in each process "
                                                                 "(None: the process's whole share of the batch)")
    max_seq_len: int = Field(32768, ge=2, description="longest prompt + target in tokens (s1: 32,768)")
    truncation: Literal["truncate", "drop"] = Field(
        "truncate", description="an example longer than max_seq_len: keep its first max_seq_len tokens, or drop it")
    group_by_length: bool = Field(True, description="batch examples of similar length (less padding); "
                                                    "False: plain random batches")
    lr: float = Field(1e-5, gt=0, description="peak learning rate (s1: 1e-5)")
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="share of the steps of linear warm-up from 0, "
                                                              "then cosine decay to 0 (s1: 5%)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas (s1: 0.9, 0.95)")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW decoupled weight decay (s1: 1e-4)")
    grad_clip: float | None = Field(1.0, gt=0, description="clip the global gradient norm to this (None: no clipping)")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="compute dtype: bfloat16 (autocast over fp32 weights and optimizer) or float32; "
                            "auto: bfloat16 on a GPU that has it and on CPUs with native bf16 (AVX512-BF16 "
                            "or AMX), float32 on other CPUs (bf16 matmuls are emulated there, ~100x slower)")
    attn_implementation: str = Field("auto", description="attention kernel: auto (eager for bf16 on a CPU, whose "
                                                         "sdpa backward is slow there; else sdpa), eager, sdpa, "
                                                         "flash_attention_2")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    lora: LoRA | None = Field(None, description="train LoRA adapters instead of all weights (merged at the end)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu")
    log_every: int = Field(10, ge=1, description="print a progress line to stderr every this many steps "
                                                 "(metrics.jsonl gets every step)")
    save_every: int = Field(100, ge=1, description="checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept on disk")
    report_to: tracking.ReportTo = Field(default_factory=list, description=tracking.REPORT_TO)
    stage: Literal["sft"] = Field("sft", description="the recipe's kind, for `budgetthink estimate`; always sft")
    train_tokens: float | None = Field(None, gt=0, description="tokens in one epoch of the data; read only by "
                                                               "`budgetthink estimate` (s1K: 4.7M), ignored here")

    @model_validator(mode="after")
    def _check(self):
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise ValueError(f"micro_batch_size ({self.micro_batch_size}) is above batch_size ({self.batch_size})")
        return self


# --- data: render, tokenize, truncate -------------------------------------------------------------------------
@dataclass
class Example:
    id: str
    ids: list[int]  # prompt then target tokens (after truncation)
    n_prompt: int  # how many of `ids` are prompt (no loss)


def render(record: dict, prompter) -> tuple[str, str]:
    """(prompt text, target text) of a trace line; the target ends in the tokenizer's end-of-text."""
    text = prompter.text(record["problem"]["prompt"], record.get("budget"))  # a trace's stated budget, if any
    return text, prompter.fmt.completion(record["thinking"], record["answer"]) + prompter.tokenizer.eos_token


def labels_of(ex: Example) -> list[int]:
    """-100 on the prompt, the token itself on the target."""
    return [IGNORE] * ex.n_prompt + ex.ids[ex.n_prompt:]


def load_examples(path: str | Path, tokenizer, fmt, cfg: SFTConfig) -> tuple[list[Example], dict]:
    """Tokenized examples of a trace file and what happened to them (counts for summary.json)."""
    from budgetthink.formats import Prompter

    stats = {"lines": 0, "teacher_errors": 0, "truncated": 0, "dropped_too_long": 0, "longest_tokens": 0}
    examples, prompter = [], Prompter(fmt, tokenizer, cfg.prompt)
    for i, r in enumerate(iter_jsonl(path), start=1):
        stats["lines"] += 1
        if r.get("error"):
            stats["teacher_errors"] += 1
            continue
        problem = r.get("problem")
        if (not isinstance(problem, dict) or not isinstance(problem.get("prompt"), str)
                or not isinstance(r.get("thinking"), str) or not isinstance(r.get("answer"), str)):
            raise UserError(f"{path}:{i}: a trace line needs `problem` (with `prompt`), `thinking` and `answer`; "
                            "write traces with `budgetthink distill` / `curate`")
        prompt, target = render(r, prompter)
        p = prompter.ids(prompt)
        t = tokenizer(target, add_special_tokens=False)["input_ids"]
        ids = p + t
        stats["longest_tokens"] = max(stats["longest_tokens"], len(ids))
        if len(ids) > cfg.max_seq_len:
            if cfg.truncation == "drop" or len(p) >= cfg.max_seq_len:  # no target token would be left
                stats["dropped_too_long"] += 1
                continue
            stats["truncated"] += 1
            ids = ids[:cfg.max_seq_len]
        examples.append(Example(id=str(r.get("id", i)), ids=ids, n_prompt=len(p)))
    if not examples:
        raise UserError(f"{path}: no usable trace (of {stats['lines']} lines: {stats['teacher_errors']} teacher errors, "
                        f"{stats['dropped_too_long']} longer than max_seq_len={cfg.max_seq_len}); check the file")
    stats["examples"] = len(examples)
    stats["target_tokens"] = sum(len(e.ids) - e.n_prompt for e in examples)
    stats["tokens"] = sum(len(e.ids) for e in examples)
    return examples, stats


# --- the batch plan (the same on every process) ----------------------------------------------------------------
def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch; the last may be smaller."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    if group_by_length:
        w = LENGTH_WINDOW * batch_size
        order = [i for s in range(0, len(order), w) for i in sorted(order[s:s + w], key=lambda i: -lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[k] for k in rng.permutation(len(batches))]
    return batches


def batch_of_step(step: int, lengths: list[int], cfg: SFTConfig, cache: dict) -> list[int]:
    """The global batch of a (1-based) step: a pure function of the seed and the step, so resuming is exact."""
    per_epoch = math.ceil(len(lengths) / cfg.batch_size)
    epoch, k = divmod(step - 1, per_epoch)
    if epoch not in cache:
        cache.clear()
        cache[epoch] = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length)
    return cache[epoch][k]


def layout(batch: list[int], lengths: list[int], world: int, micro: int | None) -> list[list[list[int]]]:
    """Per process, its micro-batches (index lists); every process gets the same number (empty = zero weight)."""
    by_len = sorted(batch, key=lambda i: (-lengths[i], i))
    shares = [by_len[r::world] for r in range(world)]  # every W-th: balanced tokens
    size = micro or math.ceil(len(batch) / world)
    per = [[share[j:j + size] for j in range(0, len(share), size)] for share in shares]
    n = max(len(p) for p in per)
    return [p + [[]] * (n - len(p)) for p in per]


def target_count(ex: Example) -> int:
    """Tokens that carry loss: target tokens with a token before them (all of them, as prompts are never empty)."""
    return len(ex.ids) - max(ex.n_prompt, 1)


def collate(examples: list[Example], idx: list[int], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [b, L] right-padded with pad_id, labels [b, L] (-100 on prompt and padding)."""
    L = max(len(examples[i].ids) for i in idx)
    ids = torch.full((len(idx), L), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), L), IGNORE, dtype=torch.long)
    for row, i in enumerate(idx):
        ex = examples[i]
        ids[row, :len(ex.ids)] = torch.tensor(ex.ids)
        labels[row, :len(ex.ids)] = torch.tensor(labels_of(ex))
    return ids.to(device), labels.to(device)


# --- loss -------------------------------------------------------------------------------------------------------
def nll_sum(model, ids: torch.Tensor, labels: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Sum over target tokens of -log p(token | everything before it in its own row); fp32 scalar."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids, use_cache=False).logits  # [b, L, V]
    target = labels[:, 1:]  # [b, L-1]: token t+1 is predicted at position t
    keep = target != IGNORE
    picked = logits[:, :-1][keep].float()  # [n, V]: only positions that carry loss are upcast
    return F.cross_entropy(picked, target[keep], reduction="sum")


# --- setup ------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    cfg: SFTConfig
    out: Path
    acc: object  # accelerate.Accelerator
    model: object
    tokenizer: object
    optimizer: object
    scheduler: object
    examples: list
    lengths: list
    stats: dict
    total_steps: int
    bf16: bool
    log: MetricsLog
    step: int = 0
    last_ckpt: Path | None = None


def use_bf16(dtype: str, cuda: bool) -> bool:
    """Whether to autocast to bf16: as asked, or (auto) where the hardware computes bf16 natively."""
    if dtype != "auto":
        return dtype == "bfloat16"
    if cuda:
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def setup(cfg: SFTConfig, out: Path, resume: bool) -> Run:
    from accelerate import Accelerator

    from budgetthink.formats import get_format

    if cfg.data is None:
        raise UserError("no training data; pass --data traces.jsonl (or set data: in the config)")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if not resume and (latest_checkpoint(out) or (out / "metrics.jsonl").exists()):  # checked by every process
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    ckpt, state = resume_point(out) if resume else (None, None)  # the newest intact checkpoint
    acc = Accelerator(cpu=not cuda)
    sharded = acc.distributed_type.name in ("FSDP", "DEEPSPEED")
    if sharded and cfg.lora:
        raise UserError("LoRA is supported on one process or plain data parallel (DDP), not with FSDP/DeepSpeed; "
                        "drop the lora block or launch without an FSDP/DeepSpeed config")
    if acc.distributed_type.name == "DEEPSPEED" and cfg.micro_batch_size is not None and \
            cfg.micro_batch_size < math.ceil(cfg.batch_size / acc.num_processes):
        raise UserError("with DeepSpeed set micro_batch_size to batch_size / processes or leave it unset "
                        "(its engine steps inside backward: one micro-batch per step)")
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    bf16 = use_bf16(cfg.dtype, cuda)
    attn = cfg.attn_implementation if cfg.attn_implementation != "auto" else "eager" if bf16 and not cuda else "sdpa"
    model, tokenizer = load_model(cfg.model, ckpt, cfg.lora, cfg.gradient_checkpointing, dtype=torch.float32,
                                  attn_implementation=attn, hint="pass --model DIR with a model directory (build one "
                                  "with `budgetthink tiny --out DIR`)")
    examples, stats = load_examples(cfg.data, tokenizer, get_format(cfg.format), cfg)
    lengths = [len(e.ids) for e in examples]
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    optim = Optim(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, warmup_steps=math.ceil(cfg.warmup_ratio * total),
                  schedule="cosine", min_lr_ratio=0.0, grad_clip=cfg.grad_clip)
    optimizer = make_optimizer(model, optim)
    model, optimizer = acc.prepare(model, optimizer)
    scheduler = make_scheduler(optimizer, optim, total)  # stepped by hand once per step (not prepared)
    run = Run(cfg=cfg, out=out, acc=acc, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
              examples=examples, lengths=lengths, stats={**stats, "steps_per_epoch": per_epoch, "total_steps": total},
              total_steps=total, bf16=bf16, log=MetricsLog(out / "metrics.jsonl"))
    if ckpt:
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        else:
            say(f"warning: {ckpt} holds no optimizer state (sharded run): AdamW moments restart")
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        run.step, run.last_ckpt = state["step"], ckpt
    elif resume and acc.is_main_process:
        say(f"no checkpoint in {out}: starting from step 0")
    if resume and acc.is_main_process:
        rewind_logs(out, run.step if ckpt else None)  # each log continues exactly once
    if acc.is_main_process:
        dump_config(cfg, out / "config.yaml")
        cut = (f"{stats['truncated']} truncated to their first {cfg.max_seq_len} tokens" if cfg.truncation == "truncate"
               else "none truncated")
        say(f"data: {stats['examples']} examples from {stats['lines']} lines ({stats['target_tokens']} target tokens); "
            f"longer than max_seq_len={cfg.max_seq_len}: {cut}, {stats['dropped_too_long']} dropped; longest "
            f"{stats['longest_tokens']} tokens; {total} steps of {cfg.batch_size} on {acc.num_processes} process(es)")
        if stats["truncated"] + stats["dropped_too_long"]:
            share = (stats["truncated"] + stats["dropped_too_long"]) / max(stats["lines"] - stats["teacher_errors"], 1)
            say(f"warning: max_seq_len={cfg.max_seq_len} cuts {share:.0%} of the traces (s1 lost 20 points on "
                "AIME24 when 4,096 cut 74%); raise max_seq_len if memory allows")
    acc.wait_for_everyone()
    return run


# --- checkpoints ------------------------------------------------------------------------------------------------
class _Gathered:
    """The unwrapped model with a full state dict gathered from its shards (FSDP / ZeRO-3)."""

    def __init__(self, model, state_dict):
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, path):
        self.model.save_pretrained(path, state_dict=self.state_dict)


def _savable(run: Run):
    acc = run.acc
    sharded = acc.distributed_type.name in ("FSDP", "DEEPSPEED")
    model = acc.unwrap_model(run.model)
    return (_Gathered(model, acc.get_state_dict(run.model)) if sharded else model), sharded  # collective when sharded


def checkpoint(run: Run) -> None:
    model, sharded = _savable(run)
    if run.acc.is_main_process:
        state = {"scheduler": run.scheduler.state_dict(), "rng": rng_state()}
        if not sharded:
            state["optimizer"] = run.optimizer.state_dict()
        run.last_ckpt = save_checkpoint(run.out, run.step, model, run.tokenizer, state, keep=run.cfg.keep_checkpoints,
                                        stage="sft")
    run.acc.wait_for_everyone()


def finish(run: Run) -> None:
    """The final model in OUT/model (an ordinary model directory, LoRA merged), the plot and summary.json."""
    model, _ = _savable(run)
    if run.acc.is_main_process:
        if run.cfg.lora:  # never sharded (refused in setup)
            model = model.merge_and_unload()
        save_model_dir(model, run.tokenizer, run.out / "model")
        plot_metrics(run.log.read(), ["loss", "lr", "grad_norm", "tokens_per_s"], run.out / "metrics.png",
                     title=f"sft {Path(run.cfg.model).name}")
    run.acc.wait_for_everyone()


# --- one step ---------------------------------------------------------------------------------------------------
def train_step(run: Run, step: int, cache: dict) -> dict:
    """Forward/backward the step's batch on every process, clip, update; the step's metrics."""
    acc, world = run.acc, run.acc.num_processes
    batch = batch_of_step(step, run.lengths, run.cfg, cache)
    plan = layout(batch, run.lengths, world, run.cfg.micro_batch_size)  # [process][micro] -> indices
    n_target = sum(target_count(run.examples[i]) for i in batch)  # the same on every process
    mine = plan[acc.process_index]
    run.model.train()
    local = torch.zeros((), dtype=torch.float64, device=acc.device)
    for k, idx in enumerate(mine):
        weight = 1.0
        if not idx:  # this process has no example left: a zero-weight pass keeps collectives in step
            idx, weight = batch[:1], 0.0
        ids, labels = collate(run.examples, idx, run.tokenizer.pad_token_id, acc.device)
        sync = k == len(mine) - 1
        with nullcontext() if sync else acc.no_sync(run.model):
            s = nll_sum(run.model, ids, labels, run.bf16) * weight
            acc.backward(s * (world / n_target))  # gradient averaging over W processes gives sum / n_target
        local += s.detach().double()
    total = acc.reduce(local, reduction="sum") if world > 1 else local
    loss = float(total) / n_target
    grad_norm = acc.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip or float("inf"))
    grad_norm = float(grad_norm) if grad_norm is not None else None
    check_finite(step, run.last_ckpt, loss=loss, grad_norm=grad_norm)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    tokens = sum(len(run.examples[i].ids) for i in batch)
    padded = sum(len(mb) * max(run.lengths[i] for i in mb) for p in plan for mb in p if mb)
    return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "examples": len(batch), "target_tokens": n_target,
            "tokens": tokens, "padded_tokens": padded}


# --- the loop -------------------------------------------------------------------------------------------------------
def train(cfg: SFTConfig, out: Path, resume: bool = False) -> dict:
    """Fine-tune (or resume) into `out`; returns the summary (also in OUT/summary.json)."""
    from tqdm import tqdm

    from budgetthink.ledger import stage_ledger

    out = Path(out)
    with stage_ledger(out, stage="sft", config=cfg) as entry:
        run = setup(cfg, out, resume)
        is_main = run.acc.is_main_process
        tracker = tracking.start(cfg.report_to if is_main else [], out, stage="sft", config=cfg, resume_step=run.step)
        cache: dict = {}
        bar = tqdm(total=run.total_steps, initial=run.step, desc="sft", file=sys.stderr, dynamic_ncols=True,
                   disable=not is_main)
        t_start, trained = time.perf_counter(), 0
        for step in range(run.step + 1, run.total_steps + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            m = train_step(run, step, cache)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            run.step = step
            trained += m["tokens"]
            m = {"step": step, "epoch": (step - 1) // run.stats["steps_per_epoch"] + 1, **m, "step_s": dt, "cpu_s": cpu,
                 "tokens_per_s": m["tokens"] / dt, "padding_share": 1 - m["tokens"] / m["padded_tokens"]}
            entry.add(tokens_trained=m["tokens"])
            if is_main:
                run.log.append(m)
                tracker.log(m, step)
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
                if step % cfg.log_every == 0:
                    say(f"step {step}/{run.total_steps} loss {m['loss']:.4f} lr {m['lr']:.2e} "
                        f"grad_norm {m['grad_norm']:.3f} {m['tokens_per_s']:.0f} tok/s")
            if step % cfg.save_every == 0 or step == run.total_steps:
                checkpoint(run)
                entry.checkpoint()
        bar.close()
        finish(run)
        records = run.log.read() if is_main else []
        summary = {**run.stats, "steps": run.step, "truncation": cfg.truncation, "max_seq_len": cfg.max_seq_len,
                   "processes": run.acc.num_processes, "dtype": "bfloat16" if run.bf16 else "float32",
                   "final_loss": records[-1]["loss"] if records else None,
                   "tokens_trained_this_run": trained, "wall_s": time.perf_counter() - t_start,
                   "model_dir": str(out / "model")}
        if is_main:
            atomic_write_json(out / "summary.json", summary)
        tracker.finish()
    if is_main:  # after the ledger line, so the card carries the bill
        model_card.write(out / "model", out, stage="sft")
    return summary
