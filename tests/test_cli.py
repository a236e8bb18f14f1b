"""The CLI's contract: --version, one-line errors with exit code 2, results on stdout."""

import json
import subprocess
import sys

import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "budgetthink", *args], check=False, capture_output=True, text=True,
                          cwd=cwd)


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("budgetthink ")


def test_data_generate_then_score(tmp_path):
    out = tmp_path / "p.jsonl"
    r = run("data", "generate", "--task", "countdown", "--n", "4", "--seed", "1", "--out", str(out), "split=test")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 4 and {"id", "task", "prompt", "answer", "meta"} <= set(lines[0])
    for line in lines:  # a correct, a formatted-but-wrong and an empty completion
        line["completion"] = f"<answer>{'+'.join(map(str, line['answer']['numbers']))}</answer>"
    lines[0]["completion"] = "no answer"
    scored = tmp_path / "c.jsonl"
    scored.write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = run("data", "score", "--task", "countdown", "--in", str(scored))
    summary = json.loads(r.stdout)
    assert r.returncode == 0 and summary["format_rate"] == 0.75


def test_distill_under_stated_budgets_then_curate_without_the_length_preference(tmp_path):
    traces, selected = tmp_path / "t.jsonl", tmp_path / "s.jsonl"
    r = run("distill", "--task", "countdown", "--teacher", "solver", "--n", "30", "--out", str(traces),
            "--stated-budgets", "16,64")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in traces.read_text().splitlines()]
    assert {x["budget"] for x in lines} == {16, 64} and all(len(x["thinking"]) <= x["budget"] for x in lines)
    r = run("curate", "--in", str(traces), "--n", "10", "--out", str(selected), "--no-prefer-long")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "funnel.json").read_text())["stages"][-1]["prefer_long"] is False


@pytest.mark.parametrize("args, words", [
    (["data", "generate", "--task", "nope", "--n", "2", "--out", "x.jsonl"], ["unknown task", "countdown"]),
    (["data", "generate", "--task", "countdown", "--n", "2", "--out", "x.jsonl", "colour=red"], ["colour"]),
    (["data", "score", "--task", "countdown", "--in", "missing.jsonl"], ["missing.jsonl"]),
    (["distill", "--task", "countdown", "--teacher", "solver", "--n", "2", "--out", "x.jsonl",
      "--stated-budgets", "16,x"], ["--stated-budgets", "16,32,64"]),
    (["distill", "--task", "multiply", "--teacher", "solver", "--n", "2", "--out", "x.jsonl",
      "--stated-budgets", "16"], ["multiply", "countdown"]),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, words):
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2
    err = r.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    for w in words:
        assert w in err


def test_malformed_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "task": "countdown", "prompt": "p", "answer": {"target": 3, "numbers": [1, 2]}, '
                   '"completion": "<answer>1+2</answer>"}\n{oops\n{"id": "b"}\n')
    r = run("data", "score", "--task", "countdown", "--in", str(bad))
    assert r.returncode == 2 and f"{bad}:2" in r.stderr
    r = run("data", "score", "--task", "countdown", "--in", str(bad), "--skip-bad")
    assert r.returncode == 0 and json.loads(r.stdout)["skipped"] == 2


def test_debug_shows_traceback(tmp_path):
    r = run("--debug", "data", "generate", "--task", "nope", "--n", "2", "--out", "x.jsonl", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr
