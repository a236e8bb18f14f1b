"""Where the benchmarks are, and paths as their JSON records them (repository-relative: no machine paths)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def shown(path: str | Path) -> str:
    """`path` relative to the repository when it lies inside it, else as given."""
    full = Path(path).resolve()
    return str(full.relative_to(ROOT)) if full.is_relative_to(ROOT) else str(path)
