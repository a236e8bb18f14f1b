"""Experiment tracking, model cards and `runs compare`.

Short rl, sft and tiny runs with report_to=tensorboard are read back with TensorBoard's own EventAccumulator and
compared value by value with metrics.jsonl (the independent record); wandb runs offline and trackio locally
(read back from its SQLite file). Every test runs with a guard that fails it if anything opens a connection
to a non-loopback address.
"""

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from budgetthink import tracking
from budgetthink.config import load_config
from budgetthink.errors import UserError
from budgetthink.jsonl import read_jsonl, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest.py)
ROOT = Path(__file__).resolve().parent.parent
RL = ["max_steps=2", "prompts_per_step=2", "n=4", "max_response_tokens=12", "train_size=40", "eval_size=4",
      "eval_every=1", "eval_max_tokens=16", "micro_batch_size=4", "optim.lr=1e-3", "kl_coef=0.01",
      "log_completions_every=1"]
NO_NETWORK = """
import socket, sys
real = socket.socket.connect
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
        raise SystemExit(f"network touched: {address}")
    return real(self, address)
socket.socket.connect = connect
sys.argv = ["budgetthink", *sys.argv[1:]]
from budgetthink.cli import main
main()
"""


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Fail the test if any connection leaves the machine; keep wandb's own files inside tmp_path."""
    touched = []
    real = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            touched.append(address)
            raise OSError(f"network touched: {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    for var in ("WANDB_MODE", "WANDB_API_KEY", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    yield
    assert not touched, f"network touched: {touched}"


def events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tracking" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def scalar(ea, tag) -> dict[int, float]:
    return {e.step: e.value for e in ea.Scalars(tag)}


def text(ea, tag) -> dict[int, str]:
    return {e.step: e.tensor_proto.string_val[0].decode() for e in ea.Tensors(f"{tag}/text_summary")}


# --- the setting -------------------------------------------------------------------------------------------------
def test_report_to_parses_names_and_names_the_fix(monkeypatch):
    from budgetthink.train.rl import RLConfig

    assert tracking.parse_report_to("none") == [] and tracking.parse_report_to(None) == []
    assert tracking.parse_report_to("tensorboard, wandb,tensorboard") == ["tensorboard", "wandb"]
    assert tracking.parse_report_to(["trackio", "none"]) == ["trackio"]
    assert load_config(RLConfig, overrides=["model=m"]).report_to == []
    with pytest.raises(UserError, match="unknown tracker 'tensorbord'; use none or any of tensorboard, wandb"):
        load_config(RLConfig, overrides=["model=m", "report_to=tensorbord"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"report_to wandb needs the wandb package: pip install 'budgetthink\[wandb\]'"):
        load_config(RLConfig, overrides=["model=m", "report_to=[tensorboard, wandb]"])


def test_scalars_keep_the_jsonl_names_and_add_trl_names():
    record = {"step": 3, "reward_mean": 0.5, "reward_std": 0.25, "response_len_mean": 12.0, "clip_frac": 0.125,
              "kl": None, "lr": 1e-3, "note": "text", "bad": float("nan"), "tokens": 7}
    assert tracking.scalars(record) == {
        "reward_mean": 0.5, "reward": 0.5, "reward_std": 0.25, "response_len_mean": 12.0,
        "completions/mean_length": 12.0, "clip_frac": 0.125, "clip_ratio/region_mean": 0.125, "lr": 1e-3,
        "learning_rate": 1e-3, "tokens": 7.0}


def test_the_command_line_is_written_as_typed(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/lib/budgetthink/__main__.py", "rl", "--out", "runs/a b", "max_steps=2"])
    assert tracking.command_line() == "budgetthink rl --out 'runs/a b' max_steps=2"
    monkeypatch.setattr(sys, "argv", ["/venv/lib/pytest/__main__.py", "-q"])
    assert tracking.command_line() == "python -m pytest -q"


def test_the_cli_error_for_an_unknown_tracker_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "budgetthink", "rl", "--out", str(tmp_path / "r"), "--report-to",
                        "tensorbord", "model=m"], check=False, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("error: config: report_to: unknown tracker 'tensorbord'")


# --- the three loops --------------------------------------------------------------------------------------------
def test_rl_logs_every_step_to_tensorboard_with_trl_names_and_writes_a_card(tiny_model_dir, tmp_path):
    from budgetthink.train import rl

    cfg = load_config(rl.RLConfig, overrides=[f"model={tiny_model_dir}", *RL, "report_to=tensorboard"])
    records = rl.train(cfg, tmp_path / "run")
    ea = events(tmp_path / "run")
    tags = set(ea.Tags()["scalars"])
    assert {"reward", "reward_std", "completions/mean_length", "kl", "entropy", "clip_ratio/region_mean",
            "frac_reward_zero_std", "learning_rate"} <= tags  # TRL's names
    for r in records:  # every number of metrics.jsonl under its own name, at its step
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)):
                assert scalar(ea, k)[r["step"]] == pytest.approx(v, rel=1e-6, abs=1e-6), k
    assert [scalar(ea, "reward")[s] for s in (1, 2)] == pytest.approx([r["reward_mean"] for r in records], rel=1e-6)
    start = [e for e in read_jsonl(tmp_path / "run" / "eval.jsonl") if e["step"] == 0]
    assert scalar(ea, "eval_accuracy")[0] == pytest.approx(start[0]["accuracy"])  # the evaluation before training
    config = text(ea, "config")[0]
    assert "algorithm: grpo" in config and "kl_coef: 0.01" in config
    table = text(ea, "completions")
    assert sorted(table) == [1, 2]
    lines = table[1].splitlines()
    assert lines[0] == "| prompt | completion | reward | correct |" and len(lines) == 2 + 2  # one per prompt

    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f"base_model: {tiny_model_dir}" in card and f"- base model: `{tiny_model_dir}`" in card
    assert "- steps: 2 of max_steps 2, 2 prompts x 4 samples each" in card
    assert "- command: `" in card and "40 `countdown` problems generated" in card
    final = next(e for e in read_jsonl(tmp_path / "run" / "eval.jsonl") if e["step"] == 2)
    assert f"| accuracy | {start[0]['accuracy']:.4g} | {final['accuracy']:.4g} |" in card
    assert "| rl |" in card and "| tiny |" in card  # the bill, with the base model's own ledger line
    assert "log_completions_every: 1" in card  # the config
    # a checkpoint's model directory carries the card of the run so far
    ckpt_card = (tmp_path / "run" / "checkpoints" / "step_00000002" / "model" / "README.md").read_text()
    assert f"base_model: {tiny_model_dir}" in ckpt_card and "- steps: 2 of max_steps 2" in ckpt_card


