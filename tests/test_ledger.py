"""The cost ledger and the bill: lines written whatever happens, totals that add up, unpriced never zero."""

import json
import re

import pytest
import yaml

from budgetthink.bill import cost, make_bill
from budgetthink.errors import UserError
from budgetthink.jsonl import append_jsonl, read_jsonl
from budgetthink.ledger import stage_ledger
from budgetthink.prices import DEFAULT_PRICES, device_key, load_prices

CPU = ("cpu", 2)  # given explicitly: no torch import, no dependence on this machine


@pytest.fixture
def prices(tmp_path, monkeypatch):
    """A price file with round numbers, so expected costs can be worked out by hand."""
    path = tmp_path / "prices.yaml"
    path.write_text(yaml.safe_dump({
        "cpu_device": "cpu-test",
        "devices": {"cpu-test": {"usd_per_hour": 0.5, "unit": "core"},
                    "h100": {"usd_per_hour": 2.0}},
        "api": {"teacher-x": {"usd_per_million_input": 1.0, "usd_per_million_output": 4.0}},
    }))
    monkeypatch.setenv("BUDGETTHINK_PRICES", str(path))
    return path


def line(stage, device, count, hours, model=None, api=None, status="ok", id_=None):
    """A ledger line as stage_ledger writes it, with figures chosen by the test."""
    return {"id": id_ or f"{stage}-{device}-{hours}", "stage": stage, "status": status, "error": None,
            "start": "2026-01-01T00:00:00+00:00", "end": "2026-01-01T01:00:00+00:00", "wall_s": hours * 3600 / count,
            "device": device, "device_count": count, "device_key": None, "device_key_forced": False,
            "device_hours": hours, "tokens_generated": 10, "tokens_trained": 20,
            "api_input_tokens": sum(u["input_tokens"] for u in (api or {}).values()),
            "api_output_tokens": sum(u["output_tokens"] for u in (api or {}).values()),
            "api": api or {}, "model": model}


def test_default_prices_carry_date_and_source():
    table = yaml.safe_load(DEFAULT_PRICES.read_text())
    assert table["devices"] and table["api"]
    for section in ("devices", "api"):
        for key, entry in table[section].items():
            assert entry.get("date") and re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(entry["date"])), (section, key)
            assert entry.get("source"), (section, key)
    for key, entry in table["devices"].items():
        if entry.get("peak_bf16_tflops"):
            assert entry.get("peak_source"), key
    for key, facts in table["pretraining"].items():
        assert facts.get("source") and facts.get("match"), key
    assert table["pretraining"]["qwen2.5"]["tokens"] == 18e12 and table["pretraining"]["qwen2.5"]["compute"] is None


@pytest.mark.parametrize("name,key", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA A100-SXM4-40GB", "a100"), ("NVIDIA L40S", "l40s"),
    ("NVIDIA L4", "l4"), ("NVIDIA B200", "b200"), ("NVIDIA GeForce RTX 4090", None), ("cpu", "cpu-laptop")])
def test_device_names_map_to_price_keys(name, key, monkeypatch):
    monkeypatch.delenv("BUDGETTHINK_PRICES", raising=False)
    assert device_key(name, load_prices()) == key


def test_line_written_on_success(tmp_path, prices):
    with stage_ledger(tmp_path, "rl", config={"model": "Qwen/Qwen2.5-0.5B", "lr": 1e-6}, device=CPU) as e:
        e.add(tokens_generated=100, tokens_trained=150)
        e.add(tokens_generated=5, api_model="teacher-x", api_input_tokens=1000, api_output_tokens=2000)
    (rec,) = read_jsonl(tmp_path / "ledger.jsonl")
    assert rec["stage"] == "rl" and rec["status"] == "ok" and rec["error"] is None
    assert rec["tokens_generated"] == 105 and rec["tokens_trained"] == 150
    assert rec["api"] == {"teacher-x": {"input_tokens": 1000, "output_tokens": 2000, "reported_cost": None}}
    assert rec["device"] == "cpu" and rec["device_count"] == 2 and rec["device_key"] == "cpu-test"
    assert rec["device_hours"] == pytest.approx(rec["wall_s"] / 3600 * 2, rel=1e-3)
    assert rec["model"] == "Qwen/Qwen2.5-0.5B" and rec["config"]["lr"] == 1e-6
    assert rec["start"] <= rec["end"]
    # device at $0.5 per core-hour, API 1000 in at $1/M + 2000 out at $4/M = $0.009
    assert rec["cost_api"] == pytest.approx(0.009)
    assert rec["cost"] == pytest.approx(rec["device_hours"] * 0.5 + 0.009)


