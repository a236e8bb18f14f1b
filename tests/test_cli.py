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


# file-system faults and outputs that would destroy something: a one-line error, exit 2, nothing changed.
# MODEL is the tiny test model; BROKEN a copy with its weights truncated; NOTOK one without its tokenizer;
# odd.gguf a GGUF file of an unknown architecture; p.jsonl an existing problem file.
@pytest.mark.parametrize("args, words", [
    (["data", "generate", "--task", "countdown", "--n", "2", "--out", "p.jsonl"], ["p.jsonl exists", "--force"]),
    (["data", "score", "--task", "countdown", "--in", "p.jsonl", "--out", "p.jsonl"], ["also the input"]),
    (["curate", "--in", "p.jsonl", "--n", "2", "--out", "p.jsonl"], ["also the input"]),
    (["curate", "--in", "empty.jsonl", "--n", "2", "--out", "c.jsonl"], ["no traces"]),
    (["data", "generate", "--task", "countdown", "--n", "2", "--out", "."], ["is a directory"]),
    (["data", "generate", "--task", "countdown", "--n", "2", "--out", "/proc/none/p.jsonl"], ["/proc/none"]),
    (["sft", "--model", "MODEL", "--data", ".", "--out", "s", "max_steps=1"], ["Is a directory"]),
    (["rl", "--out", "p.jsonl", "model=MODEL", "max_steps=1", "train_size=50", "eval_size=5"], ["p.jsonl"]),
    (["generate", "--model", "MODEL", "--n", "1", "--max-tokens", "100000"], ["--max-tokens", "context"]),
    (["generate", "--model", "BROKEN", "--n", "1"], ["BROKEN", "truncated or damaged"]),
    (["data", "generate", "--task", "countdown", "--n", "100000", "--out", "big.jsonl"], ["only 14261", "exist"]),
    (["curate", "--in", "p.jsonl", "--n", "1", "--out", "old.jsonl"], ["old.jsonl exists", "--force"]),
    (["data", "score", "--task", "countdown", "--in", "done.jsonl", "--out", "/proc/none/s.jsonl"], ["/proc/none"]),
    (["rl", "--out", "/proc/none/rl", "model=MODEL", "max_steps=1", "train_size=50", "eval_size=5"], ["/proc/none"]),
    (["sft", "--model", "MODEL", "--data", "p.jsonl", "--out", "/proc/none/sft"], ["/proc/none"]),
    (["generate", "--model", "MODEL", "--n", "1", "--max-thinking-tokens", str(10**30)], ["max_thinking_tokens"]),
    (["generate", "--model", "NOTOK", "--n", "1"], ["NOTOK has no tokenizer"]),
    (["sft", "--model", "NOTOK", "--data", "p.jsonl", "--out", "s"], ["NOTOK has no tokenizer"]),
    (["convert", "odd.gguf", "--out", "o"], ["architecture 'notanarch'", "supported: "]),
])
def test_faults_are_one_line_exit_2_and_change_nothing(tmp_path, tiny_model_dir, args, words):
    import shutil

    (tmp_path / "p.jsonl").write_text('{"id": "x"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "old.jsonl").write_text("{}\n")
    (tmp_path / "done.jsonl").write_text(json.dumps({"id": "x", "task": "countdown", "prompt": "1 2 -> 3\n", "answer": {
        "numbers": [1, 2], "target": 3}, "completion": "<answer>1+2</answer>"}) + "\n")
    notok = (tmp_path / "NOTOK")  # a model directory without its tokenizer
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / f, notok / f)
    import gguf

    odd = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), arch="notanarch")  # a GGUF of an architecture no one loads
    odd.write_header_to_file()
    odd.write_kv_data_to_file()
    odd.write_tensors_to_file()
    odd.close()
    broken = shutil.copytree(tiny_model_dir, tmp_path / "BROKEN")
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:1000])
    before = {p: p.read_bytes() for p in tmp_path.glob("*.jsonl")}
    r = run(*[str(tiny_model_dir) if a == "MODEL" else a.replace("model=MODEL", f"model={tiny_model_dir}")
              for a in args], cwd=tmp_path)
    err = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    assert r.returncode == 2 and err.startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    for w in words:
        assert w in err, err
    assert {p: p.read_bytes() for p in tmp_path.glob("*.jsonl")} == before


def test_serve_on_a_busy_port_is_an_error_before_loading(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = run("serve", "--model", str(tmp_path), "--port", str(busy.getsockname()[1]))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: cannot listen on 127.0.0.1:")


def test_outputs_are_world_readable_and_force_overwrites(tmp_path):
    out = tmp_path / "p.jsonl"
    assert run("data", "generate", "--task", "countdown", "--n", "2", "--out", str(out)).returncode == 0
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
    first = out.read_text()
    r = run("data", "generate", "--task", "countdown", "--n", "3", "--out", str(out), "--force")
    assert r.returncode == 0 and out.read_text() != first and len(out.read_text().splitlines()) == 3


def current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


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