def test_sft_logs_every_step_to_tensorboard_and_writes_a_card(tiny_model_dir, tmp_path):
    from budgetthink.tasks import get_task
    from budgetthink.train import sft

    task = get_task("countdown", split="train", num_numbers="2-3")
    traces = [{"id": p.id, "problem": p.to_dict(), "thinking": t.thinking, "answer": t.answer}
              for p in task.generate(8, seed=0) for t in [task.solve(p)]]
    write_jsonl(tmp_path / "t.jsonl", traces)
    cfg = sft.SFTConfig(model=str(tiny_model_dir), data=str(tmp_path / "t.jsonl"), format="tinyzero", batch_size=4,
                        lr=1e-3, warmup_ratio=0.0, dtype="float32", max_steps=2, log_every=1000,
                        report_to=["tensorboard"])
    summary = sft.train(cfg, tmp_path / "run")
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    ea = events(tmp_path / "run")
    assert {"loss", "lr", "learning_rate", "grad_norm", "tokens_per_s", "epoch"} <= set(ea.Tags()["scalars"])
    for r in records:
        assert scalar(ea, "loss")[r["step"]] == pytest.approx(r["loss"], rel=1e-6)
        assert scalar(ea, "learning_rate")[r["step"]] == pytest.approx(r["lr"], rel=1e-6)
        assert scalar(ea, "grad_norm")[r["step"]] == pytest.approx(r["grad_norm"], rel=1e-6)
    assert "batch_size: 4" in text(ea, "config")[0]
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert f"- base model: `{tiny_model_dir}`" in card and "- steps: 2 optimizer steps of 4 examples" in card
    assert f"8 traces ({summary['target_tokens']} target tokens)" in card
    assert f"Final training loss {summary['final_loss']:.4g}." in card and "| sft |" in card
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert ckpts and sorted(p.parent.parent.name for p in (tmp_path / "run" / "checkpoints").glob(
        "step_*/model/README.md")) == ckpts  # each checkpoint's model directory has its card


