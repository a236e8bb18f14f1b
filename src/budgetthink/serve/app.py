"""OpenAI-compatible server with thinking budgets.

    budgetthink serve --model runs/tiny --host 127.0.0.1 --port 8000 [--api-key-file F] [--max-batch 32]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="K")
    r = client.chat.completions.create(model="runs/tiny", messages=[{"role": "user", "content": "3*4="}],
                                       max_tokens=128, extra_body={"max_thinking_tokens": 64, "min_thinking_tokens": 16})
    r.choices[0].message.reasoning_content   # the thinking; .content is the answer
    r.usage.completion_tokens_details.reasoning_tokens

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both with `stream`), GET /health,
GET /metrics (Prometheus text format). With an API key every route but /health needs it (/metrics, /docs and
/openapi.json included).

Budget forcing (budget.py holds its rules) is one request field away: `max_thinking_tokens`,
`min_thinking_tokens`, `thinking_extensions`, `extension_string` and `answer_prefix` are accepted as extra body
fields. Chat responses put the thinking in `message.reasoning_content` and the answer in `content`; completions
return everything after the prompt in `text`. `usage.completion_tokens_details.reasoning_tokens` counts the
sampled thinking tokens (what the budget counts; inserted strings are not counted).

A request's path, and what bounds each stage (config.py has every limit):
1. http.py: the key; the body's size from its Content-Length (413 before reading it), then the body itself
   within `body_timeout` (408); headers within `header_timeout` (else the connection is closed).
2. api.py: the schema, strict and bounded (400 naming the field).
3. here, before any tokenisation: the number of messages and the characters of all prompt text together.
4. prompts.py, in a worker thread (never on the event loop): the prompt's token ids, user text never encoded
   as control tokens; then each prompt within the context and all prompts within `max_prompt_tokens`.
5. the batcher: 429 with Retry-After when `max_queue` requests wait. The torch engine is driven step by step
   (scheduler.py: continuous batching, mixed settings in one batch); other engines by whole calls (batcher.py).
6. `request_timeout` from arrival to the last token (then 504; its rows are freed). A client that disconnects
   frees its place in the queue, or its rows in the running batch.

Errors are OpenAI-style `{"error": {"message", "type", "param", "code"}}`. SIGTERM stops accepting connections,
finishes the requests in flight, then exits (uvicorn's graceful shutdown; the worker drains its queue before the
process ends).

A stream is sent once its completion is done: a role chunk at once, then the reasoning in pieces, then the
answer in pieces, then `[DONE]`.
"""

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from budgetthink.budget import encode_insert
from budgetthink.engine import Budget, Completion, Sampling
from budgetthink.errors import UserError
from budgetthink.serve.api import (
    EFFORT_BUDGETS,
    APIError,
    ChatRequest,
    CommonRequest,
    CompletionRequest,
    validation_error,
)
from budgetthink.serve.batcher import Batcher
from budgetthink.serve.config import ServeConfig
from budgetthink.serve.http import Gate, uvicorn_config
from budgetthink.serve.jobs import Job
from budgetthink.serve.metrics import Metrics
from budgetthink.serve.prompts import PromptEncoder
from budgetthink.serve.scheduler import Scheduler

log = logging.getLogger("budgetthink.serve")
STREAM_PIECE = 16  # characters per streamed delta


def context_length(engine) -> int:
    """Most positions the model takes (prompt + completion)."""
    if isinstance(getattr(engine, "context", None), int):  # the torch engine's
        return engine.context
    config = getattr(getattr(engine, "model", None), "config", None)
    if config is not None and getattr(config, "max_position_embeddings", None):
        return int(config.max_position_embeddings)
    return int(getattr(engine.tokenizer, "model_max_length", 4096))


def finish_reason(c: Completion) -> str:
    return "length" if c.finish_reason == "length" else "stop"


def pieces(text: str) -> list[str]:
    return [text[i:i + STREAM_PIECE] for i in range(0, len(text), STREAM_PIECE)]


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def make_batcher(engine, fmt, metrics: Metrics, config: ServeConfig):
    """Continuous batching for the torch engine (it decodes step by step); whole calls for any other."""
    from budgetthink.engine.torch import TorchEngine

    if isinstance(engine, TorchEngine):
        return Scheduler(engine, fmt, metrics, max_batch=config.max_batch, max_queue=config.max_queue)
    return Batcher(engine, fmt, metrics, max_batch=config.max_batch, max_queue=config.max_queue, window=config.window)


