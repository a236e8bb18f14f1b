"""The embedded default model: a character-level tokenizer and a tiny Qwen2, built and pretrained locally.

    budgetthink tiny --out runs/tiny-small --preset small [--seed 0]

    report = build(Path("runs/tiny-small"), preset="small", seed=0)   # the same from Python
    path = cached_build("test", Path(".cache/tests"))                  # reuse a build with the same settings

No model can be downloaded here or on an air-gapped box, so budgetthink builds its own default. The
result is an ordinary transformers model directory (config.json, model.safetensors, tokenizer.json,
generation_config.json, plus build_report.json and a model card, README.md):
`AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load it, and so can vLLM or TRL.

The tokenizer is a byte-level BPE with *no merges* over printable ASCII and newline: one token per
character. It is written this way (rather than as a WordLevel tokenizer) because transformers 5 loads
every qwen2 directory through Qwen2Tokenizer whatever tokenizer_config.json says, which rebuilds a
byte-level pipeline; a byte-level vocabulary survives that round trip exactly, spaces and newlines included.

The pretraining corpus is drawn from the tasks, so that the base model knows the format and the arithmetic
but has *not* been taught to solve Countdown (a base that RL and budget forcing can improve):

- Countdown attempts in the tinyzero format (prompt, `<think>`, search lines, `</think>`, `<answer>..</answer>`).
  An attempt follows the solver's trace line by line but, before each line that has not found the target
  yet, gives up with probability `give_up[k]` and answers with a guess (a random expression over the
  numbers). Attempts mostly search on for two lines and mostly give up before the fourth, so the greedy
  base model searches three lines and then guesses: right when an early line hits the target and it
  notices (`==T`), wrong otherwise. Sampled, it sometimes searches longer, and those longer searches are
  what RL can reward and what a larger thinking budget buys. A few attempts, instead of giving up, write the extension
  string ("Wait") and go on searching, so that budget forcing's extensions mean something to this model.
- A few attempts with empty thinking and a guess.
- Arithmetic drills: lines of one-step facts (`63*5=315`) and stepwise evaluations (`(9*5)+7=45+7=52`).

Training is a plain loop: AdamW, linear warmup then cosine decay, one document per row, rows of similar
length batched together, deterministic for a given seed and machine. It runs in float32 unless the CPU has
AMX, where bf16 autocast with the eager attention kernel is 1.5x faster (tiny-feasibility.md); on a CPU
without native bf16 (AVX2 only, as on the 2-core machine this was tuned on) bf16 is 8-10x *slower*. The build ends with a greedy
check on held-out Countdown problems (the test split, another seed) through the torch engine and writes
everything it measured to build_report.json.
"""

import hashlib
import json
import math
import os
import platform
import random
import shutil
import string
import sys
import time
from pathlib import Path

from pydantic import BaseModel, Field
from tokenizers import AddedToken, Tokenizer, decoders, models
from tokenizers.pre_tokenizers import ByteLevel

from budgetthink import model_card, tracking
from budgetthink.errors import UserError

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>"]  # ids 0 and 1
ADDED_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]  # the tinyzero delimiters, one token each
CHARS = ["\n"] + [c for c in string.printable if c not in "\t\r\x0b\x0c\n"]  # 96 characters
PAD_ID, EOS_ID = 0, 1

# ---------------------------------------------------------------------------------------------------------
# tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (what ByteLevel uses)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_tokenizer():
    """A PreTrainedTokenizerFast with one token per character, pad and end-of-text specials, think tags."""
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for c in CHARS:
        vocab[b2u[ord(c)]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>",
                                   model_max_length=1024)


# ---------------------------------------------------------------------------------------------------------
# model shapes


class Preset(BaseModel):
    """Shape of a tiny Qwen2."""

    hidden_size: int = Field(description="model width")
    num_hidden_layers: int = Field(description="transformer blocks")
    num_attention_heads: int = Field(description="query heads")
    num_key_value_heads: int = Field(description="key/value heads (grouped-query attention)")
    intermediate_size: int = Field(description="MLP width")
    max_position_embeddings: int = Field(1024, description="context length in characters")


PRESETS = {
    "test": Preset(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=192),  # ~105k parameters
    "small": Preset(hidden_size=192, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=3,
                    intermediate_size=576),  # ~3.6M parameters
}


def _preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise UserError(f"unknown tiny preset {preset!r}; use one of: {', '.join(PRESETS)}")
    return PRESETS[preset]