def test_tiny_pretraining_logs_to_tensorboard_and_its_build_carries_a_card(tmp_path):
    from budgetthink import tiny

    assert tiny.settings("test", 0, tiny.SCHEDULES["test"].model_copy(update={"report_to": ["wandb"]})) == \
        tiny.settings("test", 0)  # report_to is not a build setting: cached builds keep their key
    s = tiny.Schedule(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, train_problems=20, eval_problems=2,
                      eval_max_tokens=8, report_to="tensorboard")
    report = tiny.build(tmp_path / "tiny", preset="test", seed=0, schedule=s, progress=False)
    ea = events(tmp_path / "tiny")
    loss = scalar(ea, "loss")
    assert sorted(loss) == [1, 2, 3, 4] and loss[1] == pytest.approx(report["train"]["first_loss"], abs=1e-4)
    assert scalar(ea, "learning_rate")[1] == pytest.approx(1e-3)  # warm-up of 1 step reaches the peak at once
    assert scalar(ea, "check_accuracy")[4] == pytest.approx(report["check"]["accuracy"])
    assert not list(tmp_path.glob(".tiny.tmp-*"))  # the logs moved into the build with it
    card = (tmp_path / "tiny" / "README.md").read_text()
    assert "- base model: none (built and pretrained from scratch)" in card and "- steps: 4 pretraining steps" in card
    assert f"| accuracy | {report['check']['accuracy']:.4g} |" in card and "| tiny |" in card