def create_app(engine, model_name: str, fmt, api_key: str | None = None, **settings):
    """The FastAPI app serving `engine` (a loaded engine with `.tokenizer` and `.generate`) as `model_name`;
    `settings` are ServeConfig's fields."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import PlainTextResponse, Response, StreamingResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException

    ctx = context_length(engine)
    try:
        config = ServeConfig(**settings).resolved(ctx)
    except ValidationError as e:
        first = e.errors()[0]
        raise UserError(f"server setting {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    encoder = PromptEncoder(engine.tokenizer, fmt, allow_special=config.allow_special_tokens)
    tokenize_pool = ThreadPoolExecutor(max_workers=config.tokenizer_threads, thread_name_prefix="tokenize")
    metrics = Metrics()
    batcher = None
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        nonlocal batcher
        batcher = make_batcher(engine, fmt, metrics, config)
        app.state.batcher = batcher
        batcher.start()
        yield
        await batcher.close()  # uvicorn has already waited for the requests in flight
        tokenize_pool.shutdown(wait=False, cancel_futures=True)
        for fn in app.state.on_shutdown:  # e.g. the ledger line of `run` (uvicorn re-raises SIGTERM after this)
            fn()

    app = FastAPI(title="budgetthink", description="OpenAI-compatible server with thinking budgets", lifespan=lifespan)
    app.state.on_shutdown = []
    app.state.metrics = metrics
    app.state.config = config

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return validation_error(e.errors()).response()

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                        code="not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(e).__name__}", type="server_error").response()

    # --- request -> job
    def check_model(req: CommonRequest):
        if req.model != model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def check_chars(texts: list[str], param: str):
        """The whole request's prompt text, before anything is tokenised."""
        chars = sum(map(len, texts))
        if chars > config.max_prompt_chars:
            raise APIError(400, f"{param}: {chars} characters of prompt text in all, above the server's limit of "
                                f"{config.max_prompt_chars}; shorten it", param=param, code="prompt_too_long")

    async def tokenize(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenize_pool, fn, *args)

    def check_tokens(counts: list[int], param: str):
        longest, total = max(counts), sum(counts)
        if longest >= ctx:
            raise APIError(400, f"{param}: the prompt has {longest} tokens but the model's context is {ctx}; "
                                "shorten it", param=param, code="context_length_exceeded")
        if total > config.max_prompt_tokens:
            raise APIError(400, f"{param}: {total} prompt tokens in all, above the server's limit of "
                                f"{config.max_prompt_tokens}; send fewer or shorter prompts", param=param,
                           code="prompt_too_long")

    def unsupported(req: CommonRequest, think: bool):
        """Fields clients send that this server accepts only in their neutral form: a 400 naming the field."""
        if req.response_format is not None and req.response_format.type != "text":
            raise APIError(400, f"response_format: {req.response_format.type!r} is not supported (no constrained "
                                "decoding); drop response_format or use {'type': 'text'}", param="response_format",
                           code="unsupported_value")
        if getattr(req, "logprobs", None) or getattr(req, "top_logprobs", None):
            raise APIError(400, "logprobs: not supported by this server; drop logprobs and top_logprobs",
                           param="logprobs", code="unsupported_value")
        if (req.thinking_token_budget is not None and req.max_thinking_tokens is not None
                and req.thinking_token_budget != req.max_thinking_tokens):
            raise APIError(400, "thinking_token_budget: differs from max_thinking_tokens (two names of one field); "
                                "send one", param="thinking_token_budget", code="invalid_value")
        if not think and (req.max_thinking_tokens is not None or req.thinking_token_budget is not None
                          or req.min_thinking_tokens or req.thinking_extensions):
            raise APIError(400, "max_thinking_tokens: this request turns thinking off (reasoning_effort 'none' or "
                                "enable_thinking false), so a thinking budget has nothing to act on; drop one",
                           param="max_thinking_tokens", code="invalid_value")

    def settings_of(req: CommonRequest, prompt_tokens: int, prompts: int) -> tuple[Sampling, Budget]:
        """Sampling and budget for a request whose longest prompt has prompt_tokens tokens."""
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            max_tokens = ctx - prompt_tokens
        elif prompt_tokens + max_tokens > ctx:
            name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise APIError(400, f"{name}: {prompt_tokens} prompt tokens + {max_tokens} completion tokens exceed the "
                                f"model's context of {ctx}; lower {name} to at most {ctx - prompt_tokens}",
                           param=name, code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s or len(s) > 256 for s in stop):
            raise APIError(400, "stop: give up to 4 non-empty strings of at most 256 characters", param="stop",
                           code="invalid_value")
        if req.n * prompts > config.max_batch:
            raise APIError(400, f"n: {req.n * prompts} choices in one request exceed the server's batch of "
                                f"{config.max_batch}; lower n (or send fewer prompts)", param="n", code="invalid_value")
        for name, what in (("extension_string", "extension string"), ("answer_prefix", "answer prefix")):
            try:  # the engine inserts these: refuse them now, not once a stream has begun
                if getattr(req, name) is not None:
                    encode_insert(engine.tokenizer, getattr(req, name), what)
            except UserError as e:
                raise APIError(400, f"{name}: {e}", param=name, code="invalid_value") from None
        sampling = Sampling(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, max_tokens=max_tokens,
                            stop=stop, seed=req.seed)
        try:  # Budget's own validation (min_thinking_tokens <= max_thinking_tokens), named with the API's fields
            cap = next((x for x in (req.max_thinking_tokens, req.thinking_token_budget,
                                    EFFORT_BUDGETS.get(getattr(req, "reasoning_effort", None))) if x is not None), None)
            budget = Budget(max_thinking_tokens=cap, min_thinking_tokens=req.min_thinking_tokens,
                            extensions=req.thinking_extensions, extension_string=req.extension_string,
                            answer_prefix=req.answer_prefix, max_answer_tokens=max_tokens)
        except ValidationError as e:
            raise validation_error({**x, "loc": tuple("thinking_extensions" if p == "extensions" else p
                                                      for p in x["loc"])} for x in e.errors()) from None
        return sampling, budget

    def submit(ids: list[list[int]], req: CommonRequest, param: str) -> Job:
        check_tokens([len(p) for p in ids], param)
        sampling, budget = settings_of(req, max(map(len, ids)), len(ids))
        return batcher.submit(Job(ids, req.n, sampling, budget, asyncio.get_running_loop().create_future()))

    def timed_out() -> APIError:
        return APIError(504, f"the request took over the server's limit of {config.request_timeout:g} s; lower "
                             "max_tokens or the thinking budget, or retry when the server is less busy",
                        type="server_error", code="request_timeout")

    async def wait(job: Job, arrived: float, request: Request | None) -> list[Completion] | None:
        """The job's completions; None if the client disconnected first. Either way a job left behind is
        cancelled (a queued one leaves the queue, a running one frees its rows)."""
        left = config.request_timeout - (time.monotonic() - arrived)
        watch = None
        if request is not None:
            async def disconnected():
                while (await request.receive())["type"] != "http.disconnect":
                    pass
            watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({job.future} | ({watch} if watch else set()), timeout=max(left, 0),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            if watch is not None:
                watch.cancel()
            if not job.future.done():
                batcher.cancel(job)
        if job.future.done():
            return job.future.result()
        if watch is not None and watch.done():
            return None
        raise timed_out()

    def usage(prompt_tokens: int, outs: list[Completion], think: bool = True) -> dict:
        completion = sum(len(c.token_ids) for c in outs)
        reasoning = sum(c.thinking_tokens for c in outs) if think else 0
        metrics.tokens["prompt"] += prompt_tokens
        metrics.tokens["completion"] += completion
        metrics.tokens["reasoning"] += reasoning
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
                "completion_tokens_details": {"reasoning_tokens": reasoning}}

    def stream(job: Job, arrived: float, request_id: str, obj: str, chunks, prompt_tokens: int, include_usage: bool,
               think: bool = True):
        """SSE: `chunks(outs)` yields the choice deltas once the completions are in."""

        async def events():
            base = {"id": request_id, "object": obj, "created": int(time.time()), "model": model_name}
            try:
                if obj == "chat.completion.chunk":  # the role at once, so a client sees the stream open
                    yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "finish_reason": None} for i in range(job.rows)]})
                try:
                    outs = await wait(job, arrived, None)
                except APIError as e:
                    yield sse(e.body())
                    yield "data: [DONE]\n\n"
                    return
                for choice in chunks(outs):
                    yield sse({**base, "choices": [choice]})
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage(prompt_tokens, outs, think)})
                else:
                    usage(prompt_tokens, outs, think)
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we are done): free the job's place or rows
                if not job.future.done():
                    batcher.cancel(job)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # --- endpoints
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(len(batcher.waiting), batcher.running, batcher.rows),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "budgetthink", "max_model_len": ctx}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        arrived = time.monotonic()
        check_model(req)
        if len(req.messages) > config.max_messages:
            raise APIError(400, f"messages: {len(req.messages)} messages, above the server's limit of "
                                f"{config.max_messages}; send fewer", param="messages", code="too_many_messages")
        check_chars([m.text for m in req.messages], "messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in req.messages]
        think = req.thinks
        unsupported(req, think)
        ids = await tokenize(encoder.chat, messages, req.chat_template_kwargs, think)
        job = submit([ids], req, "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        def split(c: Completion) -> tuple[str | None, str]:  # (reasoning_content, content)
            return (c.thinking, c.answer) if think else (None, c.text)

        if req.stream:
            def chunks(outs):
                for i, c in enumerate(outs):
                    reasoning, content = split(c)
                    for p in pieces(reasoning or ""):
                        yield {"index": i, "delta": {"reasoning_content": p}, "finish_reason": None}
                    for p in pieces(content):
                        yield {"index": i, "delta": {"content": p}, "finish_reason": None}
                    yield {"index": i, "delta": {}, "finish_reason": finish_reason(c)}
            include = bool(req.stream_options and req.stream_options.include_usage)
            return stream(job, arrived, rid, "chat.completion.chunk", chunks, len(ids), include, think)
        outs = await wait(job, arrived, request)
        if outs is None:
            return Response(status_code=499)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": split(c)[1],
                                                     "reasoning_content": split(c)[0]},
                             "logprobs": None, "finish_reason": finish_reason(c)} for i, c in enumerate(outs)],
                "usage": usage(len(ids), outs, think)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        arrived = time.monotonic()
        check_model(req)
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not texts:
            raise APIError(400, "prompt: give one string or a list of 1 or more strings", param="prompt",
                           code="invalid_value")
        if len(texts) > config.max_batch:
            raise APIError(400, f"prompt: {len(texts)} prompts exceed the server's batch of {config.max_batch}; "
                                "send fewer", param="prompt", code="invalid_value")
        check_chars(texts, "prompt")
        unsupported(req, True)
        ids = await tokenize(lambda: [encoder.completion(t) for t in texts])
        job = submit(ids, req, "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        prompt_tokens = sum(map(len, ids))
        if req.stream:
            def chunks(outs):
                for i, c in enumerate(outs):
                    for p in pieces(c.text):
                        yield {"index": i, "text": p, "logprobs": None, "finish_reason": None}
                    yield {"index": i, "text": "", "logprobs": None, "finish_reason": finish_reason(c)}
            include = bool(req.stream_options and req.stream_options.include_usage)
            return stream(job, arrived, rid, "text_completion", chunks, prompt_tokens, include)
        outs = await wait(job, arrived, request)
        if outs is None:
            return Response(status_code=499)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": finish_reason(c)}
                            for i, c in enumerate(outs)],
                "usage": usage(prompt_tokens, outs)}

    app.add_middleware(Gate, api_key=api_key, metrics=metrics, max_body_bytes=config.max_body_bytes,
                       body_timeout=config.body_timeout)
    return app