def init_model(preset: str | Preset, seed: int = 0):
    """(model, tokenizer): a randomly initialised Qwen2ForCausalLM of the preset's shape and the char tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=True, pad_token_id=PAD_ID,
                         bos_token_id=EOS_ID, eos_token_id=EOS_ID, rope_theta=10000.0, **_preset(preset).model_dump())
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config), tokenizer


# ---------------------------------------------------------------------------------------------------------
# build settings


class Schedule(BaseModel):
    """How a preset is pretrained and checked (corpus mix, optimisation, the final greedy check)."""

    steps: int = Field(description="optimizer steps; the corpus holds steps * batch_size documents")
    batch_size: int = Field(description="documents per step (rows of similar length are batched together)")
    lr: float = Field(description="peak learning rate")
    warmup_steps: int = Field(description="linear warmup from 0 to lr")
    min_lr_ratio: float = Field(0.1, description="cosine decay ends at lr * min_lr_ratio")
    weight_decay: float = Field(0.1, description="AdamW weight decay on matrices (not on norms)")
    grad_clip: float = Field(1.0, description="clip the global gradient norm to this")
    dtype: str = Field("auto", description="float32, bfloat16 (autocast), or auto: bfloat16 where the CPU has AMX")
    max_len: int = Field(640, description="documents are cut to this many tokens")
    train_problems: int = Field(7000, description="distinct Countdown problems (pretrain split) the attempts use")
    give_up: list[float] = Field([0.3, 0.3, 0.75], description="chance of giving up before search line k+1 (k = 1, 2, "
                                 "...) when the target is not found yet; the last value repeats")
    wait_share: float = Field(0.05, description="share of give-up points written as 'Wait' and searching on")
    empty_share: float = Field(0.04, description="share of Countdown attempts with empty thinking and a guess")
    arith_share: float = Field(0.1, description="share of documents that are arithmetic drills")
    eval_problems: int = Field(200, description="held-out Countdown problems in the final greedy check")
    eval_max_tokens: int = Field(400, description="new tokens allowed per problem in the greedy check")
    report_to: tracking.ReportTo = Field(default_factory=list, exclude=True,  # not a build setting: not in the cache key
                                         description=tracking.REPORT_TO)


SCHEDULES = {
    "test": Schedule(steps=400, batch_size=16, lr=3e-3, warmup_steps=20, train_problems=2000, eval_problems=32,
                     eval_max_tokens=200),
    "small": Schedule(steps=1040, batch_size=16, lr=2e-3, warmup_steps=60),
}

COUNTDOWN = {"template": "compact"}  # the task's defaults otherwise: the demo's Countdown distribution
FORMAT = "tinyzero"
EXTENSION = "Wait"  # what budget forcing appends by default (engine.Budget.extension_string)
TARGET = {"format_rate_min": 0.5, "accuracy_min": 0.02, "accuracy_max": 0.4}  # for the `small` base
EVAL_SEED_OFFSET = 1_000_003  # held-out problems: test split and a seed no training run uses
RECIPE_VERSION = 6  # bump when the corpus or the training loop changes, so cached builds are redone


# ---------------------------------------------------------------------------------------------------------
# corpus


def guess(numbers: list[int], rng: random.Random) -> str:
    """A random expression using each number once, shaped like the solver's answers: "(a op b) op c"."""
    nums = list(numbers)
    rng.shuffle(nums)
    expr = str(nums[0])
    for i, n in enumerate(nums[1:]):
        op = rng.choice("+-*+-*/")
        expr = f"{expr}{op}{n}" if i == 0 else f"({expr}){op}{n}"
    return expr


def countdown_attempt(problem, trace, fmt, rng: random.Random, s: Schedule) -> tuple[str, str]:
    """(kind, text) of one attempt at a problem: prompt + thinking + answer, where the thinking is the solver's
    trace, cut short by a guess (kind "give_up"), or whole ("solved"), or empty ("empty")."""
    if rng.random() < s.empty_share:
        return "empty", fmt.prompt(problem.prompt) + fmt.completion("", f"<answer>{guess(problem.answer['numbers'], rng)}</answer>")
    lines = trace.thinking.split("\n")
    search = lines[:-1]  # the solver's search lines; the target is found on the last one, lines[-1] re-checks it
    thinking = search[0]
    for k in range(1, len(search)):
        if rng.random() < s.give_up[min(k - 1, len(s.give_up) - 1)]:
            if rng.random() >= s.wait_share:
                answer = f"<answer>{guess(problem.answer['numbers'], rng)}</answer>"
                return "give_up", fmt.prompt(problem.prompt) + fmt.completion(thinking, answer)
            thinking += EXTENSION  # what budget forcing writes where the model would have stopped
        thinking += "\n" + search[k]
    thinking += "\n" + lines[-1]
    return "solved", fmt.prompt(problem.prompt) + fmt.completion(thinking, trace.answer)


