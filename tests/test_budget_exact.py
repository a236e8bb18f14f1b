"""Budget forcing is exact: the engine (KV cache reused, batched) gives the same tokens as the naive s1 procedure.

The naive reference below is written from the semantics stated in budgetthink/budget.py's docstring, independently of its code: for
every token it runs the model over the whole id sequence with no cache; an inserted string is encoded on its
own (no special tokens) and its ids appended; a model-written end of thinking is cut off the id list.

The model is the random `test` preset tiny Qwen2 (float64, so rounding cannot break greedy ties) with two
deterministic changes so that it ends its thinking now and then: its output layer is untied and replaced by
large random weights (confident, varied logits), and a position-dependent bias nudges it, every `period` positions, to write the format's closing delimiter
(token by token; for r1 the characters of `</think>` one by one, not the single added token) and, a few
positions later, end-of-text. The bias is a function of the token's position only, so the engine (which
passes position ids) and the naive forward (positions 0..T-1) see the same model. It is strong enough to be
followed most of the time, not always: some delimiters are written whole (model closes thinking), some
partly, some end-of-texts happen while thinking.
"""

import pytest
import torch

from budgetthink.engine import Budget, Sampling
from budgetthink.engine.torch import TorchEngine
from budgetthink.formats import get_format
from budgetthink.tiny import init_model

FORMATS = ("tinyzero", "s1", "r1")
PROMPTS = ("3 5 7 -> 22\n", "12+7=", "Using the numbers [1, 2, 3], make 6.\n")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest.py)


def nudged_forward(self, input_ids=None, position_ids=None, logits_to_keep=0, **kwargs):
    """The model's forward with `nudge[position % period]` added to its logits (see the module docstring)."""
    out = super(type(self), self).forward(input_ids=input_ids, position_ids=position_ids,
                                          logits_to_keep=logits_to_keep, **kwargs)
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    pos = position_ids[:, -out.logits.shape[1]:]  # positions of the logits kept
    out.logits = out.logits + self.nudge[pos % self.nudge.shape[0]]
    return out


def nudged_model(fmt_name: str, strength: float = 14.0, eos_strength: float = 8.0, base=None):
    """`base` (model, tokenizer), default the random `test` preset tiny Qwen2, nudged (see the module docstring)."""
    base, tok = base or init_model("test", seed=0)
    base.config.tie_word_embeddings = False
    model = type("Nudged", (type(base),), {"forward": nudged_forward})(base.config)
    model.load_state_dict(base.state_dict())
    with torch.no_grad():  # an untied output layer with large random weights: varied, confident logits
        model.lm_head.weight.copy_(0.35 * torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(1)))
    if fmt_name == "r1":  # the characters of "</think>", each its own token
        script = [tok.convert_tokens_to_ids(c) for c in "</think>"]
    else:
        script = tok.encode(get_format(fmt_name).think_close, add_special_tokens=False)
    period = len(script) + 9
    nudge = torch.zeros(period, len(tok))
    for i, t in enumerate(script):
        nudge[i, t] = strength
    nudge[len(script) + 4, tok.eos_token_id] = eos_strength
    model.register_buffer("nudge", nudge)
    return model.double().eval(), tok


# --- the naive reference -------------------------------------------------------------------------------------------
def extension(budget: Budget, tok) -> str:
    """s1's "Wait" by default: as it is on the character-level tiny tokenizer, a word (" Wait") on a BPE one."""
    if budget.extension_string is not None:
        return budget.extension_string
    return "Wait" if len(tok) < 1000 else " Wait"


def naive(model, tok, prompt_ids, fmt, budget: Budget, max_tokens: int):
    """s1's procedure on token ids, one token at a time, no cache. Returns (ids, sampled, counts)."""

    def next_token(ids):
        with torch.no_grad():
            return int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())

    def text(ids):
        return tok.decode(ids, skip_special_tokens=False)

    def enc(s):
        return tok.encode(s, add_special_tokens=False) if s else []

    eos = tok.eos_token_id
    close, prefix, ext = enc(fmt.think_close), enc(budget.answer_prefix), enc(extension(budget, tok))
    out, sampled = [], []
    thinking, think_n, answer_n, n_sampled, n_ext, forced = True, 0, 0, 0, 0, False
    seg = 0  # where the current run of sampled thinking tokens starts in `out`
    if budget.max_thinking_tokens == 0:
        out, sampled, thinking, forced = close + prefix, [False] * len(close + prefix), False, True
    while True:
        if n_sampled >= max_tokens:
            break
        if not thinking and answer_n >= budget.max_answer_tokens:
            break
        if thinking and budget.max_thinking_tokens is not None and think_n >= budget.max_thinking_tokens:
            out, sampled = out + close + prefix, sampled + [False] * len(close + prefix)
            thinking, forced = False, True
            continue
        x = next_token(prompt_ids + out)
        n_sampled += 1
        if not thinking:
            out.append(x)
            sampled.append(True)
            answer_n += 1
            if x == eos:
                break
            continue
        if x == eos:
            if think_n < budget.min_thinking_tokens or n_ext < budget.extensions:
                out, sampled = out + ext, sampled + [False] * len(ext)
                n_ext += 1
                seg = len(out)
            else:
                out, sampled = out + close + prefix, sampled + [False] * len(close + prefix)
                thinking, forced = False, True
            continue
        out.append(x)
        sampled.append(True)
        think_n += 1
        seg_text = text(out[seg:])
        if fmt.think_close in seg_text:
            start = seg_text.index(fmt.think_close)
            cut = seg  # first token whose text reaches into the delimiter
            while len(text(out[seg:cut + 1])) <= start:
                cut += 1
            think_n -= len(out) - cut
            if think_n < budget.min_thinking_tokens or n_ext < budget.extensions:
                out, sampled = out[:cut] + ext, sampled[:cut] + [False] * len(ext)
                n_ext += 1
                seg = len(out)
            else:
                thinking = False
    return out, sampled, {"thinking_tokens": think_n, "answer_tokens": answer_n, "extensions": n_ext, "forced": forced}