def run(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, engine: str = "torch",
        fmt: str = "tinyzero", out: str | None = None, engine_options: dict | None = None, **settings):
    """Load the model (engine_options, e.g. device and dtype, go to the engine) and serve it until SIGTERM/SIGINT
    (which finish the requests in flight first).

    With `out`, the run is recorded on shutdown as a `serve` line in OUT/ledger.jsonl. `settings` are
    ServeConfig's fields."""
    import contextlib
    import socket

    import uvicorn

    from budgetthink.engine import load_engine
    from budgetthink.formats import get_format
    from budgetthink.ledger import stage_ledger

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:  # before minutes of loading
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
    think_format = get_format(fmt)
    eng = load_engine(str(model), backend=engine, **(engine_options or {}))
    app = create_app(eng, str(model), think_format, api_key=api_key, **settings)
    if out:  # the run's ledger line, written when the server shuts down
        ledger = contextlib.ExitStack()
        entry = ledger.enter_context(stage_ledger(out, stage="serve", model=str(model)))

        def record():
            entry.add(tokens_generated=int(app.state.metrics.tokens["completion"]))
            ledger.close()

        app.state.on_shutdown.append(record)
    log.info("serving %s on http://%s:%d/v1", model, host, port)
    uvicorn.Server(uvicorn_config(app, host, port, log_level="info", timeout_graceful_shutdown=None)).run()
