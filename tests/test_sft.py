"""budgetthink sft: loss masking, example isolation, truncation counts, the run's outputs, exact resume,
and 2 processes agreeing with 1 at the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from budgetthink.config import load_config
from budgetthink.errors import UserError
from budgetthink.formats import Prompter, get_format
from budgetthink.jsonl import write_jsonl
from budgetthink.tasks import get_task
from budgetthink.train import sft
from budgetthink.train.sft import SFTConfig

ROOT = Path(__file__).resolve().parent.parent


def traces(n: int, seed: int = 0, num_numbers="2-3") -> list[dict]:
    """Trace lines as distill writes them, from the Countdown solver (short: 2 or 3 numbers)."""
    task = get_task("countdown", split="train", num_numbers=num_numbers)
    out = []
    for p in task.generate(n, seed=seed):
        t = task.solve(p)
        out.append({"id": p.id, "task": p.task, "problem": p.to_dict(), "thinking": t.thinking, "answer": t.answer})
    return out


def cfg_for(model_dir, data, **kw) -> SFTConfig:
    base = {"model": str(model_dir), "data": str(data), "format": "tinyzero", "batch_size": 4, "lr": 1e-3,
            "warmup_ratio": 0.0, "dtype": "float32", "save_every": 1, "log_every": 1000}
    return SFTConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# --- rendering and masking ---------------------------------------------------------------------------------------
def test_prompt_masked_target_supervised(tmp_path, tok, tiny_model_dir):
    record = {"id": "a", "problem": {"id": "a", "task": "countdown", "prompt": "1 2 -> 3\n", "answer": {}},
              "thinking": "1+2=3==3", "answer": "<answer>1+2</answer>"}
    write_jsonl(tmp_path / "t.jsonl", [record])
    (ex,), stats = sft.load_examples(tmp_path / "t.jsonl", tok, get_format("tinyzero"), cfg_for(tiny_model_dir, "x"))
    # by hand: prompt "1 2 -> 3\n" is 9 characters + "<think>" (one token) = 10 tokens; target "1+2=3==3" (8)
    # + "</think>" (1) + "<answer>" (1) + "1+2" (3) + "</answer>" (1) + end-of-text (1) = 15 tokens
    assert ex.n_prompt == 10 and len(ex.ids) == 25
    assert tok.decode(ex.ids[:10]) == "1 2 -> 3\n<think>"
    assert tok.decode(ex.ids[10:]) == "1+2=3==3</think><answer>1+2</answer><|endoftext|>"
    labels = sft.labels_of(ex)
    assert labels[:10] == [-100] * 10
    assert labels[10:] == ex.ids[10:]
    assert ex.ids[-1] == tok.eos_token_id
    assert sft.target_count(ex) == 15 and stats["target_tokens"] == 15
    _, lab = sft.collate([ex, ex], [0], tok.pad_token_id, "cpu")
    assert lab.tolist()[0] == labels


def test_s1_format_rendering(tok):
    r = {"problem": {"prompt": "Q?\n"}, "thinking": "hmm", "answer": "42"}
    prompt, target = sft.render(r, Prompter(get_format("s1"), tok, "raw"))
    assert prompt == "Q?\n<|im_start|>think\n"
    assert target == "hmm\n<|im_start|>answer\nAnswer: 42" + tok.eos_token
    # a trace written under a stated budget states it in the prompt, in each format's words
    stated = {**r, "budget": 64}
    assert sft.render(stated, Prompter(get_format("s1"), tok, "raw"))[0] == "Q?\nThink for at most 64 tokens.\n<|im_start|>think\n"
    assert sft.render(stated, Prompter(get_format("tinyzero"), tok, "raw"))[0] == "Q?\n[budget 64]<think>"


# --- the loss: hand-computed reference, and no example sees another -----------------------------------------
def test_loss_matches_reference_and_examples_are_isolated(tmp_path, tok, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    write_jsonl(tmp_path / "t.jsonl", traces(6))
    examples, _ = sft.load_examples(tmp_path / "t.jsonl", tok, get_format("tinyzero"), cfg_for(tiny_model_dir, "x"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    lengths = [len(e.ids) for e in examples]
    short = min(range(len(examples)), key=lambda i: lengths[i])
    assert lengths[short] < max(lengths)  # it gets padded in a batch

    def reference(ex) -> float:  # -sum log p(target token | its prefix), the example alone, no masks
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ex.ids])).logits[0].double(), -1)
        return -sum(float(logp[t, ex.ids[t + 1]]) for t in range(ex.n_prompt - 1, len(ex.ids) - 1))

    with torch.no_grad():
        alone = float(sft.nll_sum(model, *sft.collate(examples, [short], 0, "cpu"), bf16=False))
        ids, labels = sft.collate(examples, list(range(len(examples))), tok.pad_token_id, "cpu")
        only = labels.clone()
        only[[i for i in range(len(examples)) if i != short]] = -100  # the batch, loss on `short` only
        in_batch = float(sft.nll_sum(model, ids, only, bf16=False))
        whole = float(sft.nll_sum(model, ids, labels, bf16=False))
    ref = reference(examples[short])
    assert alone == pytest.approx(ref, rel=1e-5)
    assert in_batch == pytest.approx(ref, rel=1e-5)  # other rows and its own padding change nothing
    assert whole == pytest.approx(sum(reference(e) for e in examples), rel=1e-5)


# --- truncation ----------------------------------------------------------------------------------------------------
def test_truncation_counted(tmp_path, tok, tiny_model_dir):
    rows = traces(12)
    write_jsonl(tmp_path / "t.jsonl", rows)
    fmt = get_format("tinyzero")
    full = [len(tok(fmt.prompt(r["problem"]["prompt"]))["input_ids"])
            + len(tok(fmt.completion(r["thinking"], r["answer"]), add_special_tokens=False)["input_ids"]) + 1
            for r in rows]
    limit = sorted(full)[len(full) // 2]  # about half are longer
    longer = sum(n > limit for n in full)
    assert 0 < longer < len(rows)
    ex, stats = sft.load_examples(tmp_path / "t.jsonl", tok, fmt, cfg_for(tiny_model_dir, "x", max_seq_len=limit))
    assert stats["truncated"] == longer and stats["dropped_too_long"] == 0 and len(ex) == len(rows)
    assert max(len(e.ids) for e in ex) == limit and stats["longest_tokens"] == max(full)
    ex, stats = sft.load_examples(tmp_path / "t.jsonl", tok, fmt,
                                  cfg_for(tiny_model_dir, "x", max_seq_len=limit, truncation="drop"))
    assert stats["dropped_too_long"] == longer and stats["truncated"] == 0 and len(ex) == len(rows) - longer


def test_bad_line_and_teacher_errors(tmp_path, tok, tiny_model_dir):
    rows = traces(3)
    rows[1] = {**rows[1], "error": "HTTP 400", "thinking": None}
    write_jsonl(tmp_path / "t.jsonl", rows)
    ex, stats = sft.load_examples(tmp_path / "t.jsonl", tok, get_format("tinyzero"), cfg_for(tiny_model_dir, "x"))
    assert len(ex) == 2 and stats["teacher_errors"] == 1
    write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "thinking": "a"}])
    with pytest.raises(UserError, match="bad.jsonl:1"):
        sft.load_examples(tmp_path / "bad.jsonl", tok, get_format("tinyzero"), cfg_for(tiny_model_dir, "x"))


# --- the batch plan ----------------------------------------------------------------------------------------------
def test_batch_plan():
    lengths = [(i * 37) % 101 + 5 for i in range(50)]
    cfg = SFTConfig(model="m", batch_size=8)
    for epoch in range(2):
        batches = sft.epoch_batches(lengths, 8, 0, epoch, True)
        assert sorted(i for b in batches for i in b) == list(range(50))  # each example once per epoch
        assert sorted(len(b) for b in batches) == [2] + [8] * 6
    assert sft.epoch_batches(lengths, 8, 0, 0, True) != sft.epoch_batches(lengths, 8, 0, 1, True)
    # grouping by length pads less than random batches
    pad = lambda bs: sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in bs)
    assert pad(sft.epoch_batches(lengths, 8, 0, 0, True)) < pad(sft.epoch_batches(lengths, 8, 0, 0, False)) / 2
    # step -> batch is a pure function (resume), and epochs follow each other
    assert sft.batch_of_step(8, lengths, cfg, {}) == sft.epoch_batches(lengths, 8, 0, 1, True)[0]
    # every process gets a share; together they are the batch; the same number of micro-batches each
    batch = sft.batch_of_step(1, lengths, cfg, {})
    for world, micro in [(1, None), (2, None), (2, 3), (3, 2)]:
        plan = sft.layout(batch, lengths, world, micro)
        assert sorted(i for p in plan for mb in p for i in mb) == sorted(batch)
        assert len({len(p) for p in plan}) == 1
        assert all(len(mb) <= (micro or 8) for p in plan for mb in p)
    assert sft.layout([3], lengths, 2, None) == [[[3]], [[]]]  # an empty share: a zero-weight pass


# --- a run: outputs, then resume after an interruption gives the same losses -----------------------------------
def test_run_outputs_and_exact_resume(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_jsonl(tmp_path / "t.jsonl", traces(12))
    cfg = cfg_for(tiny_model_dir, tmp_path / "t.jsonl", max_steps=3, micro_batch_size=2, warmup_ratio=0.34)
    summary = sft.train(cfg, tmp_path / "a")
    a = tmp_path / "a"
    rec = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec] == [1, 2, 3]
    for r in rec:
        assert r["loss"] > 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["lr"] > 0
    assert rec[0]["lr"] == pytest.approx(1e-3 / 2)  # warm-up over ceil(0.34 * 3) = 2 steps, then cosine
    assert rec[1]["lr"] == pytest.approx(1e-3) and rec[2]["lr"] == pytest.approx(1e-3)
    assert (a / "metrics.png").stat().st_size > 0 and (a / "config.yaml").exists()
    assert (a / "checkpoints" / "step_00000003" / "state.pt").exists()
    assert summary["steps"] == 3 and summary["examples"] == 12 and summary["truncated"] == 0
    model = AutoModelForCausalLM.from_pretrained(a / "model")
    assert AutoTokenizer.from_pretrained(a / "model").decode([5, 6]) != ""
    assert json.loads((a / "ledger.jsonl").read_text().splitlines()[-1])["tokens_trained"] == sum(r["tokens"] for r in rec)

    real = sft.train_step

    def killed_at_3(run, step, cache):
        if step == 3:
            raise KeyboardInterrupt
        return real(run, step, cache)

    monkeypatch.setattr(sft, "train_step", killed_at_3)
    with pytest.raises(KeyboardInterrupt):
        sft.train(cfg, tmp_path / "b")
    monkeypatch.setattr(sft, "train_step", real)
    with pytest.raises(UserError, match="--resume"):
        sft.train(cfg, tmp_path / "b")
    sft.train(cfg, tmp_path / "b", resume=True)
    rec_b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec_b] == [1, 2, 3]
    for x, y in zip(rec, rec_b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6, abs=0)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "model")
    for (n, p), (_, q) in zip(model.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)


def test_lora_checkpoints_adapter_and_saves_merged_model(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    write_jsonl(tmp_path / "t.jsonl", traces(4))
    cfg = cfg_for(tiny_model_dir, tmp_path / "t.jsonl", max_steps=1, lr=1e-2, lora={"r": 4, "alpha": 8})
    sft.train(cfg, tmp_path / "l")
    assert (tmp_path / "l" / "checkpoints" / "step_00000001" / "model" / "adapter_config.json").exists()
    assert not (tmp_path / "l" / "model" / "adapter_config.json").exists()  # merged: an ordinary model directory
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "l" / "model").state_dict()
    assert base.keys() == tuned.keys()
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert changed and all("proj" in k for k in changed)  # only the adapted projections moved


# --- 2 processes vs 1 ------------------------------------------------------------------------------------------
def test_two_processes_match_one(tmp_path, tiny_model_dir):
    """Same global batch (8), fp32: per-step losses and gradient norms agree within 1e-4 relative."""
    write_jsonl(tmp_path / "t.jsonl", traces(16))
    common = ["format=tinyzero", "batch_size=8", "max_steps=3", "lr=1e-3", "warmup_ratio=0", "dtype=float32",
              "save_every=100"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(ROOT / "recipes/accelerate/cpu-ddp.yaml"), "--main_process_port", str(port), "-m", "budgetthink", "sft",
           "--model", str(tiny_model_dir), "--data", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "two"), *common]
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["processes"] == 2
    one = load_config(SFTConfig, None, common + ["micro_batch_size=3"],
                      defaults={"model": str(tiny_model_dir), "data": str(tmp_path / "t.jsonl")})
    sft.train(one, tmp_path / "one")
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    two, single = read("two"), read("one")
    assert len(two) == len(single) == 3
    for x, y in zip(two, single):
        assert x["target_tokens"] == y["target_tokens"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


# --- recipes -----------------------------------------------------------------------------------------------------------
def test_recipes_validate():
    s1 = load_config(SFTConfig, ROOT / "recipes/s1-qwen2.5-32b.yaml")
    assert (s1.model, s1.epochs, s1.batch_size, s1.lr, s1.warmup_ratio, s1.betas, s1.weight_decay, s1.max_seq_len,
            s1.dtype, s1.format) == ("Qwen/Qwen2.5-32B-Instruct", 5, 16, 1e-5, 0.05, (0.9, 0.95), 1e-4, 32768,
                                     "bfloat16", "s1")
    assert -(-1000 // s1.batch_size) * s1.epochs == 315  # s1's 315 steps on s1K
    tiny = load_config(SFTConfig, ROOT / "recipes/tiny-s1-sft.yaml", ["max_steps=2"])
    assert tiny.format == "tinyzero" and tiny.max_steps == 2
    with pytest.raises(UserError, match="unknown key"):
        load_config(SFTConfig, ROOT / "recipes/tiny-s1-sft.yaml", ["learning_rate=1"])


def test_accelerate_configs_validate():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    launch_args = {a.dest for a in launch_command_parser()._actions}
    for name in ("fsdp", "deepspeed-zero3", "cpu-ddp"):
        path = ROOT / "recipes/accelerate" / f"{name}.yaml"
        cc = ClusterConfig.from_yaml_file(path)  # unknown top-level keys raise
        assert set(cc.fsdp_config) <= launch_args and set(cc.deepspeed_config) <= launch_args, name
    fsdp = yaml.safe_load((ROOT / "recipes/accelerate/fsdp.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["mixed_precision"] == "bf16"
    assert fsdp["fsdp_config"]["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert fsdp["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "Qwen2DecoderLayer"
    from transformers.models.qwen2 import modeling_qwen2

    assert hasattr(modeling_qwen2, "Qwen2DecoderLayer")
    ds = yaml.safe_load((ROOT / "recipes/accelerate/deepspeed-zero3.yaml").read_text())
    assert ds["distributed_type"] == "DEEPSPEED" and ds["deepspeed_config"]["zero_stage"] == 3