BUDGETS = {
    "max": Budget(max_thinking_tokens=12, max_answer_tokens=8),
    "min": Budget(min_thinking_tokens=24, max_answer_tokens=8),
    "min_low": Budget(min_thinking_tokens=4, max_answer_tokens=8),
    "extensions": Budget(extensions=2, max_answer_tokens=8),
    "min_max": Budget(min_thinking_tokens=16, max_thinking_tokens=28, max_answer_tokens=8),
    "answer_prefix": Budget(max_thinking_tokens=20, extensions=1, extension_string=" Hmm,",
                            answer_prefix="\nFinal Answer: ", max_answer_tokens=8),
    "empty_extension": Budget(extensions=2, extension_string="", max_answer_tokens=8),
    "max_zero": Budget(max_thinking_tokens=0, answer_prefix="A:", max_answer_tokens=6),
}


def assert_matches_naive(outs, prompts, model, tok, fmt, budget: Budget, max_tokens: int, name: str) -> None:
    """`outs` (n=2 samples of each prompt, greedy) are token-identical to the naive procedure's."""
    assert len(outs) == 2 * len(prompts)
    for i, prompt in enumerate(prompts):
        ids, sampled, counts = naive(model, tok, tok.encode(prompt), fmt, budget, max_tokens)
        for got in outs[2 * i: 2 * i + 2]:
            assert got.prompt_index == i
            assert got.token_ids == ids, f"{name} prompt {i}: {got.text!r} vs {tok.decode(ids)!r}"
            assert got.sampled == sampled
            assert got.thinking_tokens == counts["thinking_tokens"]
            assert got.answer_tokens == counts["answer_tokens"]
            assert got.extensions == counts["extensions"]
            assert got.meta["forced"] == counts["forced"]
            assert all(lp == 0.0 for lp, s in zip(got.logprobs, got.sampled) if not s)


@pytest.mark.parametrize("fmt_name", FORMATS)
def test_engine_matches_naive_reference(fmt_name):
    """Token-identical to the naive procedure under greedy decoding, for every budget kind, n=2 samples of
    prompts of different lengths decoded in one batch; and the cases exercise every rule."""
    model, tok = nudged_model(fmt_name)
    engine, fmt = TorchEngine(model, tok), get_format(fmt_name)
    prompts = [fmt.prompt(p) for p in PROMPTS]
    sampling = Sampling(temperature=0, max_tokens=48)
    seen = set()
    for name, budget in BUDGETS.items():
        outs = engine.generate(prompts, sampling, n=2, budget=budget, fmt=fmt)
        assert_matches_naive(outs, prompts, model, tok, fmt, budget, sampling.max_tokens, name)
        for got in outs:
            seen.add(("forced", got.meta["forced"]))
            seen.add(("closed by the model", not got.meta["forced"] and fmt.think_close in got.text))
            seen.add(("delimiter removed", got.meta["closes_removed"] > 0))
            seen.add(("end-of-text while thinking", got.extensions > got.meta["closes_removed"]))
            seen.add(got.meta["stopped_by"])
    wanted = {("forced", True), ("closed by the model", True), ("delimiter removed", True),
              ("end-of-text while thinking", True), "max_answer_tokens"}
    assert wanted <= seen, wanted - seen


# --- bounds under sampling -------------------------------------------------------------------------------------------
def sampled_thinking(tok, o, close: str) -> int:
    """Recount the sampled tokens in the thinking: tokens whose text ends before the first closing delimiter."""
    thinking_chars = o.text.find(close) if close in o.text else len(o.text)
    k = 0
    while k < len(o.token_ids) and len(tok.decode(o.token_ids[: k + 1], skip_special_tokens=False)) <= thinking_chars:
        k += 1
    return sum(o.sampled[:k])


def check_bounds_when_sampling(engine, tok, fmt) -> None:
    """Sampled (temperature 1) budget-forced completions keep every bound, and the counts match a recount."""
    budget = Budget(min_thinking_tokens=8, max_thinking_tokens=40, extensions=1, max_answer_tokens=6)
    prompts = [fmt.prompt(p) for p in PROMPTS]
    outs = engine.generate(prompts, Sampling(temperature=1.0, max_tokens=200, seed=1), n=24, budget=budget, fmt=fmt)
    assert len(outs) == 72
    for o in outs:
        assert o.finish_reason != "length" or o.meta["stopped_by"] == "max_answer_tokens"
        assert budget.min_thinking_tokens <= o.thinking_tokens <= budget.max_thinking_tokens
        assert o.extensions >= budget.extensions or o.meta["forced"]
        assert o.thinking_tokens == sampled_thinking(tok, o, fmt.think_close)
        assert o.answer_tokens <= budget.max_answer_tokens
        assert sum(o.sampled) <= o.meta["sampled_tokens"] <= 200
    assert len({tuple(o.token_ids) for o in outs}) > 60  # the samples differ
    assert any(o.meta["closes_removed"] for o in outs) and any(o.meta["forced"] for o in outs)


@pytest.mark.parametrize("fmt_name", FORMATS)
def test_thinking_stays_within_bounds_when_sampling(fmt_name):
    model, tok = nudged_model(fmt_name, eos_strength=6.0)
    check_bounds_when_sampling(TorchEngine(model, tok), tok, get_format(fmt_name))
