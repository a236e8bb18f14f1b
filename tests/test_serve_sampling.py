"""Sampling at extreme temperatures: below GREEDY_BELOW it is greedy (1e-300 used to overflow logits / T to
inf and NaN, and gave only <|pad|> tokens)."""

import pytest
import torch
from test_serve import NAME, Server

from budgetthink import engine as engines
from budgetthink.engine import Sampling
from budgetthink.engine.torch import GREEDY_BELOW, sample
from budgetthink.formats import get_format
from budgetthink.serve import create_app

FMT = get_format("tinyzero")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_temperatures_sample_the_argmax(dtype):
    logits = torch.randn(64, 101, generator=torch.Generator().manual_seed(0), dtype=dtype) * 8
    greedy = logits.argmax(-1)
    for t in (1e-300, 5e-324, GREEDY_BELOW / 2):
        x, lp = sample(logits, Sampling(temperature=t), torch.Generator().manual_seed(1))
        assert torch.equal(x, greedy) and torch.isfinite(lp).all()
        assert torch.allclose(lp, logits.log_softmax(-1).gather(-1, greedy[:, None])[:, 0])  # greedy's log-prob
    # just above the threshold it still samples (the race), and stays finite
    x, lp = sample(logits, Sampling(temperature=GREEDY_BELOW * 2), torch.Generator().manual_seed(1))
    assert torch.isfinite(lp).all() and bool((lp <= 0).all())


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return engines.load_engine(str(tiny_model_dir), backend="torch")


def test_temperature_1e_300_is_greedy_end_to_end(engine):
    prompt = ["3*4=" + FMT.think_open, "12+7=" + FMT.think_open]
    greedy = engine.generate(prompt, Sampling(temperature=0, max_tokens=24), fmt=FMT)
    tiny = engine.generate(prompt, Sampling(temperature=1e-300, max_tokens=24), fmt=FMT)
    assert [c.token_ids for c in tiny] == [c.token_ids for c in greedy]
    assert all(engine.pad not in c.token_ids for c in tiny)
    with Server(create_app(engine, NAME, FMT)) as s:
        body = {"model": NAME, "prompt": "3*4=", "max_tokens": 24}
        a = s.http.post("/v1/completions", json={**body, "temperature": 1e-300}).json()["choices"][0]["text"]
        b = s.http.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
    assert a == b == greedy[0].text