def arithmetic_drill(rng: random.Random, facts: int = 12) -> str:
    """One line of arithmetic facts over the numbers a Countdown search meets, e.g. `63*5=315 (9*5)+7=45+7=52`."""
    out = []
    for _ in range(facts):
        a, b, c = rng.choice([rng.randint(1, 10), rng.randint(1, 100)]), rng.randint(1, 10), rng.randint(1, 10)
        op = rng.choice("+-*/")
        if op == "-" and a < b or op == "/" and (b < 2 or a % b):
            a, b = b, a
        if op == "/" and (b < 2 or a % b):
            op = "*"
        v = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        if rng.random() < 0.7:
            out.append(f"{a}{op}{b}={v}")
            continue
        op2 = rng.choice("+-*")
        w = {"+": v + c, "-": v - c, "*": v * c}[op2]
        out.append(f"({a}{op}{b}){op2}{c}={v}{op2}{c}={w}")
    return " ".join(out)


def build_corpus(seed: int, s: Schedule) -> tuple[list[str], dict]:
    """(documents, stats): steps * batch_size documents, deterministic for the seed."""
    from budgetthink.formats import get_format
    from budgetthink.tasks import get_task

    fmt = get_format(FORMAT)
    task = get_task("countdown", split="pretrain", **COUNTDOWN)
    problems = task.generate(s.train_problems, seed=seed)
    traces = [task.solve(p) for p in problems]
    rng = random.Random(f"tiny-corpus:{seed}")
    docs, kinds = [], {"solved": 0, "give_up": 0, "empty": 0, "arithmetic": 0}
    order: list[int] = []
    for _ in range(s.steps * s.batch_size):
        if rng.random() < s.arith_share:
            kind, text = "arithmetic", arithmetic_drill(rng)
        else:
            if not order:  # one pass over the problems in a fresh order, then another
                order = list(range(len(problems)))
                rng.shuffle(order)
            i = order.pop()
            kind, text = countdown_attempt(problems[i], traces[i], fmt, rng, s)
        kinds[kind] += 1
        docs.append(text)
    return docs, {"documents": len(docs), "kinds": kinds, "countdown_problems": len(problems)}


def batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Document indices grouped into batches of similar length (little padding), in a random order."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    out = []
    pool = 64 * batch_size
    for c in range(0, len(order), pool):
        chunk = sorted(order[c:c + pool], key=lambda i: lengths[i])
        out += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return out


# ---------------------------------------------------------------------------------------------------------
# pretraining


def train_dtype(s: Schedule) -> str:
    """The dtype training runs in: the schedule's, or for "auto" bfloat16 where the CPU has AMX, else float32."""
    import torch

    if s.dtype == "auto":
        return "bfloat16" if "AMX" in torch.backends.cpu.get_cpu_capability() else "float32"
    if s.dtype not in ("float32", "bfloat16"):
        raise UserError(f"tiny schedule dtype must be auto, float32 or bfloat16, not {s.dtype!r}")
    return s.dtype


