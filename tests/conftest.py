"""Shared fixtures: the `test` preset tiny model, built once per test run (and cached across runs); one torch
thread while tiny models run."""

import os
from pathlib import Path

import pytest

# One compute thread per process: tests run model work in several processes at once (servers, subprocess
# runs, 2-process data parallelism), and on a 2-core machine oversubscribed threads slow torch down 10-100x.
os.environ.setdefault("OMP_NUM_THREADS", "1")

CACHE = Path(os.environ.get("BUDGETTHINK_TEST_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "tests"))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """Directory of the pretrained `test` preset tiny model (built on first use, then reused)."""
    import torch

    from budgetthink import tiny

    torch.set_num_threads(1)

    if hasattr(tiny, "cached_build"):
        return Path(tiny.cached_build("test", CACHE))
    # until pretraining lands: a randomly initialised model of the same shape
    out = CACHE / "random-test"
    if not (out / "config.json").exists():
        model, tok = tiny.init_model("test", seed=0)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread while the tiny model runs: on a busy 2-core machine, torch's thread pool spins and
    a 64-wide model decodes ~100x slower with 2 threads than with 1 (measured: 30 s against 0.3 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
