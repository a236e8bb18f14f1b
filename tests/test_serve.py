"""The OpenAI-compatible server: the official `openai` client against it on 127.0.0.1, every bad-input case,
a bounded load test, disconnects, and SIGTERM draining."""

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from budgetthink import engine as engines
from budgetthink.engine import Budget, Sampling
from budgetthink.errors import UserError
from budgetthink.formats import get_format
from budgetthink.serve import create_app
from budgetthink.serve.api import EFFORT_BUDGETS
from budgetthink.serve.http import uvicorn_config

FMT = get_format("tinyzero")
NAME = "tiny"


class Server:
    """uvicorn serving `app` on a free loopback port, in a background thread."""

    def __init__(self, app, key: str | None = None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.app = app
        self.server = uvicorn.Server(uvicorn_config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, timeout=60, headers=headers)  # one client: making one costs ~0.1 s

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        self.http.close()

    def client(self, key="none", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60,
                             http_client=openai.DefaultHttpxClient(), **kw)

    def metric(self, name: str) -> float:
        text = self.http.get("/metrics").text
        return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))


class Gated:
    """The real engine behind a gate: generate() blocks until the test opens it (to hold a batch in flight)."""

    def __init__(self, engine):
        self.engine, self.gate, self.entered, self.calls = engine, threading.Event(), threading.Event(), 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts, *args, prompt_ids=None, **kwargs):
        self.calls += 1
        self.entered.set()
        assert self.gate.wait(30)
        prompts = [self.engine.tokenizer.decode(ids) for ids in prompt_ids]
        if any("refuse" in p for p in prompts):  # what an engine does with input it cannot take
            raise UserError("prompt 0 cannot be generated; change it")
        if any("crash" in p for p in prompts):  # an engine bug
            raise RuntimeError("simulated engine failure")
        return self.engine.generate(prompts, *args, prompt_ids=prompt_ids, **kwargs)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return engines.load_engine(str(tiny_model_dir), backend="torch")


@pytest.fixture(scope="module")
def server(engine):
    with Server(create_app(engine, NAME, FMT, max_batch=16, max_queue=64)) as s:
        yield s


def chat(server, **body):
    return server.http.post("/v1/chat/completions", json={"model": NAME, **body})