def pretrain(model, tokenizer, docs: list[str], seed: int, s: Schedule, progress: bool = True,
             tracker: tracking.Tracker | None = None) -> dict:
    """Train `model` in place on `docs` (one document per row, end-of-text appended); returns measurements
    (and sends loss, lr, grad_norm and tokens of every step to `tracker`)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    bf16 = train_dtype(s) == "bfloat16"
    ids = [x[:s.max_len - 1] + [EOS_ID] for x in tokenizer(docs, add_special_tokens=False)["input_ids"]]
    plan = batches([len(x) for x in ids], s.batch_size, random.Random(f"tiny-batches:{seed}"))
    model.config._attn_implementation = "eager" if bf16 else "sdpa"  # the fastest kernel for each dtype here
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < s.warmup_steps:
            return s.lr * (step + 1) / s.warmup_steps
        t = (step - s.warmup_steps) / max(1, len(plan) - s.warmup_steps)
        return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    tokens, losses, t0, cpu0 = 0, [], time.time(), time.process_time()
    bar = tqdm(plan, desc="pretraining", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for step, rows in enumerate(bar):
        width = max(len(ids[i]) for i in rows)
        x = torch.full((len(rows), width), PAD_ID, dtype=torch.long)  # [B, T], right-padded
        for r, i in enumerate(rows):
            x[r, :len(ids[i])] = torch.tensor(ids[i])
        y = x[:, 1:].masked_fill(x[:, 1:] == PAD_ID, -100)  # [B, T-1] next-token targets, pads ignored
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=x).logits  # [B, T, V]
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        tokens += int((x != PAD_ID).sum())
        losses.append(loss.item())
        if tracker is not None:
            tracker.log({"loss": losses[-1], "lr": lr_at(step), "grad_norm": float(grad_norm), "tokens": tokens},
                        step + 1)
        if step % 10 == 0 or step == len(plan) - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}",
                            tok_s=f"{tokens / (time.time() - t0):.0f}")
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    model.eval()
    model.config._attn_implementation = "sdpa"
    tail = losses[-max(1, len(losses) // 20):]
    return {"steps": len(plan), "tokens": tokens, "dtype": train_dtype(s), "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1), "tokens_per_s": round(tokens / wall),
            "first_loss": round(losses[0], 4), "final_loss": round(sum(tail) / len(tail), 4)}


# ---------------------------------------------------------------------------------------------------------
# the greedy check


def greedy_check(model_dir: Path, seed: int, s: Schedule) -> dict:
    """Greedy decoding on held-out Countdown problems through the torch engine: format rate and accuracy."""
    from budgetthink.engine import Sampling, load_engine
    from budgetthink.formats import get_format
    from budgetthink.tasks import get_task

    fmt = get_format(FORMAT)
    task = get_task("countdown", split="test", **COUNTDOWN)
    problems = task.generate(s.eval_problems, seed=seed + EVAL_SEED_OFFSET)
    t0 = time.time()
    engine = load_engine(model_dir, device="cpu")
    outs = engine.generate([fmt.prompt(p.prompt) for p in problems],
                           Sampling(temperature=0.0, max_tokens=s.eval_max_tokens), fmt=fmt)
    wall = time.time() - t0
    scores = [task.score(p, o.text) for p, o in zip(problems, outs)]
    n = len(problems)
    closed = [fmt.think_close in o.text for o in outs]
    new_tokens = sum(len(o.token_ids) for o in outs)
    return {
        "problems": n,
        "format_rate": round(sum(sc.reward >= task.format_reward for sc in scores) / n, 4),
        "accuracy": round(sum(sc.correct for sc in scores) / n, 4),
        "mean_reward": round(sum(sc.reward for sc in scores) / n, 4),
        "thinking_closed_rate": round(sum(closed) / n, 4),
        "mean_thinking_chars": round(sum(len(fmt.split(o.text)[0]) for o in outs) / n, 1),
        "finish_reasons": {r: sum(o.finish_reason == r for o in outs) for r in sorted({o.finish_reason for o in outs})},
        "wall_s": round(wall, 1),
        "tokens_per_s": round(new_tokens / wall),
        "examples": [{"prompt": fmt.prompt(p.prompt), "completion": o.text, "reward": sc.reward}
                     for p, o, sc in list(zip(problems, outs, scores))[:6]],
    }


# ---------------------------------------------------------------------------------------------------------
# build


def settings(preset: str | Preset, seed: int, schedule: Schedule | None = None) -> dict:
    """Everything a build depends on: shape, schedule, seed, dtype, RECIPE_VERSION (the corpus and training
    code here) and the source of the Countdown task and the formats (what the corpus is made of)."""
    from budgetthink import formats
    from budgetthink.tasks import countdown

    name = preset if isinstance(preset, str) else "custom"
    schedule = schedule or SCHEDULES.get(name) or SCHEDULES["small"]
    code = hashlib.sha256()
    for module in (countdown, formats):
        code.update(Path(module.__file__).read_bytes())
    return {"preset": name, "shape": _preset(preset).model_dump(), "seed": seed, "schedule": schedule.model_dump(),
            "dtype": train_dtype(schedule), "recipe_version": RECIPE_VERSION,
            "countdown": COUNTDOWN, "format": FORMAT, "code_sha256": code.hexdigest()}


def _build(out: Path, preset: str | Preset = "test", seed: int = 0, schedule: Schedule | None = None,
          progress: bool = True) -> dict:
    """Build, pretrain, save and check a tiny model; returns the build report (also in OUT/build_report.json).

    The directory is written under a temporary name beside `out` and renamed into place at the end, so `out`
    is either absent, the previous build, or a complete new build. An existing `out` must be an earlier
    build (it has build_report.json) or empty.
    """
    import torch

    from budgetthink.jsonl import atomic_write_json

    out = Path(out)
    if (out.exists() and (not out.is_dir() or any(p.name != "ledger.jsonl" for p in out.iterdir()))
            and not (out / "build_report.json").is_file()):
        raise UserError(f"{out} exists and is not a tiny model build; choose another --out or remove it")
    config = settings(preset, seed, schedule)
    s = Schedule(**config["schedule"], report_to=schedule.report_to if schedule else [])
    t_start = time.time()
    torch.manual_seed(seed)
    model, tokenizer = init_model(preset, seed)
    params = sum(p.numel() for p in model.parameters())
    docs, corpus = build_corpus(seed, s)
    corpus["characters"] = sum(map(len, docs))
    corpus["sample"] = docs[:3]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tracker = tracking.start(s.report_to, tmp, stage="tiny", config=config, name=out.name)  # logs end up in OUT
    try:
        train = pretrain(model, tokenizer, docs, seed, s, progress, tracker)
        model.generation_config.eos_token_id = EOS_ID
        model.generation_config.pad_token_id = PAD_ID
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        weights = hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest()
        check = greedy_check(tmp, seed, s)
        tracker.log({f"check_{k}": v for k, v in check.items()}, train["steps"])  # the held-out greedy check
        tracker.finish()  # before the rename
        target = TARGET if config["preset"] == "small" else None  # the test preset only has to run
        report = {
            **config,
            "parameters": params,
            "corpus": corpus,
            "train": train,
            "check": check,
            "target": target,
            "target_met": None if target is None else (
                check["format_rate"] >= target["format_rate_min"]
                and target["accuracy_min"] <= check["accuracy"] <= target["accuracy_max"]),
            "weights_sha256": weights,
            "wall_s": round(time.time() - t_start, 1),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "torch": torch.__version__, "python": platform.python_version()},
        }
        atomic_write_json(tmp / "build_report.json", report)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def build(out: Path, preset: str | Preset = "test", seed: int = 0, schedule: Schedule | None = None,
          progress: bool = True) -> dict:
    """`_build`, recorded as the `tiny` stage in OUT/ledger.jsonl (the base model's own line on every bill)."""
    from budgetthink.ledger import stage_ledger

    with stage_ledger(out, stage="tiny", config=settings(preset, seed, schedule)) as entry:
        report = _build(out, preset, seed, schedule, progress)
        entry.add(tokens_trained=report["train"]["tokens"])
    model_card.write(out, out, stage="tiny")  # after the ledger line, so the card carries the bill
    return report


def summary(report: dict) -> str:
    """One line a person reads at the end of a build."""
    c, t = report["check"], report["train"]
    return (f"tiny {report['preset']} (seed {report['seed']}, {report['parameters'] / 1e6:.2f}M params): "
            f"greedy on {c['problems']} held-out Countdown problems: format {c['format_rate']:.0%}, "
            f"correct {c['accuracy']:.1%}, thinking closed {c['thinking_closed_rate']:.0%}; "
            f"pretrained {t['steps']} steps, {t['tokens'] / 1e6:.2f}M tokens, {t['tokens_per_s']} tok/s; "
            f"built in {report['wall_s']:.0f} s" + ("" if report["target"] is None else
                                                       f"; target {'met' if report['target_met'] else 'NOT met'}"))


def cached_build(preset: str = "test", cache_dir: Path = Path(".cache/tiny"), seed: int = 0,
                 progress: bool = False) -> Path:
    """The directory of a build with these settings under `cache_dir`, building it first if there is none.

    Builds are keyed by a hash of their settings (see `settings`) without the source hash: a changed shape,
    schedule, seed or RECIPE_VERSION is rebuilt, while an edit to the task or format code that leaves the corpus
    alone (a lint fix) does not throw away minutes of pretraining; bump RECIPE_VERSION when the corpus changes.
    The source hash stays in build_report.json. A lock file keeps concurrent callers from building the same
    model twice.
    """
    import fcntl

    keyed = {k: v for k, v in settings(preset, seed).items() if k != "code_sha256"}
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir)
    out = cache_dir / f"tiny-{preset}-s{seed}-{key}"
    if (out / "build_report.json").is_file():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".tiny-{preset}-s{seed}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "build_report.json").is_file():
            build(out, preset, seed, progress=progress)
    return out
