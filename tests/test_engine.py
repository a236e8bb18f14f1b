"""The torch engine samples correctly: checked against plain full forwards of the model (no cache).

The model is the random `test` preset tiny Qwen2 in float64 with an untied output layer of large random
weights, so that its greedy text is varied (not one repeated token), it sometimes writes end-of-text, and
float rounding cannot break argmax ties differently in the batched and the plain forward.
"""

import math

import pytest
import torch
from pydantic import ValidationError

from budgetthink.engine import Budget, Sampling, load_engine
from budgetthink.engine.torch import TorchEngine, room
from budgetthink.errors import UserError
from budgetthink.formats import get_format
from budgetthink.tiny import init_model

PROMPTS = ["3 5 7 -> 22\n<think>", "12+7=", "Using the numbers [1, 2, 3], make 6.\n<think>"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest.py)


@pytest.fixture(scope="module")
def model_tok():
    model, tok = init_model("test", seed=0)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(
        0.35 * torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(1)))
    return model.double().eval(), tok


@pytest.fixture(scope="module")
def engine(model_tok):
    return TorchEngine(*model_tok)


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Last-position logits of a plain forward over the whole sequence, no cache."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def plain_greedy(model, tok, prompt: str, max_tokens: int, stop_ids=None) -> list[int]:
    ids, out = tok.encode(prompt), []
    for _ in range(max_tokens):
        x = int(full_logits(model, ids + out).argmax())
        out.append(x)
        if x in (stop_ids or [tok.eos_token_id]):
            break
    return out


def test_greedy_equals_argmax_of_full_forward(model_tok, engine):
    model, tok = model_tok
    outs = engine.generate(PROMPTS, Sampling(temperature=0, max_tokens=40))
    for prompt, o in zip(PROMPTS, outs):
        want = plain_greedy(model, tok, prompt, 40)
        assert o.token_ids == want
        assert o.sampled == [True] * len(want)
        assert o.finish_reason == ("stop" if want[-1] == tok.eos_token_id else "length")
        assert o.text == tok.decode([t for t in want if t != tok.eos_token_id])
    assert len({tuple(o.token_ids) for o in outs}) == 3 and len(set(outs[0].token_ids)) > 5  # varied text


def test_batch_of_different_lengths_equals_each_prompt_alone(engine):
    s = Sampling(temperature=0, max_tokens=30)
    together = engine.generate(PROMPTS, s, n=2)
    for i, prompt in enumerate(PROMPTS):
        alone = engine.generate([prompt], s)[0]
        assert together[2 * i].token_ids == alone.token_ids == together[2 * i + 1].token_ids
        assert together[2 * i].prompt_index == i


