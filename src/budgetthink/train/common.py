"""Pieces every training loop here shares (RL and SFT): model loading, optimizer and schedule, checkpoints that
survive a kill, a metrics log, plots, a guard against NaN/inf, and optional LoRA.

    model, tokenizer = load_model(cfg.model, ckpt, cfg.lora, cfg.gradient_checkpointing, hint, dtype=torch.float32)
    opt = make_optimizer(model, cfg.optim);  sched = make_scheduler(opt, cfg.optim, total_steps)
    ckpt = save_checkpoint(out, step, model, tokenizer, {"optimizer": opt.state_dict(), ...})
    ckpt, state = resume_point(out)                                   # on --resume: newest intact checkpoint
    rewind_logs(out, state["step"] if ckpt else None)                 # each log continues exactly once
    log = MetricsLog(out / "metrics.jsonl");  log.append({...})
    check_finite(step, last, loss=loss.item(), grad_norm=gn)        # NonFiniteError names the step

Checkpoint layout: OUT/checkpoints/step_00000010/ holds `model/` (an ordinary model directory:
config.json, safetensors, tokenizer; for LoRA the adapter), any extra modules (e.g. `critic/`),
`state.pt` (optimizer, scheduler, RNG states of python/numpy/torch, step, data position, ...: tensors and
plain values, loaded with weights_only=True, never arbitrary pickled objects), and `manifest.json` (every
file's size and SHA-256). It is written under a temporary name and renamed, so a kill at any moment leaves
either the previous checkpoint or the new one, never a half-written one; only the last `keep` are kept.
A resume takes the newest checkpoint that matches its manifest, falling back past damaged ones.
"""

import hashlib
import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from budgetthink.errors import UserError
from budgetthink.jsonl import append_jsonl, read_jsonl, write_jsonl

CKPT_DIR = "checkpoints"
STATE_FILE = "state.pt"
MANIFEST = "manifest.json"  # every file's size and SHA-256, written last


# --- optimizer and schedule --------------------------------------------------------------------------------
class Optim(BaseModel):
    """AdamW with linear warm-up then cosine (or constant) decay, and gradient clipping."""

    model_config = ConfigDict(extra="forbid")
    lr: float = Field(1e-6, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 to lr over this many scheduler steps")
    schedule: str = Field("constant", pattern="^(constant|cosine)$", description="after warm-up: constant or cosine decay")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of lr")
    grad_clip: float | None = Field(1.0, gt=0, description="clip the global gradient norm to this (None: no clipping)")


def make_optimizer(model: torch.nn.Module, cfg: Optim) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: Optim, total_steps: int) -> float:
    """Multiplier of the peak lr at scheduler step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Optim, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total_steps))


def clip_grad(params, max_norm: float | None) -> float:
    """Clip the global gradient norm (if max_norm) and return the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm is None:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


