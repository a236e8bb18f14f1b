"""GGUF -> a transformers model directory (weights, tokenizer, chat template, generation config).

    budgetthink convert gguf SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2-135m

transformers reads GGUF files (with the `gguf` package) and de-quantizes their weights, but a model loaded
that way refuses `save_pretrained` (it carries a GGUF `quantization_config`). So the model is rebuilt from its
config without that entry, the de-quantized state dict is loaded into it, and the plain model is saved in
safetensors: from then on the directory loads like any other, without `gguf`. The weights are what the GGUF
holds (a Q4 file gives the Q4 values, stored in float32).

A finished directory carries `convert.json` (the source's name, size and a hash of its first and last MiB);
converting the same file into it again is a no-op, so callers can treat `convert` as a cache.
"""

import hashlib
import json
import shutil
from pathlib import Path

from budgetthink.errors import UserError

STAMP = "convert.json"


def gguf_architecture(path: Path) -> str:
    """The `general.architecture` a GGUF file declares (a UserError if it is not a readable GGUF file)."""
    try:
        import gguf
    except ImportError:
        raise UserError("reading GGUF files needs the `gguf` package; install it with "
                        "`pip install 'budgetthink[smollm2]'`") from None
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return str(field.contents())
    except (KeyError, ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable GGUF model file ({e}); pass a .gguf file") from None


def source_id(path: Path) -> dict:
    """What identifies a source file cheaply: name, size and a hash of its first and last MiB."""
    size, h = path.stat().st_size, hashlib.sha256()
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read())
    return {"source": path.name, "bytes": size, "sha256_ends": h.hexdigest()}


def converted(out: Path, path: Path) -> bool:
    """Whether `out` already holds the conversion of `path`."""
    stamp = out / STAMP
    if not stamp.is_file():
        return False
    try:
        old = json.loads(stamp.read_text())
    except json.JSONDecodeError:
        return False
    return all(old.get(k) == v for k, v in source_id(path).items())


def convert_gguf(path, out, quiet: bool = False) -> dict:
    """Write the model directory of GGUF file `path` into `out`; returns the summary (also in OUT/convert.json)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    path, out = Path(path), Path(out)
    if not path.is_file():
        raise UserError(f"GGUF file {path} not found; pass the path of a .gguf file")
    if converted(out, path):
        return json.loads((out / STAMP).read_text())
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / STAMP).exists())):
        raise UserError(f"{out} exists and is not an earlier conversion; nothing was changed: choose a new --out "
                        "or remove it")
    arch = gguf_architecture(path)
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UserError(f"{path.name}: GGUF architecture {arch!r} is not one transformers can load; supported: "
                        f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}")
    kw = {"gguf_file": path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # what makes save_pretrained refuse; the weights are de-quantized
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {k for k in missing if model.config.tie_word_embeddings and k.startswith("lm_head")}
    if set(missing) - tied or unexpected:
        raise UserError(f"{path.name}: its weights do not fit the {config.model_type} model transformers builds "
                        f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    del loaded
    # the end-of-turn token stops generation: the tokenizer's eos (ChatML models: <|im_end|>) and the config's
    eos = sorted({i for i in (tokenizer.eos_token_id, config.eos_token_id) if i is not None})
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos or None,
                                               pad_token_id=tokenizer.pad_token_id)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    summary = {**source_id(path), "architecture": arch, "model_type": config.model_type,
               "parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tokenizer),
               "chat_template": bool(getattr(tokenizer, "chat_template", None)), "eos_token_id": eos}
    (tmp / STAMP).write_text(json.dumps(summary, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)  # a killed conversion never leaves a half directory at `out`
    return summary