def test_line_written_when_the_stage_raises(tmp_path, prices):
    with pytest.raises(ValueError), stage_ledger(tmp_path, "sft", device=CPU) as e:
        e.add(tokens_trained=7)
        raise ValueError("out of memory, say")
    with pytest.raises(KeyboardInterrupt), stage_ledger(tmp_path, "eval", device=CPU):
        raise KeyboardInterrupt
    sft, ev = read_jsonl(tmp_path / "ledger.jsonl")
    assert (sft["stage"], sft["status"], sft["tokens_trained"]) == ("sft", "error", 7)
    assert sft["error"] == "ValueError: out of memory, say"
    assert (ev["stage"], ev["status"]) == ("eval", "interrupted")


def test_only_rank_zero_writes(tmp_path, prices, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with stage_ledger(tmp_path, "sft", device=CPU) as e:
        e.checkpoint()
    assert not (tmp_path / "ledger.jsonl").exists()


def test_checkpoint_lines_then_the_last_line_wins(tmp_path, prices):
    with stage_ledger(tmp_path, "rl", device=CPU) as e:
        e.add(tokens_generated=10)
        e.checkpoint()
        e.add(tokens_generated=10)
    recs = read_jsonl(tmp_path / "ledger.jsonl")
    assert [r["status"] for r in recs] == ["running", "ok"] and recs[0]["id"] == recs[1]["id"]
    b = make_bill([tmp_path])
    assert len(b["lines"]) == 1 and b["lines"][0]["tokens_generated"] == 20 and b["unfinished"] == []


KILLED = """
import os, signal, sys, time
from budgetthink.ledger import stage_ledger
with stage_ledger(sys.argv[1], "sft", device=("cpu", 2)) as e:
    e.add(tokens_trained=100)
    time.sleep(0.05)
    e.checkpoint()
    e.add(tokens_trained=900)          # work after the checkpoint: lost with the process
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_stage_is_billed_up_to_its_last_checkpoint_and_the_bill_says_so(tmp_path, prices, capsys):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path)], check=False, capture_output=True)
    assert run.returncode == -9  # killed outright: no `finally`, no closing line
    (rec,) = read_jsonl(tmp_path / "ledger.jsonl")
    assert rec["status"] == "running" and rec["tokens_trained"] == 100
    b = make_bill([tmp_path])
    (line,) = b["lines"]
    assert line["status"] == "running" and line["tokens_trained"] == 100  # the 900 after it are not billed
    (u,) = b["unfinished"]
    assert (u["stage"], u["billed_until"], u["billed_wall_s"]) == ("sft", rec["end"], rec["wall_s"])
    assert u["billed_wall_s"] >= 0.05 and "no line records it" in u["missing"]
    # 2 cores x wall at $0.5 per core-hour: the bill prices the checkpointed part, and no more
    assert line["cost"] == pytest.approx(rec["wall_s"] / 3600 * 2 * 0.5)
    cost([tmp_path])
    text = " ".join(capsys.readouterr().out.split())
    assert f"billed up to its last checkpoint at {rec['end']}" in text
    assert f"after its last checkpoint at {rec['end']}: the time from its last checkpoint" in text


def test_bill_total_is_the_sum_of_its_lines(tmp_path, prices):
    append_jsonl(tmp_path / "a" / "ledger.jsonl", [
        line("distill", "cpu", 2, 4.0, api={"teacher-x": {"input_tokens": 2_000_000, "output_tokens": 500_000,
                                                          "reported_cost": None}}),
        line("sft", "NVIDIA H100 80GB HBM3", 16, 10.0)])
    append_jsonl(tmp_path / "b" / "deeper" / "ledger.jsonl", [
        line("rl", "NVIDIA H100 80GB HBM3", 8, 3.0),
        line("rl", "cpu", 2, 1.0, api={"other": {"input_tokens": 1, "output_tokens": 1, "reported_cost": 0.25}})])
    b = make_bill([tmp_path / "a", tmp_path / "b"])
    # by hand: distill 4 core-h x $0.5 + 2M x $1/M + 0.5M x $4/M = 2 + 2 + 2 = 6; sft 10 x $2 = 20;
    # rl 3 x $2 = 6 and 1 x $0.5 + reported $0.25 = 0.75
    costs = {(r["stage"], r["device"]): r["cost"] for r in b["lines"]}
    assert costs == pytest.approx({("distill", "cpu"): 6.0, ("sft", "NVIDIA H100 80GB HBM3"): 20.0,
                                   ("rl", "NVIDIA H100 80GB HBM3"): 6.0, ("rl", "cpu"): 0.75})
    stages = {s["stage"]: s for s in b["stages"]}
    assert stages["rl"]["cost"] == pytest.approx(6.75) and stages["rl"]["lines"] == 2
    assert stages["rl"]["device_hours"] == pytest.approx(4.0)
    assert b["total"]["cost"] == pytest.approx(32.75) == pytest.approx(sum(r["cost"] for r in b["lines"]))
    assert b["total"]["cost"] == pytest.approx(sum(s["cost"] for s in b["stages"]))
    assert b["total"]["unpriced_lines"] == 0 and b["total"]["lines"] == 4
    assert b["total"]["api_input_tokens"] == 2_000_001


def test_missing_price_is_unpriced_never_zero(tmp_path, prices, capsys):
    append_jsonl(tmp_path / "ledger.jsonl", [
        line("sft", "NVIDIA H100 80GB HBM3", 4, 1.0),                      # $2 x 4 device-hours... priced: $2
        line("sft", "Mystery Accelerator 9000", 4, 1.0),                   # no device price
        line("distill", "cpu", 1, 0.0, api={"unknown-teacher": {"input_tokens": 5, "output_tokens": 5,
                                                                "reported_cost": None}})])
    b = make_bill([tmp_path])
    by_device = {r["device"]: r for r in b["lines"]}
    mystery, distill = by_device["Mystery Accelerator 9000"], by_device["cpu"]
    assert mystery["cost"] is None and mystery["cost_device"] is None and not mystery["priced"]
    assert "Mystery Accelerator 9000" in mystery["unpriced"][0]
    assert distill["cost"] is None and distill["cost_api"] is None and "unknown-teacher" in distill["unpriced"][0]
    assert b["total"]["cost"] == pytest.approx(2.0)  # only the priced line
    assert (b["total"]["priced_lines"], b["total"]["unpriced_lines"]) == (1, 2)
    assert {s["stage"]: s["unpriced_lines"] for s in b["stages"]} == {"sft": 1, "distill": 1}

    out = cost([tmp_path], as_json=True)
    printed = json.loads(capsys.readouterr().out)
    assert printed["total"]["cost"] == pytest.approx(out["total"]["cost"])
    assert [r["cost"] for r in printed["lines"]].count(None) == 2

    cost([tmp_path])
    text = capsys.readouterr().out
    assert "unpriced" in text and "1 of 3 lines priced; 2 unpriced" in text


def test_not_on_the_bill_pretraining_and_the_tiny_lineage(tmp_path, prices):
    tiny = tmp_path / "tiny"
    with stage_ledger(tiny, "tiny", device=CPU):  # the tiny model's own pretraining, in its directory
        pass
    with stage_ledger(tmp_path / "rl", "rl", config={"model": str(tiny)}, device=CPU):
        pass
    b = make_bill([tmp_path / "rl"])  # only the RL run is named: the bill follows its model to the tiny stage
    assert sorted(r["stage"] for r in b["lines"]) == ["rl", "tiny"]
    assert b["tiny_pretraining_in_bill"] and b["not_on_bill"] == []

    with stage_ledger(tmp_path / "big", "sft", model="Qwen/Qwen2.5-32B-Instruct", device=CPU):
        pass
    with stage_ledger(tmp_path / "other", "eval", model="someone/unknown-7b", device=CPU):
        pass
    b = make_bill([tmp_path / "big", tmp_path / "other"])
    facts = {f["model"]: f for f in b["not_on_bill"]}
    qwen = facts["Qwen/Qwen2.5-32B-Instruct"]
    assert qwen["tokens"] == 18e12 and qwen["compute"] is None and "2412.15115" in qwen["source"]
    assert facts["someone/unknown-7b"]["tokens"] is None and "unknown" in facts["someone/unknown-7b"]["tokens_note"]


def test_price_overrides_and_bad_inputs(tmp_path, monkeypatch):
    monkeypatch.delenv("BUDGETTHINK_PRICES", raising=False)
    path = tmp_path / "p.yaml"
    path.write_text("devices:\n  h100:\n    usd_per_hour: 1.25\n")
    table = load_prices(path)
    h100 = table["devices"]["h100"]
    assert h100["usd_per_hour"] == 1.25 and h100["peak_bf16_tflops"] == 989  # merged over the default
    assert str(path) in h100["source"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpus: {}\n")
    with pytest.raises(UserError, match="unknown top-level key"):
        load_prices(bad)
    with pytest.raises(UserError, match="not found"):
        load_prices(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="no ledger.jsonl"):
        make_bill([tmp_path])
    with pytest.raises(UserError, match="no such file"):
        make_bill([tmp_path / "nowhere"])


def test_a_reported_api_cost_after_an_unpriced_model_keeps_the_line_unpriced(tmp_path, prices):
    api = {"unknown-teacher": {"input_tokens": 5, "output_tokens": 5, "reported_cost": None},
           "router": {"input_tokens": 5, "output_tokens": 5, "reported_cost": 0.5}}
    append_jsonl(tmp_path / "ledger.jsonl", line("distill", "cpu", 1, 2.0, api=api))
    (r,) = make_bill([tmp_path])["lines"]
    assert r["cost_api"] is None and r["cost"] is None and r["cost_device"] == pytest.approx(1.0)
