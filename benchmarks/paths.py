"""Where the benchmarks are, paths as their JSON records them (repository-relative: no machine paths), and the
CPU flags they record beside their figures, one entry of a results JSON, and a side run in its own process."""

import json
import multiprocessing
import resource
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from budgetthink.jsonl import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent


def shown(path: str | Path) -> str:
    """`path` relative to the repository when it lies inside it, else as given."""
    full = Path(path).resolve()
    return str(full.relative_to(ROOT)) if full.is_relative_to(ROOT) else str(path)


def cpu_flags() -> list[str]:
    """The CPU's AVX2 / AVX-512 / AMX feature flags (bf16 matrix products are fast only with some of them)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx2", "avx512", "amx")))


def record(path: Path, key: str, run: dict, summary: dict) -> None:
    """Write one benchmark run as entry `key` (a model shape, or a setting) of the JSON at `path`: `run` under
    runs[key], its headline figures and targets under summary[key]; the other entries are kept, so one JSON
    holds every shape a benchmark was run on."""
    data = json.loads(path.read_text()) if path.exists() else {}
    if "runs" not in data:  # a file from before entries: start afresh
        data = {}
    data.setdefault("runs", {})[key] = run
    data.setdefault("summary", {})[key] = summary
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)


def _measured(fn, *a):
    out = fn(*a)
    return out, round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # ru_maxrss is KiB on Linux


def in_own_process(fn, *a) -> dict:
    """fn(*a) (a dict) in a fresh interpreter, with that process's peak resident memory in MiB added as
    `peak_rss_mib`: each side of a comparison gets a figure of its own, whatever the other left behind."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        out, peak = pool.submit(_measured, fn, *a).result()
    return {**out, "peak_rss_mib": peak}
