"""Continuous batching (serve/scheduler.py): requests with different settings decode in one batch and give what
the engine gives each alone; a request joins between steps and leaves when done; a client that disconnects or
runs out of time frees its rows at once; the queue is first come, first served; joiners gather to share a
prefill."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_serve import NAME, Server, error_of

from budgetthink import engine as engines
from budgetthink.engine import Budget, Sampling
from budgetthink.formats import get_format
from budgetthink.serve import create_app

FMT = get_format("tinyzero")
LONG = {"model": NAME, "prompt": "1", "max_tokens": 400, "min_thinking_tokens": 390, "temperature": 1.0}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return engines.load_engine(str(tiny_model_dir), backend="torch")


@pytest.fixture
def slow(engine):
    """The engine with every forward 5 ms slower, so a long request is still running when the test looks."""
    forward = engine._forward
    engine._forward = lambda *args: (time.sleep(0.005), forward(*args))[1]
    yield engine
    del engine._forward


def wait_for(server, metric: str, check, seconds: float = 20):
    deadline = time.time() + seconds
    while not check(server.metric(metric)):
        assert time.time() < deadline, f"{metric} = {server.metric(metric)}"
        time.sleep(0.01)


# each: (request fields, the engine call that must give the same completions alone)
CASES = [
    ({"prompt": "3*4=", "max_tokens": 24, "temperature": 0}, {}),
    ({"prompt": "12+7=", "max_tokens": 9, "temperature": 1e-300}, {}),
    ({"prompt": "5*5=", "max_tokens": 30, "temperature": 0, "max_thinking_tokens": 0}, {"max_thinking_tokens": 0}),
    ({"prompt": "8-3=", "max_tokens": 40, "temperature": 0, "max_thinking_tokens": 6, "answer_prefix": "A:"},
     {"max_thinking_tokens": 6, "answer_prefix": "A:"}),
    ({"prompt": "9*9=", "max_tokens": 48, "temperature": 0, "min_thinking_tokens": 12, "max_thinking_tokens": 16},
     {"min_thinking_tokens": 12, "max_thinking_tokens": 16}),
    ({"prompt": "7+1=", "max_tokens": 40, "temperature": 0, "min_thinking_tokens": 10, "thinking_extensions": 2,
      "extension_string": "Hmm"}, {"min_thinking_tokens": 10, "extensions": 2, "extension_string": "Hmm"}),
    ({"prompt": ["2+2=", "6*7="], "n": 2, "max_tokens": 14, "temperature": 0, "stop": ["1", "2"]}, {}),
    # seeded sampling, two requests of the same settings (sampled in one call, each from its own seed)
    ({"prompt": "4+4=", "max_tokens": 20, "temperature": 1.0, "seed": 7}, {}),
    ({"prompt": "6+1=", "max_tokens": 16, "temperature": 1.0, "seed": 8, "max_thinking_tokens": 5},
     {"max_thinking_tokens": 5}),
]


def alone(engine, req: dict, budget: dict):
    prompts = [req["prompt"]] if isinstance(req["prompt"], str) else req["prompt"]
    sampling = Sampling(temperature=req["temperature"], max_tokens=req["max_tokens"], stop=req.get("stop", []),
                        seed=req.get("seed"))
    return engine.generate([p + FMT.think_open for p in prompts], sampling, n=req.get("n", 1),
                           budget=Budget(**budget, max_answer_tokens=req["max_tokens"]), fmt=FMT)


def test_mixed_settings_share_steps_and_match_the_engine_alone(engine):
    with Server(create_app(engine, NAME, FMT, max_batch=16)) as s:
        steps, rows = s.metric("budgetthink_batches_total"), s.metric("budgetthink_batch_rows_total")
        go = threading.Barrier(len(CASES))

        def send(req):
            go.wait()
            return s.http.post("/v1/completions", json={"model": NAME, **req})

        with ThreadPoolExecutor(len(CASES)) as pool:
            responses = list(pool.map(send, [req for req, _ in CASES]))
        per_step = (s.metric("budgetthink_batch_rows_total") - rows) / (s.metric("budgetthink_batches_total") - steps)
    for (req, budget), r in zip(CASES, responses):
        assert r.status_code == 200, r.text
        want = alone(engine, req, budget)
        got = r.json()["choices"]
        assert [c["text"] for c in got] == [c.text for c in want], req
        assert r.json()["usage"]["completion_tokens"] == sum(len(c.token_ids) for c in want)
        assert r.json()["usage"]["completion_tokens_details"]["reasoning_tokens"] == sum(c.thinking_tokens for c in want)
    assert per_step >= 3, per_step  # they ran together, not one after another


def test_a_request_joins_between_steps_and_leaves_when_done(slow):
    with Server(create_app(slow, NAME, FMT, max_batch=8)) as s, ThreadPoolExecutor(1) as pool:
        long = pool.submit(s.http.post, "/v1/completions", json=LONG)
        wait_for(s, "budgetthink_running_rows", lambda v: v == 1)
        steps = s.metric("budgetthink_batches_total")
        short = s.http.post("/v1/completions", json={"model": NAME, "prompt": "2", "max_tokens": 3})
        assert short.status_code == 200 and not long.done()  # joined the running batch and left it before the long one
        assert s.metric("budgetthink_running_rows") == 1 and s.metric("budgetthink_batches_total") > steps
        assert long.result().status_code == 200


def test_disconnect_and_timeout_free_rows_at_once(slow):
    with Server(create_app(slow, NAME, FMT, max_batch=8)) as s:
        chat = {**{k: v for k, v in LONG.items() if k != "prompt"}, "messages": [{"role": "user", "content": "1"}],
                "stream": True}
        with httpx.Client(base_url=s.url) as client, client.stream("POST", "/v1/chat/completions", json=chat) as resp:
            lines = resp.iter_lines()  # kept: a dropped line iterator closes httpx's connection
            next(lines)  # the role chunk: the request is in
            wait_for(s, "budgetthink_running_rows", lambda v: v == 1)
        # (leaving the client closes its connection: the server sees the disconnect)
        wait_for(s, "budgetthink_running_rows", lambda v: v == 0, seconds=2)  # the stream was closed mid-way
        with pytest.raises(httpx.ReadTimeout):
            s.http.post("/v1/completions", json={**LONG, "n": 3}, timeout=0.5)
        wait_for(s, "budgetthink_running_rows", lambda v: v == 0, seconds=2)
    with Server(create_app(slow, NAME, FMT, request_timeout=0.3)) as s:
        assert error_of(s.http.post("/v1/completions", json=LONG), 504)["code"] == "request_timeout"
        wait_for(s, "budgetthink_running_rows", lambda v: v == 0, seconds=2)


def test_queue_is_first_come_first_served_and_bounded(slow):
    with Server(create_app(slow, NAME, FMT, max_batch=2, max_queue=2)) as s, ThreadPoolExecutor(4) as pool:
        first = pool.submit(s.http.post, "/v1/completions", json={**LONG, "max_tokens": 200, "min_thinking_tokens": 190})
        wait_for(s, "budgetthink_running_rows", lambda v: v == 1)
        wide = pool.submit(s.http.post, "/v1/completions", json={**LONG, "n": 2, "max_tokens": 4,
                                                                  "min_thinking_tokens": 0})
        wait_for(s, "budgetthink_queue_depth", lambda v: v == 1)  # needs 2 rows, 1 is free: it waits
        small = pool.submit(s.http.post, "/v1/completions", json={"model": NAME, "prompt": "3", "max_tokens": 2})
        wait_for(s, "budgetthink_queue_depth", lambda v: v == 2)  # behind it, though a row is free
        r = s.http.post("/v1/completions", json={"model": NAME, "prompt": "4", "max_tokens": 2})
        assert error_of(r, 429)["code"] == "queue_full" and r.headers["Retry-After"] == "1"
        assert not small.done()  # never overtakes the older, wider request
        assert [f.result().status_code for f in (first, wide, small)] == [200, 200, 200]


def test_joiners_gather_to_share_a_prefill(engine):
    """While a request decodes, a lone joiner waits up to JOIN_PATIENCE steps for company; joiners enough to
    fill an eighth of the batch are admitted at once, in one prefill."""
    import asyncio
    import types

    import torch

    from budgetthink.serve.jobs import Job
    from budgetthink.serve.scheduler import JOIN_PATIENCE, Scheduler

    loop = asyncio.new_event_loop()
    ids = engine.tokenizer.encode("3 5 7 -> 22\n" + FMT.think_open)
    s = Scheduler(engine, FMT, types.SimpleNamespace(engine_seconds=0.0, batches=0, batch_rows=0), max_batch=32)
    prefills = []
    forward = s.forward
    s.forward = lambda cache, ids_, k, cache_len: (prefills.append(len(ids_)) if ids_.shape[1] > 1 else None,
                                                   forward(cache, ids_, k, cache_len))[1]

    def job(n=1):
        return Job([ids], n, Sampling(temperature=0, max_tokens=200), Budget(min_thinking_tokens=150,
                   max_thinking_tokens=190), loop.create_future())

    def tick():
        s.join()
        s.step()

    with torch.inference_mode():
        s.submit(job())
        tick()  # the first request starts at once: nothing else is running
        assert [g.rows for g in s.groups] == [1]
        s.submit(job())
        for _ in range(JOIN_PATIENCE):
            tick()
            assert len(s.groups) == 1 and len(s.waiting) == 1  # held back, waiting for company
        tick()
        assert len(s.groups) == 2 and not s.waiting  # its patience ran out: admitted alone
        s.submit(job(2))
        s.submit(job(2))  # four rows together: an eighth of 32
        tick()
        assert len(s.groups) == 4 and not s.waiting
    assert prefills == [1, 1, 2]  # rows per prefill: the first, the lone joiner, then two requests together
    loop.close()