def test_seeded_sampling_is_reproducible(engine):
    s = Sampling(temperature=1.0, max_tokens=30, seed=7)
    a = engine.generate(PROMPTS, s, n=4)
    b = engine.generate(PROMPTS, s, n=4)
    c = engine.generate(PROMPTS, Sampling(temperature=1.0, max_tokens=30, seed=8), n=4)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.logprobs for o in a] == [o.logprobs for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    assert len({tuple(o.token_ids) for o in a[:4]}) > 1  # the n samples of one prompt differ


def test_top_k_1_equals_greedy(engine):
    greedy = engine.generate(PROMPTS, Sampling(temperature=0, max_tokens=30))
    top1 = engine.generate(PROMPTS, Sampling(temperature=1.3, top_k=1, max_tokens=30, seed=3))
    assert [o.token_ids for o in greedy] == [o.token_ids for o in top1]
    assert all(lp == 0.0 for o in top1 for lp in o.logprobs)  # a point mass


def test_logprobs_at_temperature_1_equal_full_forward_log_softmax(model_tok, engine):
    model, tok = model_tok
    outs = engine.generate(PROMPTS, Sampling(temperature=1.0, max_tokens=25, seed=0), n=2)
    for o in outs:
        ids = tok.encode(PROMPTS[o.prompt_index])
        for j, (t, lp) in enumerate(zip(o.token_ids, o.logprobs)):
            want = torch.log_softmax(full_logits(model, ids + o.token_ids[:j]), -1)[t].item()
            assert lp == pytest.approx(want, abs=1e-6)


def test_logprobs_under_temperature_top_k_top_p(model_tok, engine):
    """The log-prob is under the distribution actually sampled from, computed here independently."""
    model, tok = model_tok
    T, k, p = 0.7, 8, 0.8
    outs = engine.generate(PROMPTS[:2], Sampling(temperature=T, top_k=k, top_p=p, max_tokens=15, seed=0), n=3)
    for o in outs:
        ids = tok.encode(PROMPTS[o.prompt_index])
        for j, (t, lp) in enumerate(zip(o.token_ids, o.logprobs)):
            probs = torch.softmax(full_logits(model, ids + o.token_ids[:j]) / T, -1).tolist()
            ranked = sorted(range(len(probs)), key=lambda i: -probs[i])[:k]  # top-k ...
            mass = sum(probs[i] for i in ranked)
            kept, acc = [], 0.0
            for i in ranked:  # ... then the smallest head of them holding p of their mass
                kept.append(i)
                acc += probs[i] / mass
                if acc >= p:
                    break
            assert t in kept
            want = math.log(probs[t] / sum(probs[i] for i in kept))
            assert lp == pytest.approx(want, abs=1e-6)


def test_sample_draws_tokens_at_their_probabilities():
    """`sample` (inverse CDF) against the softmax written out: a chi-square test over 40,000 draws of a
    12-token distribution (11 degrees of freedom, critical value 31.26 at p = 0.001), top-k and top-p
    leaving the filtered tokens never drawn; and on a 49,152-token vocabulary, where a float32 running sum
    would lose mass, half the mass on the last token and a quarter on the first half of the vocabulary."""
    from budgetthink.engine.torch import sample

    draws = 40_000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, 3.0, 0.2, -3.0, 1.5])
    probs = [math.exp(v) / sum(math.exp(w) for w in logits.tolist()) for v in logits.tolist()]
    x, lp = sample(logits.repeat(draws, 1), Sampling(temperature=1.0), torch.Generator().manual_seed(0))
    counts = torch.bincount(x, minlength=12).tolist()
    assert sum((c - draws * q) ** 2 / (draws * q) for c, q in zip(counts, probs)) < 31.26
    assert torch.allclose(lp, torch.tensor([math.log(probs[i]) for i in x.tolist()]), atol=1e-5)
    x, _ = sample(logits.repeat(draws, 1), Sampling(temperature=1.0, top_k=3), torch.Generator().manual_seed(0))
    assert set(x.tolist()) == {0, 8, 11}  # the three largest logits
    # top_p 0.5: 3.0 holds 0.51 of the mass, so it alone is kept
    x, lp = sample(logits.repeat(100, 1), Sampling(temperature=1.0, top_p=0.5), torch.Generator().manual_seed(0))
    assert set(x.tolist()) == {8} and torch.allclose(lp, torch.zeros(100))

    # a draw that rounds up to the whole mass takes the last token that has mass, never a filtered one
    real_rand = torch.rand
    try:
        torch.rand = lambda *a, **k: real_rand(*a, **k).fill_(1.0)
        x, lp = sample(logits.repeat(4, 1), Sampling(temperature=1.0, top_k=3), None)
    finally:
        torch.rand = real_rand
    assert x.tolist() == [11] * 4 and torch.allclose(lp, torch.full((4,), math.log(probs[11] / (
        probs[0] + probs[8] + probs[11]))))

    V = 49_152
    big = torch.zeros(V)
    big[-1] = math.log(V - 1)  # the last token weighs as much as all the others together
    g = torch.Generator().manual_seed(1)
    x = torch.cat([sample(big.repeat(2000, 1), Sampling(temperature=1.0), g)[0] for _ in range(10)])
    last, first_half = (x == V - 1).float().mean().item(), (x < V // 2).float().mean().item()
    assert abs(last - 0.5) < 0.015 and abs(first_half - 0.25) < 0.015  # 20,000 draws: 3 standard deviations 0.011


def test_n_samples_share_one_prefill(model_tok):
    model, tok = model_tok
    engine = TorchEngine(model, tok)
    batches = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: batches.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        engine.generate(PROMPTS, Sampling(temperature=1.0, max_tokens=10, seed=0), n=5)
    finally:
        hook.remove()
    longest = max(len(tok.encode(p)) for p in PROMPTS)
    assert batches[0] == (3, longest)  # one prefill row per prompt
    assert all(b == (15, 1) for b in batches[1:])  # then 3 x 5 rows, one token each


def test_finished_rows_leave_the_batch(model_tok):
    model, tok = model_tok
    digits = tok.encode("0123456789")  # taken as end-of-text here, so that rows end at many different steps
    engine = TorchEngine(model, tok, eos_token_ids=digits)
    rows = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: rows.append(kw["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        outs = engine.generate(PROMPTS, Sampling(temperature=1.0, max_tokens=60, seed=0), n=16)
    finally:
        hook.remove()
    stopped = sum(o.finish_reason == "stop" for o in outs)
    assert stopped >= 8  # enough rows end early for the test to mean something
    assert rows[1] == 48 and min(rows[1:]) < 48 and rows == [rows[0]] + sorted(rows[1:], reverse=True)
    for o in outs:
        assert len(o.token_ids) == 60 or (o.token_ids[-1] in digits and not set(o.token_ids[:-1]) & set(digits))


def test_rows_dropped_and_cache_grown_mid_run_keep_exact_outputs(model_tok):
    """Rows leave the batch at different steps (the cache keeps only the live rows' used positions; with n = 2
    the prompts whose rows are all done leave the shared prefix) and the rest run past the room left after the
    prefill (the cache grows): every row still equals the plain forward's."""
    model, tok = model_tok
    stop = tok.encode("0123456789")
    engine = TorchEngine(model, tok, eos_token_ids=stop)
    prompts = PROMPTS + [p[::-1] for p in PROMPTS] + ["1 2 3 -> 6\n<think>", "no digits here", "(", "9"]
    outs = engine.generate(prompts, Sampling(temperature=0, max_tokens=150))
    pairs = engine.generate(prompts, Sampling(temperature=0, max_tokens=150), n=2)
    lengths, totals = [], []
    for i, (prompt, o) in enumerate(zip(prompts, outs)):
        want = plain_greedy(model, tok, prompt, 150, stop)
        assert o.token_ids == want == pairs[2 * i].token_ids == pairs[2 * i + 1].token_ids, prompt
        lengths.append(len(want))
        totals.append(len(tok.encode(prompt)) + len(want))
    longest_prompt = max(len(tok.encode(p)) for p in prompts)
    after_prefill = longest_prompt + room(longest_prompt)  # the cache's capacity once the prefill's rows are kept
    assert min(lengths) < 20 and max(totals) > 2 * after_prefill  # some rows leave early, some outgrow the cache


def test_stop_strings(model_tok, engine):
    tok = model_tok[1]
    free = engine.generate(PROMPTS, Sampling(temperature=0, max_tokens=40))
    for i, o in enumerate(free):
        stop = o.text[10:12]
        cut = next(j for j in range(1, len(o.token_ids) + 1) if stop in tok.decode(o.token_ids[:j]))
        got = engine.generate([PROMPTS[i]], Sampling(temperature=0, max_tokens=40, stop=["@@never", stop]))[0]
        assert got.token_ids == o.token_ids[:cut]
        assert got.finish_reason == "stop" and got.meta["stopped_by"] == "stop_string"
        assert got.text.endswith(stop)


def test_stop_strings_only_in_the_answer_under_a_budget(engine):
    fmt = get_format("tinyzero")
    free = engine.generate(PROMPTS[:1], Sampling(temperature=0, max_tokens=40), budget=Budget(max_thinking_tokens=12),
                           fmt=fmt)[0]
    thinking, answer = fmt.split(free.text)
    stop = thinking[3:5]
    assert stop not in answer[:4]
    got = engine.generate(PROMPTS[:1], Sampling(temperature=0, max_tokens=40, stop=[stop]),
                          budget=Budget(max_thinking_tokens=12), fmt=fmt)[0]
    assert got.text.startswith(free.text[: len(thinking) + 8])  # not stopped in the thinking


def test_max_batch_splits_without_changing_results(model_tok):
    model, tok = model_tok
    s = Sampling(temperature=0, max_tokens=20)
    big = TorchEngine(model, tok).generate(PROMPTS, s, n=2)
    small = TorchEngine(model, tok, max_batch=2).generate(PROMPTS, s, n=2)
    assert [o.token_ids for o in big] == [o.token_ids for o in small]
    assert [o.prompt_index for o in small] == [0, 0, 1, 1, 2, 2]


def test_loads_a_model_directory(tmp_path):
    model, tok = init_model("test", seed=0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    engine = load_engine(str(tmp_path), backend="torch", device="cpu")
    want = engine.generate(PROMPTS[:1], Sampling(temperature=0, max_tokens=8))[0]
    again = TorchEngine(model.eval(), tok).generate(PROMPTS[:1], Sampling(temperature=0, max_tokens=8))[0]
    assert want.token_ids == again.token_ids


def test_bf16_runs(model_tok):
    model, tok = init_model("test", seed=0)
    engine = TorchEngine(model.to(torch.bfloat16).eval(), tok)
    outs = engine.generate(PROMPTS, Sampling(temperature=1.0, max_tokens=10, seed=0), n=2)
    assert all(len(o.token_ids) >= 1 and all(math.isfinite(lp) for lp in o.logprobs) for o in outs)


# --- bad input ------------------------------------------------------------------------------------------------------
def test_bad_input_is_a_user_error(engine, tmp_path):
    with pytest.raises(UserError, match="not found"):
        TorchEngine(tmp_path / "nope")
    with pytest.raises(UserError, match="context"):
        engine.generate(["x" * 1024], Sampling(max_tokens=4))
    with pytest.raises(UserError, match="cannot encode"):
        engine.generate(PROMPTS[:1], Sampling(max_tokens=4), budget=Budget(extensions=1, extension_string="Wait\u00e9"),
                        fmt=get_format("tinyzero"))
    with pytest.raises(UserError, match="think format"):
        engine.generate(PROMPTS[:1], Sampling(max_tokens=4), budget=Budget(max_thinking_tokens=3))
    with pytest.raises(ValidationError, match="above"):
        Budget(min_thinking_tokens=10, max_thinking_tokens=5)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        Budget(max_thinking_tokens=-1)


@pytest.mark.parametrize("field", ["max_thinking_tokens", "min_thinking_tokens", "extensions", "max_answer_tokens"])
def test_budget_bounds_are_validation_errors(field):
    """A count beyond TOKENS_MAX (10**30: past int64) is a clean validation error naming the field, one line
    through the CLI's explain, never an OverflowError in a tensor."""
    from budgetthink.budget import TOKENS_MAX
    from budgetthink.config import explain

    for bad in (10**30, TOKENS_MAX + 1):
        with pytest.raises(ValidationError) as e:
            Budget(**{field: bad})
        err = explain(Budget, e.value, "budget flags")
        assert f"{field}: must be <= {TOKENS_MAX}" in str(err) and "\n" not in str(err)
    assert getattr(Budget(**{field: TOKENS_MAX}), field) == TOKENS_MAX


def test_largest_budget_runs(engine):
    """The largest valid counts go through the engine's tensor arithmetic (no overflow): the answer cap never
    fires, max_tokens ends the rows."""
    from budgetthink.budget import TOKENS_MAX

    fmt = get_format("tinyzero")
    budget = Budget(max_thinking_tokens=TOKENS_MAX, min_thinking_tokens=TOKENS_MAX, max_answer_tokens=TOKENS_MAX)
    outs = engine.generate(PROMPTS, Sampling(temperature=0, max_tokens=12), budget=budget,
                           fmt=fmt)
    assert all(o.meta["stopped_by"] == "max_tokens" and o.meta["sampled_tokens"] == 12 for o in outs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_prefix_attention_equals_softmax_over_prefix_and_own_keys(dtype):
    """The shared-prefix attention (prompt keys kept once per prompt, rows on a grid with holes, one prompt
    with an empty prefix) equals one plain softmax over [the row's prompt prefix, the row's own keys]."""
    from types import SimpleNamespace

    from budgetthink.engine.torch import prefix_attention

    g = torch.Generator().manual_seed(0)
    Pp, n, Hkv, G, D, S, T = 3, 4, 2, 3, 8, 5, 6
    shared = torch.tensor([5, 0, 3])  # prefix lengths per prompt (prompt 1 has none)
    slot = torch.tensor([0, 2, 3, 5, 8, 9, 11])  # live rows on the [Pp, n] grid
    own = torch.tensor([6, 1, 4, 2, 6, 3, 5])  # valid own keys per row
    B = len(slot)
    q, k, v = (torch.randn(*shape, generator=g, dtype=torch.float64)
               for shape in ((B, Hkv, G, D), (B, Hkv, T, D), (B, Hkv, T, D)))
    pk, pv = torch.randn(Pp, Hkv, S, D, generator=g, dtype=torch.float64), torch.randn(Pp, Hkv, S, D, generator=g,
                                                                                        dtype=torch.float64)
    mask = (torch.arange(T)[None, :] < own[:, None])[:, None, None, :]
    cache = SimpleNamespace(pk=[pk.to(dtype)], pv=[pv.to(dtype)], n=n, slot=slot,
                            pmask=torch.arange(S)[None, :] < shared[:, None])
    got = prefix_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, 0.3, cache, 0).double()
    for b in range(B):
        p = int(slot[b]) // n
        keys = torch.cat([pk[p, :, : shared[p]], k[b, :, : own[b]]], 1)  # [Hkv, S_p + T_b, D]
        values = torch.cat([pv[p, :, : shared[p]], v[b, :, : own[b]]], 1)
        want = torch.softmax(q[b] @ keys.transpose(-1, -2) * 0.3, -1) @ values  # [Hkv, G, D]
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
        assert torch.allclose(got[b], want, atol=tol), (b, (got[b] - want).abs().max())


# --- the rule core over several tokens at once (how the vLLM engine calls it) ---------------------------------------
def scripted_model(tok, fmt, salt: int):
    """A stand-in model: the next token is a deterministic function of the sequence. It writes the format's
    closing delimiter now and then (token by token, usually to the end, for `</think>` also as its characters)
    and end-of-text, so every rule fires."""
    import random

    scripts = [tok.encode(fmt.think_close, add_special_tokens=False)]
    if fmt.think_close == "</think>":
        scripts.append([tok.convert_tokens_to_ids(c) for c in "</think>"])
    plain = tok.encode("abc 12+=*", add_special_tokens=False)

    def next_token(seq: list[int]) -> int:
        rnd = random.Random(hash((salt, len(seq), tuple(seq[-6:]))))
        for script in scripts:  # go on with a delimiter being written
            for k in range(min(len(script) - 1, len(seq)), 0, -1):
                if seq[-k:] == script[:k] and rnd.random() < 0.9:
                    return script[k]
        u = rnd.random()
        return rnd.choice(scripts)[0] if u < 0.06 else tok.eos_token_id if u < 0.09 else rnd.choice(plain)

    return next_token


def drive(tok, fmt, budget, sampling, prompts, next_token, windows, context: int):
    """Decode `prompts` with Forcing alone: each round every live row samples up to windows() tokens (at most
    Forcing.room, stopping after an end-of-text, as a vLLM round does) and Forcing.advance takes them all."""
    from budgetthink.budget import Forcing

    B = len(prompts)
    forcing = Forcing(tok, fmt, budget, sampling, [tok.eos_token_id], rows=B, vocab=len(tok), device="cpu",
                      context=context)
    plen = torch.tensor([len(p) for p in prompts])
    start = forcing.start_ids(plen)
    outs, sampled = [list(start) for _ in prompts], [[False] * len(start) for _ in prompts]
    while bool(forcing.live.any()):
        new = torch.zeros(B, dtype=torch.long)
        for r in forcing.live.nonzero().flatten().tolist():
            room = forcing.room(r, len(outs[r]), len(prompts[r]))
            assert room >= 1  # a live row can always sample
            for _ in range(min(windows(), room)):
                x = next_token(prompts[r] + outs[r])
                outs[r].append(x)
                sampled[r].append(True)
                new[r] += 1
                if x == tok.eos_token_id:
                    break
        width = max(map(len, outs))
        buf = torch.tensor([o + [0] * (width - len(o)) for o in outs])
        for r, (drop, ins) in forcing.advance(buf, torch.tensor([len(o) for o in outs]), new, plen).items():
            del outs[r][len(outs[r]) - drop:], sampled[r][len(sampled[r]) - drop:]
            outs[r] += ins
            sampled[r] += [False] * len(ins)
    return [(outs[r], sampled[r], forcing.counts(r)) for r in range(B)]


@pytest.mark.parametrize("fmt_name", ["tinyzero", "s1", "r1"])
def test_advance_over_many_tokens_equals_one_at_a_time(model_tok, fmt_name):
    """Forcing.advance given a round of k tokens per row (the vLLM engine) gives exactly what it gives fed one
    token per step (the torch engine, checked against the naive reference in test_budget_exact): outputs,
    inserted flags, counts, finish reasons, for every budget kind, stop strings, and a context cap."""
    import random

    tok = model_tok[1]
    fmt = get_format(fmt_name)
    prompts = [tok.encode(fmt.prompt(p)) for p in ("3 5 7 -> 22\n", "12+7=", "Using the numbers [1, 2], make 3.\n")]
    budgets = [None, Budget(max_thinking_tokens=12, max_answer_tokens=6), Budget(min_thinking_tokens=20),
               Budget(extensions=2, extension_string=" Hmm,", max_answer_tokens=9),
               Budget(min_thinking_tokens=8, max_thinking_tokens=30, extensions=1, answer_prefix="A: "),
               Budget(max_thinking_tokens=0, max_answer_tokens=5)]
    seen = set()
    for salt in range(4):
        next_token = scripted_model(tok, fmt, salt)
        for budget in budgets:
            for sampling in (Sampling(max_tokens=70), Sampling(max_tokens=90, stop=["2+", "zz"])):
                for context in (1024, 80):
                    want = drive(tok, fmt, budget, sampling, prompts, next_token, lambda: 1, context)
                    rnd = random.Random(salt)
                    got = drive(tok, fmt, budget, sampling, prompts, next_token, lambda r=rnd: r.randint(0, 12), context)
                    assert got == want, (fmt_name, salt, budget, sampling, context)
                    seen |= {c["meta"]["stopped_by"] for _, _, c in want}
                    seen |= {"forced" for _, _, c in want if c["meta"]["forced"]}
                    seen |= {"removed" for _, _, c in want if c["meta"]["closes_removed"]}
    assert {"eos", "stop_string", "max_tokens", "max_answer_tokens", "context", "forced", "removed"} <= seen, seen


def test_onednn_linears_compute_the_same_products_and_repack_when_weights_change():
    """In fp32 on the CPU the engine's linear layers run through oneDNN on packed weights: the same products
    (to fp32 rounding), a new pack after an optimizer step, nothing patched with gradients on or after."""
    from budgetthink.engine.torch import OneDNNLinears

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    lin, small = torch.nn.Linear(512, 512), torch.nn.Linear(512, 8, bias=False)
    model = torch.nn.Sequential(lin, torch.nn.ReLU(), small)
    x = torch.randn(3, 5, 512)
    want = model(x).detach()
    linears = OneDNNLinears(model)
    with torch.inference_mode():
        with linears:
            assert "forward" in vars(lin)  # routed through oneDNN
            assert "forward" not in vars(small)  # too small to gain: torch's own
            got = model(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(lin)
    with torch.no_grad():
        lin.weight.mul_(-2.0)  # an in-place update, as an optimizer makes
    want = model(x).detach()
    with torch.inference_mode(), linears:
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)  # repacked, not the stale pack
    with linears:  # gradients on: the layers stay torch's own
        assert "forward" not in vars(lin)
        assert model(x).requires_grad


def test_engine_logits_through_onednn_equal_torch_linear(monkeypatch):
    from budgetthink.engine.torch import OneDNNLinears

    monkeypatch.setattr(OneDNNLinears, "MIN_WEIGHT", 0)  # the test model's layers are all small
    m32, tok = init_model("test", seed=0)
    eng = TorchEngine(m32.eval(), tok)
    assert eng._linears.layers
    s = Sampling(temperature=1.0, max_tokens=12, seed=5)
    ours = eng.generate(PROMPTS, s, n=2)
    eng._linears.on = False
    plain = eng.generate(PROMPTS, s, n=2)
    for a, b in zip(ours, plain):  # the same draws from distributions equal to fp32 rounding
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
