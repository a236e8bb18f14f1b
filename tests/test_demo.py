"""End to end: `budgetthink demo --quick` on the `test` preset writes every stage's outputs, well-formed."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import CACHE


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_demo_quick_writes_every_stage(tmp_path, tiny_model_dir):
    out = tmp_path / "demo"
    env = {**os.environ, "BUDGETTHINK_CACHE": str(CACHE)}  # reuses the test preset built by the fixture
    cmd = [sys.executable, "-m", "budgetthink", "demo", "--quick", "--preset", "test", "--out", str(out)]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]

    assert (out / "base" / "config.json").exists() and (out / "base" / "build_report.json").exists()
    metrics = _lines(out / "rl" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1)) and "reward_mean" in metrics[0]
    assert (out / "rl" / "model" / "config.json").exists() and (out / "rl" / "metrics.png").exists()
    traces = _lines(out / "distill" / "traces.jsonl")
    assert traces and all(t["correct"] for t in traces)
    funnel = json.loads((out / "curate" / "funnel.json").read_text())
    assert funnel["counts"][0] == len(traces) and funnel["counts"][-1] == len(_lines(out / "curate" / "selected.jsonl"))
    assert (out / "sft" / "model" / "config.json").exists() and _lines(out / "sft" / "metrics.jsonl")
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {row["model"] for row in results["summary"]} == {str(out / "base"), str(out / "rl" / "model"),
                                                            str(out / "sft" / "model")}
    assert all(row["control"] == 100.0 for row in results["summary"])

    bill = json.loads((out / "bill.json").read_text())
    stages = {line["stage"] for line in bill["lines"]}
    assert {"rl", "distill", "curate", "sft", "eval"} <= stages
    priced = [line["cost"] for line in bill["lines"] if line["cost"] is not None]
    assert abs(bill["total"]["cost"] - sum(priced)) < 1e-9

    page = (out / "report.html").read_text()
    for png in ("rl/metrics.png", "eval/scaling.png", "sft/metrics.png"):
        assert f'src="{png}"' in page and (out / png).exists()
    assert "<table>" in page and "The bill" in page

    # resumable: a rerun finds every stage done and skips it
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stderr.count("done before, skipped") == 6, r.stderr[-2000:]
