"""A hypothesis fuzz of both completion endpoints: 1,000 generated requests, mostly near the schema (valid values
mixed with junk and extreme numbers), against a live server; every answer is below 500, every error is an
OpenAI error object, every stream ends in [DONE]."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import NAME, Server, error_of

from budgetthink.formats import get_format
from budgetthink.serve import create_app

FMT = get_format("tinyzero")
EXAMPLES = 1000

extreme = st.sampled_from([-1, 0, 2**31, 2**63, 10**30, -10**30, float("nan"), float("inf"), float("-inf"), True,
                           False, "16", "", None, [], {}])
junk = st.one_of(extreme, st.integers(-10**20, 10**20), st.floats(allow_nan=True), st.text(max_size=20),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
text = st.text(max_size=40) | st.sampled_from(["</think>", "<think>", "<|endoftext|>", "<|pad|>", "\ue000", "\x00"])
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer", "tool"]) | junk,
                                 "content": text | st.lists(st.fixed_dictionaries(
                                     {"type": st.just("text") | junk, "text": text}), max_size=3) | junk},
                                optional={"name": st.text(max_size=8) | junk})
valid_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "developer"]),
                                       "content": text | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                                       "text": text}), max_size=2)})
VALID = {  # values the schema accepts (small, so a valid request is quick)
    "max_tokens": st.integers(1, 6), "temperature": st.floats(0, 2) | st.sampled_from([1e-300, 5e-324]),
    "top_p": st.floats(0.01, 1), "top_k": st.integers(0, 200), "n": st.integers(1, 3),
    "stop": text.filter(bool) | st.lists(text.filter(bool), max_size=4), "seed": st.integers(0, 2**63 - 1),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "max_thinking_tokens": st.integers(0, 8), "min_thinking_tokens": st.integers(0, 4),
    "thinking_extensions": st.integers(0, 2), "extension_string": text, "answer_prefix": text,
}
NEAR = {"model": st.just(NAME) | junk, "messages": st.lists(message, max_size=3) | junk,
        "prompt": text | st.lists(text, max_size=3) | junk, "max_completion_tokens": st.integers(-2, 6) | junk,
        "user": st.text(max_size=8) | junk, "unknown_field": junk,
        **{k: v | st.integers(-2, 10) | junk for k, v in VALID.items()}}


@st.composite
def body_of(draw, path):
    """Mostly a valid request with a few fields replaced by junk; sometimes anything at all."""
    kind = draw(st.sampled_from(["valid", "near", "near", "junk"]))
    if kind == "junk":
        return draw(st.fixed_dictionaries({}, optional=NEAR) | junk)
    req = {"model": NAME, **({"messages": draw(st.lists(valid_message, min_size=1, max_size=3))}
                             if path == "/v1/chat/completions" else {"prompt": draw(text | st.lists(text, min_size=1, max_size=2))})}
    req.update(draw(st.fixed_dictionaries({}, optional=VALID)))
    if kind == "near":
        for key in draw(st.lists(st.sampled_from(sorted(NEAR)), min_size=1, max_size=3, unique=True)):
            req[key] = draw(NEAR[key])
    return req


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from budgetthink import engine as engines

    engine = engines.load_engine(str(tiny_model_dir), backend="torch")
    with Server(create_app(engine, NAME, FMT, max_batch=16)) as s:
        yield s


def test_fuzz_both_endpoints_never_5xx(server):
    seen = {"requests": 0, "ok": 0, "streams": 0}

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=st.data())
    def one(data):
        path = data.draw(st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
        body = data.draw(body_of(path))
        if isinstance(body, dict) and "max_completion_tokens" not in body:
            body.setdefault("max_tokens", 4)  # keep the valid requests small so the fuzz stays quick
        r = server.http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        seen["requests"] += 1
        assert r.status_code < 500, r.text
        if r.status_code >= 400:
            error_of(r, r.status_code)
        else:
            seen["ok"] += 1
            if body.get("stream") is True:
                seen["streams"] += 1
                assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text

    one()
    assert seen["requests"] >= EXAMPLES and seen["ok"] >= EXAMPLES // 10 and seen["streams"] > 0, seen
