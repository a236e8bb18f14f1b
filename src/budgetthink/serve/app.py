"""OpenAI-compatible server with thinking budgets.

    budgetthink serve --model runs/tiny --host 127.0.0.1 --port 8000 [--api-key K] [--max-batch 32] [--max-queue 256]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="K")
    r = client.chat.completions.create(model="runs/tiny", messages=[{"role": "user", "content": "3*4="}],
                                       max_tokens=128, extra_body={"max_thinking_tokens": 64, "min_thinking_tokens": 16})
    r.choices[0].message.reasoning_content   # the thinking; .content is the answer
    r.usage.completion_tokens_details.reasoning_tokens

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both with `stream`), GET /health,
GET /metrics (Prometheus text format, written here without prometheus_client).

Budget forcing (DESIGN.md, "Budget forcing semantics") is one request field away: `max_thinking_tokens`,
`min_thinking_tokens`, `thinking_extensions`, `extension_string` and `answer_prefix` are accepted as extra body
fields. Chat responses put the thinking in `message.reasoning_content` and the answer in `content`; completions
return everything after the prompt in `text`. `usage.completion_tokens_details.reasoning_tokens` counts the
sampled thinking tokens (what the budget counts; inserted strings are not counted).

Dynamic batching: requests wait in one queue; a single worker takes the oldest request together with every
waiting request that has the same sampling and budget settings (up to `max_batch` rows = prompts x n) and runs
them in one `engine.generate` call, in a thread so the event loop stays responsive. A request with a `seed`
runs alone, so that its output does not depend on what it was batched with.

Errors are OpenAI-style `{"error": {"message", "type", "param", "code"}}`: bad JSON or fields 400 (naming the
field), prompt over the context 400, unknown model 404, missing or wrong key 401, queue full 429 with
Retry-After. A client that disconnects before its request has run frees its place in the queue. SIGTERM stops
accepting connections, finishes the requests in flight, then exits (uvicorn's graceful shutdown; the worker
drains its queue before the process ends).

The engine returns whole completions (it has no per-token callback), so a stream is sent once the completion
is done: a role chunk at once, then the reasoning in pieces, then the answer in pieces, then `[DONE]`.
"""

import asyncio
import json
import logging
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from budgetthink.engine import Budget, Completion, Sampling
from budgetthink.errors import UserError

log = logging.getLogger("budgetthink.serve")
MAX_CHARS = 1_000_000  # cap on any one prompt or message string, so a huge body fails fast with 400
STREAM_PIECE = 16  # characters per streamed delta
Text = Annotated[str, Field(max_length=MAX_CHARS)]


# --- request models -------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    """OpenAI's stream options."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, description="send a last chunk with the usage before [DONE]")


class CommonRequest(BaseModel):
    """Fields shared by chat and text completions (OpenAI's, then the thinking-budget extras)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="the served model's id (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="cap on sampled tokens per choice (thinking + answer)")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens; wins if both")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 keeps all (vLLM's extra field)")
    n: int = Field(1, ge=1, le=128, description="choices per prompt")
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="sampling seed; a seeded request runs alone")
    stream: bool = Field(False, description="send server-sent events")
    stream_options: StreamOptions | None = Field(None, description="streaming options")
    user: str | None = Field(None, max_length=256, description="end-user id (accepted, unused)")
    # thinking budget (extra body fields)
    max_thinking_tokens: int | None = Field(None, ge=0, description="force the end of thinking after this many sampled tokens")
    min_thinking_tokens: int = Field(0, ge=0, description="suppress the end of thinking until this many sampled tokens")
    thinking_extensions: int = Field(0, ge=0, le=64, description="ignore the end of thinking this many times")
    extension_string: str = Field("Wait", max_length=256, description="appended when an end of thinking is suppressed")
    answer_prefix: str = Field("", max_length=256, description="appended after a forced end of thinking")


class TextPart(BaseModel):
    """One part of a message's content (text only)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"] = Field(description="only text parts are supported")
    text: Text = Field(description="the text")


