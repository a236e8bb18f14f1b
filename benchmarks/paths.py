"""Where the benchmarks are, paths as their JSON records them (repository-relative: no machine paths), and the
CPU flags they record beside their figures, one entry of a results JSON, and a side run in its own process."""

import json
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from budgetthink.engine.torch import OneDNNLinears
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


def matmul_rate(dtype=torch.float32, shapes: dict[str, tuple[int, int, int]] | None = None) -> dict:
    """This machine's torch.matmul GFLOP/s: the best of a few square sizes (`best`, the peak the benchmarks'
    shares of peak divide by) and, for each named (m, k, n) in `shapes`, the rate at that shape: the most a
    model whose products have those shapes can reach. In fp32 also oneDNN's product on a prepacked weight
    (`onednn_best`, through the engine's OneDNNLinears): on AMD CPUs with AVX-512, torch.matmul's MKL runs
    its AVX2 code and oneDNN's product is the faster one."""
    def rate(m, k, n, mm=torch.matmul):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        mm(a, b)
        reps = max(3, int(2e9 / (2 * m * k * n)))
        t = time.perf_counter()
        for _ in range(reps):
            mm(a, b)
        return round(2 * m * k * n * reps / (time.perf_counter() - t) / 1e9, 1)

    square = {str(n): rate(n, n, n) for n in (256, 512, 1024, 2048)}
    out = {"dtype": str(dtype).removeprefix("torch."), "by_size": square, "best": max(square.values())}
    if shapes:
        out["at_model_shapes"] = {name: rate(*s) for name, s in shapes.items()}
    if dtype == torch.float32 and torch.backends.mkldnn.is_available():
        def onednn(m, k, n):  # the engine's own path: a k -> n linear layer under OneDNNLinears
            layer = torch.nn.Linear(k, n, bias=False)
            with torch.inference_mode(), OneDNNLinears(layer):
                return rate(m, k, n, lambda a, _: layer(a))

        sq = {str(n): onednn(n, n, n) for n in (512, 1024, 2048)}  # 256^2 is below OneDNNLinears.MIN_WEIGHT
        out |= {"onednn_by_size": sq, "onednn_best": max(sq.values())}
        if shapes:
            out["onednn_at_model_shapes"] = {name: onednn(*s) for name, s in shapes.items()}
    return out


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_linear")


def op_profile(fn, top: int = 12) -> tuple[object, dict]:
    """(fn(), where its time went): torch.profiler's operators by self CPU time, the `top` largest with
    their share, and the share of all matrix products (`matmul_share`: what no change outside the products
    can remove)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops) or 1
    table = [{"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 3),
              "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in ops[:top]]
    mm = sum(e.self_cpu_time_total for e in ops if e.key in MATMUL_OPS)
    return out, {"self_cpu_s": round(total / 1e6, 3), "matmul_share": round(mm / total, 3),
                 "matmul_s": round(mm / 1e6, 3), "top_ops": table}