# --- LoRA ------------------------------------------------------------------------------------------------------
class LoRA(BaseModel):
    """Low-rank adapters through peft; only the adapters train."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(16, ge=1, description="adapter rank")
    alpha: int = Field(32, ge=1, description="scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="module names that get adapters")


def apply_lora(model, cfg: LoRA):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                            target_modules=cfg.target_modules, task_type="CAUSAL_LM"))


# --- model ---------------------------------------------------------------------------------------------------------
def load_model(name: str, ckpt: Path | None, lora: LoRA | None, gradient_checkpointing: bool, hint: str,
               **from_pretrained):
    """(model, tokenizer): from `name`, or on a resume from the checkpoint's model/. With LoRA the base is always
    `name` and the adapters come from the checkpoint (or are new). `hint` ends the error when loading fails.
    The tokenizer must have an end-of-text token (completions stop on it); padding falls back to it."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from budgetthink.engine import model_dir

    source = ckpt / "model" if ckpt else name
    base = name if lora else source
    if Path(base).is_dir():  # else a hub id, on a machine that has it
        model_dir(base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, **from_pretrained)
    except (OSError, ValueError, SafetensorError) as e:  # missing, or a truncated or damaged weights file
        raise UserError(f"cannot load model {base} ({str(e).splitlines()[0]}); {hint}") from None
    if tokenizer.eos_token is None:
        raise UserError(f"tokenizer of {base} has no end-of-text token; set eos_token in its tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, source, is_trainable=True) if ckpt else apply_lora(model, lora)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer


def save_model_dir(model, tokenizer, final: Path) -> None:
    """Save model and tokenizer as an ordinary model directory `final`, written under a temporary name first."""
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def say(msg: str) -> None:
    """A line on stderr that does not break a progress bar."""
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


# --- RNG ---------------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The RNG states in plain types and tensors, so that a checkpoint loads with torch.load(weights_only=True)."""
    np_state = np.random.get_state(legacy=False)
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"]),
                       "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", np.array(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- checkpoints ---------------------------------------------------------------------------------------------------
def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(out: Path, step: int, model, tokenizer, state: dict, modules: dict | None = None,
                    keep: int = 2, stage: str | None = None) -> Path:
    """Write OUT/checkpoints/step_N atomically (temporary directory, then rename); keep the last `keep`.

    `model` is saved with `save_pretrained` (with the tokenizer) into `model/`, with the run's model card
    when `stage` names it (a checkpoint's model is a model directory like any other); each of `modules`
    (name -> object with save_pretrained(dir)) into its own folder; `state` with torch.save."""
    root = Path(out) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "model")
    if stage is not None:
        from budgetthink import model_card

        model_card.write(tmp / "model", Path(out), stage=stage)
    for name, module in (modules or {}).items():
        module.save_pretrained(tmp / name)
    torch.save({**state, "step": step}, tmp / STATE_FILE)
    _write_manifest(tmp)  # last: a checkpoint whose files do not match it is damaged (see check_checkpoint)
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step (after a resume): swap in the new one
        old = root / f".old-step_{step:08d}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for stale in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    for leftover in root.glob(".tmp-step_*"):  # from runs killed mid-save
        if leftover != tmp:
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def list_checkpoints(out: Path) -> list[Path]:
    """Checkpoints under OUT, oldest first (temporary directories are never listed; see check_checkpoint)."""
    root = Path(out) / CKPT_DIR
    if not root.exists():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(ckpt: Path) -> None:
    files = {str(p.relative_to(ckpt)): {"bytes": p.stat().st_size, "sha256": _digest(p)}
             for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (ckpt / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")


def check_checkpoint(ckpt: Path) -> str | None:
    """None if every file of the checkpoint matches its manifest (size and SHA-256), else what is wrong.
    A rename makes a checkpoint appear whole, but a disk that filled up, a copy cut short or a stray write
    can still damage it afterwards."""
    try:
        files = json.loads((Path(ckpt) / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (written by an older version, or damaged)"
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, want in files.items():
        path = Path(ckpt) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, not {want['bytes']}"
        if _digest(path) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def load_state(ckpt: Path) -> dict:
    """The `state.pt` of a checkpoint (optimizer, scheduler, RNG, step, ...): tensors and plain values only,
    loaded with weights_only=True, so a checkpoint from an untrusted directory cannot run code."""
    return torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=True)


def resume_point(out: Path) -> tuple[Path | None, dict | None]:
    """(checkpoint, its state) to resume from: the newest intact one, skipping damaged ones with a warning;
    (None, None) if OUT has none. A UserError if every checkpoint is damaged (starting over would throw the
    run away: that is the user's call)."""
    damaged = []
    for ckpt in reversed(list_checkpoints(out)):
        problem = check_checkpoint(ckpt)
        if problem is None:
            try:
                return ckpt, load_state(ckpt)
            except Exception as e:  # noqa: BLE001 - any failure to unpickle safely means it is not usable
                problem = f"{STATE_FILE} does not load safely ({str(e).splitlines()[0][:200]})"
        damaged.append(f"{ckpt.name}: {problem}")
        say(f"warning: checkpoint {ckpt} is damaged ({problem}); falling back to the one before")
    if damaged:
        raise UserError(f"no intact checkpoint in {Path(out) / CKPT_DIR} ({'; '.join(damaged)}); delete it to "
                        "start the run over, or choose another --out")
    return None, None


def rewind_logs(out: Path, step: int | None, names: tuple[str, ...] = ("metrics.jsonl", "eval.jsonl")) -> None:
    """On a resume, continue every per-step log exactly once: drop the lines after the checkpoint's `step`
    (the killed run wrote them; the resumed run writes them again); with no checkpoint (`step` None) the
    run starts over and its logs go. Each file is rewritten atomically, so a kill here loses nothing."""
    for name in names:
        path = Path(out) / name
        if not path.exists():
            continue
        if step is None:
            path.unlink()
        else:
            write_jsonl(path, [r for r in read_jsonl(path) if r.get("step", 0) <= step])


# --- metrics ----------------------------------------------------------------------------------------------------------
class MetricsLog:
    """DIR/metrics.jsonl: one line per step, appended line-atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        append_jsonl(self.path, {k: _plain(v) for k, v in record.items()})

    def read(self) -> list[dict]:
        return read_jsonl(self.path) if self.path.exists() else []


def _plain(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf
    return v


def plot_metrics(records: list[dict], keys: list[str], out_png: Path, title: str = "") -> Path | None:
    """One panel per key (value against step) in a PNG; keys absent from every record are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(r.get(k) is not None for r in records)]
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.4 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


# --- NaN / inf guard ---------------------------------------------------------------------------------------------------
class NonFiniteError(UserError):
    """A loss or gradient became NaN or infinite; the run stopped before applying it."""


def check_finite(step: int, last_good: Path | None, **values: float) -> None:
    """Raise NonFiniteError naming the step and the quantity if any value is NaN or infinite."""
    bad = [f"{k}={v}" for k, v in values.items() if v is not None and not math.isfinite(float(v))]
    if bad:
        where = (f"the last good checkpoint {last_good} is intact (resume with --resume)" if last_good
                 else "no checkpoint was written yet")
        raise NonFiniteError(f"step {step}: {', '.join(bad)}; stopped before this update, {where}; "
                             "lower the learning rate or raise grad clipping")