class ChatMessage(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"] = Field(description="who speaks")
    content: Text | list[TextPart] | None = Field(description="what is said")
    name: str | None = Field(None, max_length=256, description="speaker name (accepted, unused)")


class ChatRequest(CommonRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1024, description="the conversation so far")


class CompletionRequest(CommonRequest):
    """POST /v1/completions."""

    prompt: Text | list[Text] = Field(description="one prompt or a list of prompts")


# --- errors ---------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered as OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers

    def response(self):
        from fastapi.responses import JSONResponse

        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"}


def _param(loc) -> str | None:
    """('body', 'messages', 0, 'content', 'list[TextPart]', 0, 'type') -> 'messages[0].content[0].type'.

    Pydantic names the union member it tried inside the location ('list[TextPart]', 'constrained-str'); those
    tags are dropped."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).isidentifier() and str(part) not in TYPE_TAGS:
            out += f".{part}" if out else str(part)
    return out or None


def validation_error(errors) -> APIError:
    """The most specific pydantic/FastAPI validation error as a 400 that names the field."""
    errors = list(errors)
    e = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {"type": "invalid", "loc": (), "msg": "invalid request"}
    if e.get("type") == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", "")
        return APIError(400, f"request body is not valid JSON ({detail}); send a JSON object", code="invalid_json")
    param = _param(tuple(e.get("loc", ())))
    if e.get("type") == "missing" and param is None:
        return APIError(400, "request body is missing; send a JSON object", code="missing")
    if param is None:
        return APIError(400, f"request body: {e.get('msg')}; send a JSON object with Content-Type: application/json",
                        code=e.get("type"))
    msg = "unknown field; remove it" if e.get("type") == "extra_forbidden" else e.get("msg")
    return APIError(400, f"{param}: {msg}", param=param, code=e.get("type"))


# --- metrics --------------------------------------------------------------------------------------------
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics")


class Metrics:
    """Counters, gauges and a latency histogram, rendered in Prometheus' text exposition format."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}  # (route, status) -> count
        self.tokens = {"prompt": 0, "completion": 0, "reasoning": 0}
        self.batches = self.batch_rows = 0
        self.engine_seconds = 0.0
        self.buckets = [0] * len(LATENCY_BUCKETS)
        self.latency_sum, self.latency_count = 0.0, 0

    def observe(self, path: str, status: int, seconds: float):
        route = path if path in ROUTES else "other"
        self.requests[route, status] = self.requests.get((route, status), 0) + 1
        if route.startswith("/v1/") and route != "/v1/models":
            for i, le in enumerate(LATENCY_BUCKETS):
                self.buckets[i] += seconds <= le
            self.latency_sum += seconds
            self.latency_count += 1

    def render(self, queue_depth: int, running: int) -> str:
        lines = ["# HELP budgetthink_requests_total HTTP requests by route and status code.",
                 "# TYPE budgetthink_requests_total counter"]
        lines += [f'budgetthink_requests_total{{route="{r}",status="{s}"}} {c}' for (r, s), c in sorted(self.requests.items())]
        for kind, v in self.tokens.items():
            lines += [f"# HELP budgetthink_{kind}_tokens_total {kind.capitalize()} tokens served.",
                      f"# TYPE budgetthink_{kind}_tokens_total counter", f"budgetthink_{kind}_tokens_total {v}"]
        lines += ["# HELP budgetthink_queue_depth Requests waiting for the engine.", "# TYPE budgetthink_queue_depth gauge",
                  f"budgetthink_queue_depth {queue_depth}",
                  "# HELP budgetthink_running_requests Requests in the engine's current batch.",
                  "# TYPE budgetthink_running_requests gauge", f"budgetthink_running_requests {running}",
                  "# HELP budgetthink_batches_total Engine calls.", "# TYPE budgetthink_batches_total counter",
                  f"budgetthink_batches_total {self.batches}",
                  "# HELP budgetthink_batch_rows_total Rows (prompts x n) over all engine calls.",
                  "# TYPE budgetthink_batch_rows_total counter", f"budgetthink_batch_rows_total {self.batch_rows}",
                  "# HELP budgetthink_engine_seconds_total Wall time spent in the engine.",
                  "# TYPE budgetthink_engine_seconds_total counter", f"budgetthink_engine_seconds_total {self.engine_seconds:.6f}",
                  "# HELP budgetthink_request_latency_seconds Completion request latency (to the last byte).",
                  "# TYPE budgetthink_request_latency_seconds histogram"]
        lines += [f'budgetthink_request_latency_seconds_bucket{{le="{le}"}} {c}' for le, c in zip(LATENCY_BUCKETS, self.buckets)]
        lines += [f'budgetthink_request_latency_seconds_bucket{{le="+Inf"}} {self.latency_count}',
                  f"budgetthink_request_latency_seconds_sum {self.latency_sum:.6f}",
                  f"budgetthink_request_latency_seconds_count {self.latency_count}"]
        return "\n".join(lines) + "\n"


# --- dynamic batching -----------------------------------------------------------------------------------
@dataclass
class Job:
    """One request's work: its prompts, each sampled n times under one sampling and budget setting."""

    prompts: list[str]
    n: int
    sampling: Sampling
    budget: Budget
    future: asyncio.Future
    key: str = ""  # requests with equal keys may share an engine call

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n


@dataclass
class Batcher:
    """A queue of jobs and the one worker that runs them through the engine in batches."""

    engine: object
    fmt: object
    max_batch: int = 32  # most rows (prompts x n) in one engine call
    max_queue: int = 256  # most jobs waiting; more are refused with 429
    window: float = 0.05  # seconds to wait for a burst to gather, if the last batch was bigger than the queue
    metrics: Metrics = field(default_factory=Metrics)
    waiting: list[Job] = field(default_factory=list)
    running: int = 0
    closing: bool = False

    def __post_init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.wake = asyncio.Event()
        self.last_rows = 1
        self.task = None

    def start(self):
        self.task = asyncio.get_running_loop().create_task(self.loop())

    async def close(self):
        """Finish everything queued, then stop the worker."""
        self.closing = True
        self.wake.set()
        if self.task is not None:
            await self.task
        self.pool.shutdown(wait=True)

    def submit(self, prompts: list[str], n: int, sampling: Sampling, budget: Budget) -> Job:
        if self.closing:
            raise APIError(503, "the server is shutting down; retry on another instance", type="server_error",
                           code="shutting_down")
        if len(self.waiting) >= self.max_queue:
            raise APIError(429, f"the queue is full ({self.max_queue} requests waiting); retry shortly",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        job = Job(prompts, n, sampling, budget, asyncio.get_running_loop().create_future())
        job.key = sampling.model_dump_json() + budget.model_dump_json() + (uuid.uuid4().hex if sampling.seed is not None else "")
        self.waiting.append(job)
        self.wake.set()
        return job

    def cancel(self, job: Job):
        """The client is gone: drop the job if it has not started (a running batch finishes and is discarded)."""
        if job in self.waiting:
            self.waiting.remove(job)

    def take(self) -> list[Job]:
        """The oldest job and every waiting job with the same settings, oldest first, up to max_batch rows."""
        head = self.waiting[0]
        batch, rows = [], 0
        for job in list(self.waiting):
            if job.key == head.key and (not batch or rows + job.rows <= self.max_batch):
                batch.append(job)
                rows += job.rows
                self.waiting.remove(job)
        return batch

    async def loop(self):
        clock = asyncio.get_running_loop().time
        while True:
            if not self.waiting:
                if self.closing:
                    return
                self.wake.clear()
                await self.wake.wait()
                continue
            # a closed loop of c clients re-sends its requests a few ms apart: wait for the burst to gather
            deadline = clock() + self.window
            while (sum(j.rows for j in self.waiting) < min(self.last_rows, self.max_batch) and clock() < deadline
                   and not self.closing):
                await asyncio.sleep(0.002)
            if not self.waiting:
                continue
            batch = self.take()
            self.last_rows = sum(j.rows for j in batch)
            self.running = len(batch)
            try:
                await self.run(batch)
            except Exception as e:  # never let the worker die: fail this batch's requests and go on
                log.exception("engine batch failed")
                err = e if isinstance(e, APIError) else APIError(500, f"engine error: {type(e).__name__}: {e}",
                                                                 type="server_error", code="engine_error")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(err)
            finally:
                self.running = 0

    async def run(self, batch: list[Job]):
        """One engine call for the batch; each job gets its own completions, prompt-major."""
        ns = {job.n for job in batch}
        n = ns.pop() if len(ns) == 1 else 1  # mixed n: repeat each prompt n times and sample once
        prompts = [p for job in batch for p in job.prompts for _ in range(job.n // n)]
        head = batch[0]
        t0 = time.perf_counter()
        try:
            outs = await asyncio.get_running_loop().run_in_executor(
                self.pool, lambda: self.engine.generate(prompts, sampling=head.sampling, n=n, budget=head.budget, fmt=self.fmt))
        except UserError as e:
            if len(batch) > 1:  # one request's fault must not fail the others: run each alone
                for job in batch:
                    try:
                        await self.run([job])
                    except APIError as err:
                        if not job.future.done():
                            job.future.set_exception(err)
                return
            raise APIError(400, str(e), code="invalid_request") from e
        self.metrics.engine_seconds += time.perf_counter() - t0
        self.metrics.batches += 1
        self.metrics.batch_rows += len(prompts) * n
        if len(outs) != len(prompts) * n:
            raise RuntimeError(f"engine returned {len(outs)} completions for {len(prompts) * n} rows")
        start = 0
        for job in batch:
            if not job.future.done():
                job.future.set_result(outs[start:start + job.rows])
            start += job.rows


# --- the app --------------------------------------------------------------------------------------------
def context_length(engine) -> int:
    """Most positions the model takes (prompt + completion)."""
    if isinstance(getattr(engine, "context", None), int):  # the torch engine's
        return engine.context
    config = getattr(getattr(engine, "model", None), "config", None)
    if config is not None and getattr(config, "max_position_embeddings", None):
        return int(config.max_position_embeddings)
    return int(getattr(engine.tokenizer, "model_max_length", 4096))


def count_tokens(tokenizer, text: str) -> int:
    """Prompt tokens as the engine encodes them (the tokenizer's defaults)."""
    return len(tokenizer.encode(text))


def finish_reason(c: Completion) -> str:
    return "length" if c.finish_reason == "length" else "stop"


def pieces(text: str) -> list[str]:
    return [text[i:i + STREAM_PIECE] for i in range(0, len(text), STREAM_PIECE)]


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Gate:
    """ASGI middleware: the API key check on /v1/*, and request counts and latency for /metrics."""

    def __init__(self, app, api_key: str | None = None, metrics: Metrics | None = None):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    def authorized(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        got = headers.get(b"authorization", b"").decode("latin-1")
        return got.startswith("Bearer ") and secrets.compare_digest(got[7:].strip().encode(), self.api_key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key and scope["path"].startswith("/v1") and not self.authorized(scope):
                await APIError(401, "missing or wrong API key; send it as 'Authorization: Bearer KEY'",
                               code="invalid_api_key").response()(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe(scope["path"], status[0], time.perf_counter() - t0)


def create_app(engine, model_name: str, fmt, api_key: str | None = None, max_batch: int = 32, max_queue: int = 256,
               window: float = 0.05):
    """The FastAPI app serving `engine` (a loaded engine with `.tokenizer` and `.generate`) as `model_name`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    if max_batch < 1 or max_queue < 1:
        raise UserError(f"--max-batch ({max_batch}) and --max-queue ({max_queue}) must be >= 1")
    tokenizer = engine.tokenizer
    ctx = context_length(engine)
    metrics = Metrics()
    batcher = None
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        nonlocal batcher
        batcher = Batcher(engine, fmt, max_batch=max_batch, max_queue=max_queue, window=window, metrics=metrics)
        app.state.batcher = batcher
        batcher.start()
        yield
        await batcher.close()  # uvicorn has already waited for the requests in flight
        for fn in app.state.on_shutdown:  # e.g. the ledger line of `run` (uvicorn re-raises SIGTERM after this)
            fn()

    app = FastAPI(title="budgetthink", description="OpenAI-compatible server with thinking budgets", lifespan=lifespan)
    app.state.on_shutdown = []
    app.state.metrics = metrics

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

    def settings(req: CommonRequest, prompt_tokens: int, param: str) -> tuple[Sampling, Budget]:
        """Sampling and budget for a request whose longest prompt has prompt_tokens tokens."""
        if prompt_tokens >= ctx:
            raise APIError(400, f"{param}: the prompt has {prompt_tokens} tokens but the model's context is {ctx}; "
                                "shorten it", param=param, code="context_length_exceeded")
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            max_tokens = ctx - prompt_tokens
        elif prompt_tokens + max_tokens > ctx:
            name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise APIError(400, f"{name}: {prompt_tokens} prompt tokens + {max_tokens} completion tokens exceed the "
                                f"model's context of {ctx}; lower {name} to at most {ctx - prompt_tokens}",
                           param=name, code="context_length_exceeded")
        if req.max_thinking_tokens is not None and req.min_thinking_tokens > req.max_thinking_tokens:
            raise APIError(400, f"min_thinking_tokens: {req.min_thinking_tokens} is above max_thinking_tokens "
                                f"({req.max_thinking_tokens}); lower the minimum or raise the maximum",
                           param="min_thinking_tokens", code="invalid_value")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop: give up to 4 non-empty strings", param="stop", code="invalid_value")
        rows = req.n * (len(req.prompt) if isinstance(getattr(req, "prompt", None), list) else 1)
        if rows > max_batch:
            raise APIError(400, f"n: {rows} choices in one request exceed the server's batch of {max_batch}; "
                                "lower n (or send fewer prompts)", param="n", code="invalid_value")
        sampling = Sampling(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, max_tokens=max_tokens,
                            stop=stop, seed=req.seed)
        budget = Budget(max_thinking_tokens=req.max_thinking_tokens, min_thinking_tokens=req.min_thinking_tokens,
                        extensions=req.thinking_extensions, extension_string=req.extension_string,
                        answer_prefix=req.answer_prefix, max_answer_tokens=max_tokens)
        return sampling, budget

    async def result(job: Job, request: Request) -> list[Completion] | None:
        """The job's completions, or None if the client disconnected first (its queue slot is freed)."""

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({job.future, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not job.future.done():
            batcher.cancel(job)
            return None
        return job.future.result()

    def usage(prompt_tokens: int, outs: list[Completion]) -> dict:
        completion = sum(len(c.token_ids) for c in outs)
        metrics.tokens["prompt"] += prompt_tokens
        metrics.tokens["completion"] += completion
        metrics.tokens["reasoning"] += sum(c.thinking_tokens for c in outs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
                "completion_tokens_details": {"reasoning_tokens": sum(c.thinking_tokens for c in outs)}}

    def stream(job: Job, request_id: str, obj: str, chunks, prompt_tokens: int, include_usage: bool):
        """SSE: `chunks(outs)` yields the choice deltas once the completions are in."""

        async def events():
            base = {"id": request_id, "object": obj, "created": int(time.time()), "model": model_name}
            try:
                if obj == "chat.completion.chunk":  # the role at once, so a client sees the stream open
                    yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "finish_reason": None} for i in range(job.rows)]})
                try:
                    outs = await job.future
                except APIError as e:
                    yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
                    yield "data: [DONE]\n\n"
                    return
                for choice in chunks(outs):
                    yield sse({**base, "choices": [choice]})
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage(prompt_tokens, outs)})
                else:
                    usage(prompt_tokens, outs)
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we are done): free the slot if the job has not run
                batcher.cancel(job)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # --- endpoints
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(len(batcher.waiting), batcher.running),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "budgetthink", "max_model_len": ctx}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_model(req)
        messages = []
        for m in req.messages:
            text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        try:
            prompt = fmt.chat_prompt(messages, tokenizer)
        except Exception as e:  # noqa: BLE001  (a chat template may refuse a conversation: roles must alternate...)
            raise APIError(400, f"messages: the model's chat template rejected them ({e})", param="messages",
                           code="invalid_value") from None
        prompt_tokens = count_tokens(tokenizer, prompt)
        sampling, budget = settings(req, prompt_tokens, "messages")
        job = batcher.submit([prompt], req.n, sampling, budget)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            def chunks(outs):
                for i, c in enumerate(outs):
                    for p in pieces(c.thinking):
                        yield {"index": i, "delta": {"reasoning_content": p}, "finish_reason": None}
                    for p in pieces(c.answer):
                        yield {"index": i, "delta": {"content": p}, "finish_reason": None}
                    yield {"index": i, "delta": {}, "finish_reason": finish_reason(c)}
            include = bool(req.stream_options and req.stream_options.include_usage)
            return stream(job, rid, "chat.completion.chunk", chunks, prompt_tokens, include)
        outs = await result(job, request)
        if outs is None:
            return Response(status_code=499)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.answer,
                                                     "reasoning_content": c.thinking},
                             "logprobs": None, "finish_reason": finish_reason(c)} for i, c in enumerate(outs)],
                "usage": usage(prompt_tokens, outs)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req)
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not texts:
            raise APIError(400, "prompt: give one string or a list of 1 or more strings", param="prompt",
                           code="invalid_value")
        # the engine's budget counts from the opening delimiter, so the prompt must end with it
        prompts = [t if t.endswith(fmt.think_open) else t + fmt.think_open for t in texts]
        counts = [count_tokens(tokenizer, p) for p in prompts]
        sampling, budget = settings(req, max(counts), "prompt")
        job = batcher.submit(prompts, req.n, sampling, budget)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            def chunks(outs):
                for i, c in enumerate(outs):
                    for p in pieces(c.text):
                        yield {"index": i, "text": p, "logprobs": None, "finish_reason": None}
                    yield {"index": i, "text": "", "logprobs": None, "finish_reason": finish_reason(c)}
            include = bool(req.stream_options and req.stream_options.include_usage)
            return stream(job, rid, "text_completion", chunks, sum(counts), include)
        outs = await result(job, request)
        if outs is None:
            return Response(status_code=499)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": finish_reason(c)}
                            for i, c in enumerate(outs)],
                "usage": usage(sum(counts), outs)}

    app.add_middleware(Gate, api_key=api_key, metrics=metrics)
    return app


def run(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_batch: int = 32,
        max_queue: int = 256, engine: str = "torch", fmt: str = "tinyzero", out: str | None = None):
    """Load the model and serve it until SIGTERM/SIGINT (which finish the requests in flight first).

    With `out`, the session is recorded on shutdown as a `serve` line in OUT/ledger.jsonl."""
    import contextlib

    import uvicorn

    from budgetthink.engine import load_engine
    from budgetthink.formats import get_format
    from budgetthink.ledger import stage_ledger

    think_format = get_format(fmt)
    eng = load_engine(str(model), backend=engine)
    app = create_app(eng, str(model), think_format, api_key=api_key, max_batch=max_batch, max_queue=max_queue)
    if out:  # the session's ledger line, written when the server shuts down
        ledger = contextlib.ExitStack()
        entry = ledger.enter_context(stage_ledger(out, stage="serve", model=str(model)))

        def record():
            entry.add(tokens_generated=int(app.state.metrics.tokens["completion"]))
            ledger.close()

        app.state.on_shutdown.append(record)
    log.info("serving %s on http://%s:%d/v1", model, host, port)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=None)