def test_a_resumed_run_replaces_the_steps_logged_after_its_checkpoint(tmp_path):
    killed = tracking.start(["tensorboard"], tmp_path, stage="rl", config={})
    for step in (1, 2, 3):  # the checkpoint was at step 2, step 3 was logged before the kill
        killed.log({"loss": float(step)}, step)
    killed.finish()
    resumed = tracking.start(["tensorboard"], tmp_path, stage="rl", config={}, resume_step=2)
    for step in (3, 4):
        resumed.log({"loss": 10.0 * step}, step)
    resumed.finish()
    assert [(e.step, e.value) for e in events(tmp_path).Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


# --- wandb offline and trackio local ------------------------------------------------------------------------------
def test_wandb_runs_offline_into_the_run_directory(tmp_path):
    tracker = tracking.start(["wandb"], tmp_path / "run", stage="rl", config={"algorithm": "grpo"})
    for step in (1, 2):
        tracker.log({"step": step, "reward_mean": step / 4}, step)
    tracker.table("completions", ["prompt", "completion", "reward"], [["1 2 -> 3", "<answer>1+2</answer>", 1.0]], 2)
    tracker.finish()
    (run,) = (tmp_path / "run" / "tracking" / "wandb").glob("offline-run-*")  # offline: nothing was sent
    (log,) = run.glob("run-*.wandb")
    for _ in range(100):  # wandb's service process may write the record log just after finish() returns
        if b"reward_mean" in log.read_bytes():
            break
        time.sleep(0.1)
    assert b"reward_mean" in log.read_bytes()  # the run's record log (binary) holds the logged keys
    (table,) = run.glob("files/media/table/completions_2_*.table.json")
    saved = json.loads(table.read_text())
    assert saved["columns"] == ["prompt", "completion", "reward"]
    assert saved["data"] == [["1 2 -> 3", "<answer>1+2</answer>", 1.0]]


def test_trackio_logs_locally_and_keeps_stdout_clean(tiny_model_dir, tmp_path):
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "TRACKIO_PROJECT": "bt-test"}
    r = subprocess.run([sys.executable, "-c", NO_NETWORK, "rl", "--out", str(tmp_path / "run"), "--report-to", "trackio",
                        f"model={tiny_model_dir}", *RL], check=False, capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == ""  # trackio's messages went to stderr
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    db = sqlite3.connect(tmp_path / "trackio" / "bt-test.db")
    rows = [(step, json.loads(m)) for step, m in db.execute("SELECT step, metrics FROM metrics WHERE run_name = 'run'")]
    logged = {step: m for step, m in rows if "reward" in m}
    assert sorted(logged) == [1, 2]
    for rec in records:
        assert logged[rec["step"]]["reward"] == pytest.approx(rec["reward_mean"])
        assert logged[rec["step"]]["completions/mean_length"] == pytest.approx(rec["response_len_mean"])
    tables = [m["completions"] for _, m in rows if "completions" in m]
    assert len(tables) == 2 and set(tables[0]["_value"][0]) == {"prompt", "completion", "reward", "correct"}
    (config,) = [json.loads(c) for (c,) in db.execute("SELECT config FROM configs WHERE run_name = 'run'")]
    assert config["algorithm"] == "grpo" and config["kl_coef"] == 0.01


# --- runs compare ---------------------------------------------------------------------------------------------------
def fake_run(path: Path, algorithm: str, rewards: list[float], start_acc: list[float] | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"algorithm: {algorithm}\n")
    write_jsonl(path / "metrics.jsonl", [{"step": i + 1, "reward_mean": r, "accuracy": r / 2, "kl": None}
                                         for i, r in enumerate(rewards)])
    if start_acc:
        write_jsonl(path / "eval.jsonl", [{"step": 0, "budget": b, "accuracy": a, "reward": a}
                                          for b, a in zip((16, 32), start_acc)])
    return path


def test_runs_compare_prints_one_table_and_writes_one_png(tmp_path, capsys):
    import matplotlib.image

    from budgetthink.runs import compare

    a = fake_run(tmp_path / "a", "grpo", [0.1, 0.3, 0.2], start_acc=[0.25, 0.75])
    b = fake_run(tmp_path / "b", "rloo", [0.4, 0.6])
    result = compare([a, b], tmp_path / "cmp.png")
    assert result["metrics"] == ["reward_mean", "accuracy", "eval_accuracy"]  # kl is never logged (null)
    assert [(r["run"], r["kind"], r["steps"], r["reward_mean"], r["accuracy"]) for r in result["runs"]] == [
        (str(a), "grpo", 3, 0.2, 0.1), (str(b), "rloo", 2, 0.6, 0.3)]
    assert result["runs"][0]["eval_accuracy"] == 0.5 and result["runs"][1]["eval_accuracy"] is None  # mean of budgets
    out = capsys.readouterr().out
    assert str(a) in out and "rloo" in out and "0.6" in out
    assert matplotlib.image.imread(tmp_path / "cmp.png").shape[1] == 1200  # two panels side by side, 6 in at 100 dpi
    with pytest.raises(UserError, match="no metrics.jsonl"):
        compare([tmp_path / "cmp.png"], tmp_path / "x.png")
    with pytest.raises(UserError, match="no run logged loss"):
        compare([a], tmp_path / "x.png", metrics=["loss"])


def test_runs_compare_from_the_command_line(tmp_path):
    a = fake_run(tmp_path / "a", "grpo", [0.1, 0.3])
    r = subprocess.run([sys.executable, "-m", "budgetthink", "runs", "compare", str(a), "--png", str(tmp_path / "c.png"),
                        "--json"], check=False, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["runs"][0]["reward_mean"] == 0.3 and (tmp_path / "c.png").stat().st_size > 0