def error_of(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


# --- the openai client ----------------------------------------------------------------------------------
def test_models_health_and_metrics(server):
    assert [m.id for m in server.client().models.list()] == [NAME]
    assert server.http.get("/health").json() == {"status": "ok"}
    text = server.http.get("/metrics").text
    for name in ("budgetthink_requests_total", "budgetthink_queue_depth", "budgetthink_prompt_tokens_total",
                 "budgetthink_completion_tokens_total", "budgetthink_request_latency_seconds_bucket"):
        assert name in text


def test_chat_matches_the_engine(server, engine):
    """Greedy chat through the server gives exactly what the engine gives for the rendered prompt."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3*4="}]
    r = server.client().chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    prompt = FMT.chat_prompt(messages, engine.tokenizer)
    [c] = engine.generate([prompt], sampling=Sampling(temperature=0, max_tokens=24), n=1,
                          budget=Budget(max_answer_tokens=24), fmt=FMT)
    msg = r.choices[0].message
    assert (msg.reasoning_content, msg.content) == (c.thinking, c.answer)
    assert r.object == "chat.completion" and r.model == NAME and msg.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if c.finish_reason == "length" else "stop")
    assert r.usage.completion_tokens == len(c.token_ids)
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.completion_tokens_details.reasoning_tokens == c.thinking_tokens


def test_text_completion_n_and_prompt_list(server, engine):
    client = server.client()
    r = client.completions.create(model=NAME, prompt="12+7=", max_tokens=8, temperature=0)
    [c] = engine.generate(["12+7=" + FMT.think_open], sampling=Sampling(temperature=0, max_tokens=8), n=1,
                          budget=Budget(max_answer_tokens=8), fmt=FMT)
    assert r.choices[0].text == c.text and r.object == "text_completion"
    r = client.completions.create(model=NAME, prompt=["a", "b"], n=2, max_tokens=4, temperature=1, seed=1)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 4  # "a<think>" and "b<think>": two tokens each
    assert 4 <= r.usage.completion_tokens <= 4 * 4  # each choice samples 1..max_tokens tokens


def test_chat_n_greater_than_one(server):
    r = server.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], n=4,
                                                max_tokens=12, temperature=1.0, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(isinstance(c.message.content, str) for c in r.choices)
    assert len({c.message.reasoning_content + "|" + c.message.content for c in r.choices}) > 1  # samples differ
    again = server.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], n=4,
                                                    max_tokens=12, temperature=1.0, seed=3)
    assert [c.message for c in again.choices] == [c.message for c in r.choices]  # a seed reproduces


def test_streaming_chat_reasoning_then_content(server):
    client = server.client()
    kw = {"model": NAME, "messages": [{"role": "user", "content": "5+5="}], "max_tokens": 40, "temperature": 0,
              "extra_body": {"max_thinking_tokens": 20}}
    whole = client.chat.completions.create(**kw).choices[0]
    kinds, reasoning, content, finish, usage = [], "", "", None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            r = getattr(ch.delta, "reasoning_content", None)
            if r:
                kinds.append("r")
                reasoning += r
            if ch.delta.content:
                kinds.append("c")
                content += ch.delta.content
            finish = ch.finish_reason or finish
    assert kinds == sorted(kinds, key=lambda k: k != "r")  # every reasoning delta comes before any content delta
    assert (reasoning, content, finish) == (whole.message.reasoning_content, whole.message.content, whole.finish_reason)
    assert usage is not None and usage.completion_tokens_details.reasoning_tokens <= 20


def test_streaming_completion(server):
    client = server.client()
    whole = client.completions.create(model=NAME, prompt="9-3=", max_tokens=10, temperature=0)
    text = "".join(c.choices[0].text for c in client.completions.create(model=NAME, prompt="9-3=", max_tokens=10,
                                                                          temperature=0, stream=True))
    assert text == whole.choices[0].text


@pytest.mark.parametrize("bounds", [{"max_thinking_tokens": 0}, {"max_thinking_tokens": 6},
                                    {"min_thinking_tokens": 12, "max_thinking_tokens": 16},
                                    {"min_thinking_tokens": 10, "thinking_extensions": 2, "extension_string": "Hmm"}])
def test_thinking_budget_fields(server, engine, bounds):
    """The fields reach the engine as a Budget, and the returned reasoning token count obeys the bounds."""
    messages = [{"role": "user", "content": "7*8="}]
    r = server.client().chat.completions.create(model=NAME, messages=messages, max_tokens=48, temperature=0,
                                                extra_body=bounds)
    budget = Budget(**{("extensions" if k == "thinking_extensions" else k): v for k, v in bounds.items()},
                    max_answer_tokens=48)
    [c] = engine.generate([FMT.chat_prompt(messages, engine.tokenizer)], sampling=Sampling(temperature=0, max_tokens=48),
                          n=1, budget=budget, fmt=FMT)
    msg, used = r.choices[0].message, r.usage.completion_tokens_details.reasoning_tokens
    assert (msg.reasoning_content, msg.content, used) == (c.thinking, c.answer, c.thinking_tokens)
    assert used <= bounds.get("max_thinking_tokens", 48)
    if r.choices[0].finish_reason != "length":  # the minimum holds unless max_tokens ran out first
        assert used >= bounds.get("min_thinking_tokens", 0)


def test_thinking_off_answers_in_content(server, engine):
    """reasoning_effort 'none' or chat_template_kwargs.enable_thinking false: no opening delimiter in the prompt,
    the whole completion is the content, no reasoning tokens; vLLM's thinking_token_budget is max_thinking_tokens."""
    messages = [{"role": "user", "content": "3*4="}]
    prompt = FMT.chat_prompt(messages, engine.tokenizer, think=False)
    assert not prompt.endswith(FMT.think_open)
    [c] = engine.generate([prompt], sampling=Sampling(temperature=0, max_tokens=16), n=1,
                          budget=Budget(max_answer_tokens=16), fmt=FMT)
    for off in ({"reasoning_effort": "none"}, {"chat_template_kwargs": {"enable_thinking": False}}):
        r = chat(server, messages=messages, max_tokens=16, temperature=0, **off).json()
        msg = r["choices"][0]["message"]
        assert (msg["reasoning_content"], msg["content"]) == (None, c.text), off
        assert r["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    on = chat(server, messages=messages, max_tokens=32, temperature=0, thinking_token_budget=3,
              reasoning_effort="high", response_format={"type": "text"}, logprobs=False).json()
    assert on["usage"]["completion_tokens_details"]["reasoning_tokens"] <= 3
    same = chat(server, messages=messages, max_tokens=32, temperature=0, max_thinking_tokens=3).json()
    assert same["choices"][0]["message"] == on["choices"][0]["message"]
    # reasoning_effort minimal / low / medium are documented thinking caps (64 / 256 / 1024 tokens)
    effort = chat(server, messages=messages, max_tokens=96, temperature=0, min_thinking_tokens=60,
                  reasoning_effort="minimal").json()
    assert 60 <= effort["usage"]["completion_tokens_details"]["reasoning_tokens"] <= EFFORT_BUDGETS["minimal"] == 64
    over = chat(server, messages=messages, max_tokens=96, min_thinking_tokens=80, reasoning_effort="minimal")
    assert error_of(over, 400)["param"] == "min_thinking_tokens"  # the floor is above minimal's cap of 64


# --- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, param", [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 17}, "n"),  # more rows than the server's batch
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": -1}, "seed"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "x"}], "max_thinking_tokens": -1}, "max_thinking_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "min_thinking_tokens": 9, "max_thinking_tokens": 3},
     "min_thinking_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "thinking_extensions": "many"}, "thinking_extensions"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100_000}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x" * 5000}]}, "messages"),  # over the 1024-token context
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "max"}, "reasoning_effort"),
    ({"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "none", "max_thinking_tokens": 8},
     "max_thinking_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "thinking_token_budget": 4, "max_thinking_tokens": 8},
     "thinking_token_budget"),
])
def test_bad_fields_are_400_naming_the_field(server, body, param):
    err = error_of(chat(server, **body), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert param.split("[")[0] in err["message"]


def test_bad_bodies_are_400(server):
    url = "/v1/chat/completions"
    for content in (b"{not json", b"", b"[1, 2]", b"null", b'"text"', "{\"model\": \"\u00e9\"".encode()):
        err = error_of(server.http.post(url, content=content, headers={"content-type": "application/json"}), 400)
        assert err["type"] == "invalid_request_error"
    err = error_of(server.http.post(url, json={"messages": [{"role": "user", "content": "x"}]}), 400)
    assert err["param"] == "model"
    err = error_of(server.http.post("/v1/completions", json={"model": NAME, "prompt": "x" * 3000}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    err = error_of(server.http.post("/v1/completions", json={"model": NAME, "prompt": [1, 2]}), 400)
    assert err["param"].startswith("prompt")


def test_unknown_model_and_routes(server):
    err = error_of(chat(server, model="gpt-5", messages=[{"role": "user", "content": "x"}]), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="nope", prompt="x", max_tokens=2)
    error_of(server.http.get("/v1/nothing"), 404)
    error_of(server.http.get("/v1/chat/completions"), 405)


def test_api_key(engine):
    with Server(create_app(engine, NAME, FMT, api_key="s3cret"), key="s3cret") as s:
        body = {"model": NAME, "prompt": "1", "max_tokens": 2}
        anonymous = httpx.Client(base_url=s.url, timeout=60)
        error_of(anonymous.post("/v1/completions", json=body), 401)
        error_of(anonymous.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
        error_of(anonymous.post("/v1/completions", content=b"{bad", headers={"Authorization": "Bearer x"}), 401)
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert s.client("s3cret").completions.create(**body).choices[0].text is not None
        assert anonymous.get("/health").status_code == 200  # only the health probe needs no key
        for path in ("/metrics", "/docs", "/openapi.json", "/redoc"):
            error_of(anonymous.get(path), 401)
            assert s.http.get(path).status_code == 200, path
        anonymous.close()
        assert s.metric('budgetthink_requests_total{route="/v1/completions",status="401"}') == 3


def test_queue_full_is_429_and_disconnects_free_their_slot(engine):
    gated = Gated(engine)
    with Server(create_app(gated, NAME, FMT, max_batch=1, max_queue=2, window=0)) as s:
        body = {"model": NAME, "prompt": "2+2=", "max_tokens": 3}
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(s.http.post, "/v1/completions", json=body, timeout=60)
            assert gated.entered.wait(10)  # the first request is in the engine, held at the gate
            queued = [pool.submit(s.http.post, "/v1/completions", json=body, timeout=60) for _ in range(2)]
            deadline = time.time() + 10
            while s.metric("budgetthink_queue_depth") < 2:
                assert time.time() < deadline
                time.sleep(0.02)
            r = s.http.post("/v1/completions", json=body)
            error_of(r, 429)
            assert r.headers["Retry-After"] == "1" and r.json()["error"]["code"] == "queue_full"
            gated.gate.set()
            assert [f.result().status_code for f in [first, *queued]] == [200, 200, 200]

        # a streaming client and a plain one leave while queued: their slots free up and they never run
        gated.gate.clear()
        gated.entered.clear()
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(s.http.post, "/v1/completions", json=body, timeout=60)
            assert gated.entered.wait(10)
            calls = gated.calls
            with s.http.stream("POST", "/v1/chat/completions", json={
                    "model": NAME, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 3}) as resp:
                assert resp.status_code == 200
                lines = resp.iter_lines()  # (kept: a dropped iterator closes the response)
                assert '"role": "assistant"' in next(lines)  # the role chunk: the request is queued
                assert s.metric("budgetthink_queue_depth") == 1
            with pytest.raises(httpx.ReadTimeout):
                s.http.post("/v1/completions", json=body, timeout=0.5)
            deadline = time.time() + 10
            while s.metric("budgetthink_queue_depth") > 0:
                assert time.time() < deadline, "a disconnected client kept its slot"
                time.sleep(0.02)
            gated.gate.set()
            assert first.result().status_code == 200
            time.sleep(0.2)
            assert gated.calls == calls  # neither of the departed requests reached the engine
        assert s.http.post("/v1/completions", json=body, timeout=60).status_code == 200


def test_engine_errors_fail_only_their_request(engine):
    """A request the engine refuses gets 400 without failing its batch-mates; an engine crash is a 500 for its
    batch, and the server goes on serving."""
    gated = Gated(engine)
    with Server(create_app(gated, NAME, FMT, max_batch=8, window=0)) as s:
        body = {"model": NAME, "max_tokens": 3, "temperature": 1.0}
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(s.http.post, "/v1/completions", json={**body, "prompt": "1"})
            assert gated.entered.wait(10)  # held in the engine: the next three queue up and share one batch
            rest = [pool.submit(s.http.post, "/v1/completions", json={**body, "prompt": p})
                    for p in ("2", "refuse this", "3")]
            deadline = time.time() + 10
            while s.metric("budgetthink_queue_depth") < 3:
                assert time.time() < deadline
                time.sleep(0.02)
            gated.gate.set()
            assert [f.result().status_code for f in [first, *rest]] == [200, 200, 400, 200]
            assert rest[1].result().json()["error"]["message"] == "prompt 0 cannot be generated; change it"
        err = error_of(s.http.post("/v1/completions", json={**body, "prompt": "crash"}), 500)
        assert err["type"] == "server_error" and "simulated engine failure" in err["message"]
        assert s.http.post("/v1/completions", json={**body, "prompt": "4"}).status_code == 200


# --- load (the fuzz is in test_serve_fuzz.py) ----------------------------------------------------------
def mixed_body(i: int) -> dict:
    """Request i of a mixed workload: its own temperature, top-p, max_tokens, budget, n and seed."""
    body = {"model": NAME, "prompt": f"{i}+1=", "max_tokens": 2 + i % 11, "temperature": [0, 0.7, 1.0, 1e-300][i % 4],
            "top_p": [1.0, 0.9][i % 2], "n": 1 + i % 3 // 2}
    body.update([{}, {"max_thinking_tokens": 3}, {"min_thinking_tokens": 2, "thinking_extensions": 1},
                 {"seed": i}, {"stop": ["="]}][i % 5])
    return body


def test_load_200_mixed_requests_at_concurrency_16(server):
    """200 requests that all differ in their settings share decoding steps (continuous batching)."""
    async def main():
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=16)) as client:
            async def one(i):
                async with sem:
                    return await client.post(server.url + "/v1/completions", json=mixed_body(i))
            return await asyncio.gather(*[one(i) for i in range(200)])

    steps = server.metric("budgetthink_batches_total")
    rows = server.metric("budgetthink_batch_rows_total")
    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 200
    for i, r in enumerate(responses):
        choices = r.json()["choices"]
        assert len(choices) == mixed_body(i)["n"] and all(c["finish_reason"] in ("stop", "length") for c in choices)
    steps = server.metric("budgetthink_batches_total") - steps
    per_step = (server.metric("budgetthink_batch_rows_total") - rows) / steps
    assert per_step >= 4, per_step  # 16 requests in flight, ~1.3 rows each: they decode together
    assert server.metric("budgetthink_running_rows") == 0


# --- SIGTERM --------------------------------------------------------------------------------------------
def test_sigterm_finishes_requests_in_flight(tiny_model_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = f"from budgetthink.serve import run; run({str(tiny_model_dir)!r}, '127.0.0.1', {port}, max_batch=4)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    try:
        deadline = time.time() + 60
        while True:
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
                time.sleep(0.1)
        with ThreadPoolExecutor(1) as pool:
            body = {"model": str(tiny_model_dir), "prompt": "1", "max_tokens": 150, "temperature": 1.0,
                    "min_thinking_tokens": 100, "max_thinking_tokens": 100}  # >= 100 decoding steps
            fut = pool.submit(http.post, "/v1/completions", json=body)
            while "budgetthink_running_requests 1" not in http.get("/metrics").text:
                assert not fut.done(), fut.result().text
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            r = fut.result()
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
        # uvicorn re-raises the signal once its graceful shutdown is done, so the exit status is -SIGTERM
        assert proc.wait(60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in proc.stdout.read().decode()
        with pytest.raises(httpx.TransportError):
            http.get("/health")
    finally:
        http.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
