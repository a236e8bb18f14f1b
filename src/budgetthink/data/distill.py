"""Reasoning traces from a teacher, one JSONL line per problem: the raw pool that `curate` filters.

    budgetthink distill --task countdown --teacher solver --n 1000 --out traces.jsonl
    budgetthink distill --task countdown --teacher solver --n 1000 --stated-budgets 16,32,64,128 --out stated.jsonl
    budgetthink distill --task countdown --teacher model:runs/tiny --n 200 --out traces.jsonl --max-thinking-tokens 128
    budgetthink distill --task math --problems problems.jsonl --teacher openai:https://api.example.com/v1 \
        --model-name some-reasoner --concurrency 16 --price-in 0.55 --price-out 2.19 --out traces.jsonl

A teacher SPEC is one of three forms:
- `solver`: the task's programmatic solver (`task.solve`): search traces for Countdown, long hand for multiplication.
- `model:PATH`: a local model directory through the generation engine, with the budget flags (budget forcing).
- `openai:BASE_URL` with `model_name`: any OpenAI-compatible endpoint (vLLM, a hosted reasoning model, our own
  `budgetthink serve`) through the official `openai` client. Thinking is the message's `reasoning_content` (or
  `reasoning`) where the server returns it, else the text inside think tags of the content. The key comes from
  the environment variable `api_key_env` (not needed for a loopback server). `concurrency` requests are in
  flight at once (asyncio); 429, 408, 409, 5xx, time-outs and dropped connections are retried with exponential
  backoff and jitter, honouring `Retry-After` (the client's own retries are off so that every wait is ours and
  counted). 401/403/404 stop the run (a wrong key, model or URL would fail every request). Another 4xx is the
  teacher refusing this one problem: it is written as an error line (curation's quality stage drops it).
  Retry-After is honoured up to `max_backoff`. A budget goes in the request body as the extra fields
  `budgetthink serve` reads (max_thinking_tokens, min_thinking_tokens, thinking_extensions, extension_string,
  answer_prefix); other servers may ignore or refuse them, so none is sent without an active budget.

With `stated_budgets` the solver writes each trace under a thinking budget B drawn from the list (Countdown:
the search's first B characters, the tiny tokenizer's tokens, then the solution if the cut trace checked it,
else the last attempt it checked; see tasks/countdown.py `search`), and the line carries `budget`, which `sft`
states in the prompt. Such data teaches a model what a stated budget means before budget-aware RL; without
it the tiny model reads the budget phrase as noise (issue 13).

Each line: id, task, problem (the Problem dict), thinking, answer, teacher, model, reward, correct (the task's
score of the answer), thinking_tokens (the engine's count of sampled thinking tokens, the server's reported
reasoning tokens, or a count with `tokenizer`; None when nothing can count them), thinking_chars, usage
(prompt/completion tokens), cost (usage times price per million tokens, None without prices), finish_reason,
seconds, error (None, or why the teacher gave no trace).

Nothing is lost: each result is appended as one line (flushed, fsynced) the moment it completes, so Ctrl-C
loses at most the requests in flight. A rerun reads `out`, drops a half-written last line left by a crash and
skips every id already there, so each id ends up exactly once; `retry_errors=True` first removes the error
lines so that those problems are asked again. Requests that still fail after all retries are not written
(a rerun asks them again) and are counted in the summary.
"""

import asyncio
import email.utils
import inspect
import math
import os
import random
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from budgetthink.budget import enforced
from budgetthink.engine import Budget, Sampling
from budgetthink.errors import UserError
from budgetthink.formats import Prompter, get_format
from budgetthink.jsonl import append_jsonl, iter_jsonl, repair_jsonl, write_jsonl
from budgetthink.tasks import Problem, get_task

TEACHER_FORMS = "solver, model:PATH or openai:BASE_URL (with --model-name)"
RETRY_STATUS = {408, 409, 429}  # plus every 5xx
FATAL_STATUS = {401, 403, 404}


def parse_teacher(spec: str) -> tuple[str, str | None]:
    """("solver", None) | ("model", PATH) | ("openai", BASE_URL)."""
    spec = (spec or "").strip()
    if spec == "solver":
        return "solver", None
    kind, sep, arg = spec.partition(":")
    if sep and kind in ("model", "openai") and arg.strip():
        return kind, arg.strip()
    raise UserError(f"bad teacher {spec!r}; use one of {TEACHER_FORMS}")


def load_problems(task, n: int | None, seed: int, problems_path: str | Path | None) -> list[Problem]:
    """The first n problems of `problems_path` (all if n is None), or n generated ones; ids unique."""
    if problems_path is not None:
        problems = [Problem.from_dict(d) for d in iter_jsonl(problems_path)]
        if n is not None:
            problems = problems[:n]
    else:
        if n is None or n < 1:
            raise UserError(f"--n must be a positive number of problems, got {n}")
        problems = task.generate(n, seed)
    unique, seen = [], set()
    for p in problems:
        if p.id not in seen:
            seen.add(p.id)
            unique.append(p)
    if len(unique) < len(problems):
        print(f"distill: {len(problems) - len(unique)} duplicate problem ids skipped", file=sys.stderr)
    return unique


def split_thinking(content: str, reasoning: str | None, fmt) -> tuple[str, str]:
    """(thinking, answer) of a chat reply: the server's reasoning field if any, else the think tags in content.

    The format's delimiters are tried first, then `<think>...</think>`; an opening tag is optional (R1-style
    servers drop it from the content). No closing tag and no reasoning field: no thinking, all answer."""
    content = content or ""
    if reasoning:
        return reasoning, content.strip()
    for open_, close in ((fmt.think_open, fmt.think_close), ("<think>", "</think>")):
        head, sep, tail = content.partition(close)
        if sep:
            start = head.find(open_)
            thinking = head[start + len(open_):] if start >= 0 else head
            if tail.startswith(fmt.answer_prefix) and close == fmt.think_close:
                tail = tail[len(fmt.answer_prefix):]
            return thinking.strip("\n"), tail.strip()
    return "", content.strip()


def price(usage: dict, price_in: float | None, price_out: float | None) -> float | None:
    """Dollars for `usage` at prices per million prompt/completion tokens (None if no price is given)."""
    if price_in is None and price_out is None:
        return None
    return ((usage.get("prompt_tokens") or 0) * (price_in or 0.0)
            + (usage.get("completion_tokens") or 0) * (price_out or 0.0)) / 1e6


class _Counter:
    """Counts tokens with a Hugging Face tokenizer when one is given (for teachers that report none)."""

    def __init__(self, tokenizer):
        self.tok = None
        if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
            self.tok = tokenizer
        elif tokenizer is not None:
            from transformers import AutoTokenizer
            self.tok = AutoTokenizer.from_pretrained(str(tokenizer))

    def __call__(self, text: str) -> int | None:
        if self.tok is None:
            return None
        return len(self.tok(text, add_special_tokens=False)["input_ids"])


def _record(task, problem: Problem, teacher: str, thinking: str, answer: str, **extra) -> dict:
    score = task.score(problem, answer)
    rec = {"id": problem.id, "task": problem.task, "problem": problem.to_dict(), "thinking": thinking,
           "answer": answer, "teacher": teacher, "model": None, "reward": score.reward, "correct": score.correct,
           "thinking_tokens": None, "thinking_chars": len(thinking), "usage": {}, "cost": None,
           "finish_reason": "stop", "seconds": None, "error": None}
    rec.update(extra)
    return rec


def _error_record(problem: Problem, teacher: str, error: str, **extra) -> dict:
    rec = {"id": problem.id, "task": problem.task, "problem": problem.to_dict(), "thinking": "", "answer": "",
           "teacher": teacher, "model": None, "reward": None, "correct": False, "thinking_tokens": None,
           "thinking_chars": 0, "usage": {}, "cost": None, "finish_reason": None, "seconds": None, "error": error}
    rec.update(extra)
    return rec


def _bar(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="trace", file=sys.stderr, dynamic_ncols=True,
                disable=os.environ.get("BUDGETTHINK_NO_PROGRESS") == "1")


# ---- teacher: the task's solver -------------------------------------------------------------------------
def _run_solver(task, todo, out, teacher, count, stats, stated_budgets=None, seed=0, chunk: int = 64):
    """Solves are instant, so results are written `chunk` at a time (one fsync per chunk). With
    `stated_budgets` each problem draws one of them (uniformly, seeded by the run's seed and the problem's id)
    and the solver writes the trace it would under that budget; the line records it as `budget`."""
    with _bar(len(todo), "solver") as bar:
        for start in range(0, len(todo), chunk):
            records = []
            for p in todo[start:start + chunk]:
                t0 = time.perf_counter()
                if stated_budgets:
                    b = random.Random(f"distill-budget:{seed}:{p.id}").choice(stated_budgets)
                    trace, extra = task.solve(p, budget=b), {"budget": b}
                else:
                    trace, extra = task.solve(p), {}
                secs = time.perf_counter() - t0
                if trace is None:
                    records.append(_error_record(p, teacher, "the solver found no solution", seconds=secs, **extra))
                else:
                    records.append(_record(task, p, teacher, trace.thinking, trace.answer,
                                           thinking_tokens=count(trace.thinking), seconds=secs, **extra))
            append_jsonl(out, records)
            stats["written"] += len(records)
            stats["errors"] += sum(r["error"] is not None for r in records)
            bar.update(len(records))


# ---- teacher: a local model through the engine ----------------------------------------------------------
def _run_model(task, todo, out, teacher, path, fmt, sampling, budget, batch_size, backend, price_in, price_out,
               count, stats):
    from budgetthink.engine import load_engine

    if not Path(path).exists():
        raise UserError(f"teacher model {path!r} not found; pass model:DIR with a model directory")
    engine = load_engine(path, backend=backend)
    prompter = Prompter(fmt, engine.tokenizer)  # the teacher's chat template when it has one, as every command
    with _bar(len(todo), "model") as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            encoded = [prompter.encode(p.prompt) for p in chunk]
            t0 = time.perf_counter()
            outs = engine.generate([t for t, _ in encoded], sampling, n=1, budget=budget, fmt=fmt,
                                   prompt_ids=[ids for _, ids in encoded])  # len(chunk) Completions
            secs = (time.perf_counter() - t0) / len(chunk)
            records = []
            for p, (_, ids), c in zip(chunk, encoded, outs):
                usage = {"prompt_tokens": len(ids),
                         "completion_tokens": sum(c.sampled), "thinking_tokens": c.thinking_tokens,
                         "answer_tokens": c.answer_tokens, "extensions": c.extensions}
                records.append(_record(task, p, teacher, c.thinking, c.answer, model=str(path),
                                       thinking_tokens=c.thinking_tokens, usage=usage,
                                       cost=price(usage, price_in, price_out), finish_reason=c.finish_reason,
                                       seconds=secs))
            append_jsonl(out, records)
            stats["written"] += len(records)
            bar.update(len(records))


# ---- teacher: an OpenAI-compatible endpoint ---------------------------------------------------------------
def _retry_after(err) -> float | None:
    """Seconds the server asked us to wait (Retry-After as seconds or an HTTP date, or retry-after-ms)."""
    response = getattr(err, "response", None)
    headers = getattr(response, "headers", None) or {}
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, when.timestamp() - time.time()) if when else None


def _api_key(base_url: str, env: str) -> str:
    key = os.environ.get(env)
    if key:
        return key
    host = urlparse(base_url).hostname or ""
    if host in ("localhost", "127.0.0.1", "::1") or host.startswith("127."):
        return "EMPTY"  # a local server (vLLM, budgetthink serve) takes any key
    raise UserError(f"no API key for {base_url}: set the environment variable {env} (or name another with --api-key-env)")


async def _ask(client, task, p, teacher, model_name, fmt, sampling, budget, retries, backoff, max_backoff,
               price_in, price_out, count, stats, rng):
    """The record for one problem, or None if it still failed after all retries."""
    import openai

    kwargs = {"model": model_name, "messages": [{"role": "user", "content": p.prompt}],
              "max_tokens": sampling.max_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p}
    if sampling.stop:
        kwargs["stop"] = sampling.stop
    if sampling.seed is not None:
        kwargs["seed"] = sampling.seed
    extra = {}
    if sampling.top_k:
        extra["top_k"] = sampling.top_k
    if enforced(budget) is not None:  # the names `budgetthink serve` reads as extra body fields
        extra.update(max_thinking_tokens=budget.max_thinking_tokens, min_thinking_tokens=budget.min_thinking_tokens,
                     thinking_extensions=budget.extensions, extension_string=budget.extension_string,
                     answer_prefix=budget.answer_prefix)
    if extra:
        kwargs["extra_body"] = extra
    t0 = time.perf_counter()
    for attempt in range(retries + 1):
        try:
            resp = await client.chat.completions.create(**kwargs)
            break
        except openai.APIStatusError as e:
            status = e.status_code
            if status in FATAL_STATUS:
                raise UserError(f"teacher {teacher} answered {status} ({e.message}); check the URL, "
                                f"--model-name and the API key") from None
            if status not in RETRY_STATUS and status < 500:
                return _error_record(p, teacher, f"HTTP {status}: {e.message}", model=model_name,
                                     seconds=time.perf_counter() - t0)
            wait = _retry_after(e)
            why = f"HTTP {status}"
        except (openai.APITimeoutError, openai.APIConnectionError) as e:
            wait, why = None, type(e).__name__
        if attempt == retries:
            stats["failed"] += 1
            stats["last_failure"] = why
            return None
        stats["retried"] += 1
        stats["retry_reasons"][why] = stats["retry_reasons"].get(why, 0) + 1
        if wait is None:
            wait = min(max_backoff, backoff * 2.0 ** min(attempt, 40)) * (0.5 + 0.5 * rng.random())
        wait = min(wait, max_backoff)  # a Retry-After is honoured up to max_backoff
        await asyncio.sleep(wait)
    secs = time.perf_counter() - t0
    if not resp.choices:
        return _error_record(p, teacher, "the server returned no choices", model=model_name, seconds=secs)
    choice = resp.choices[0]
    msg = choice.message
    fields = msg.model_extra or {}
    reasoning = fields.get("reasoning_content") or fields.get("reasoning")
    thinking, answer = split_thinking(msg.content or "", reasoning, fmt)
    usage, reported = {}, None
    if resp.usage is not None:
        usage = {"prompt_tokens": resp.usage.prompt_tokens, "completion_tokens": resp.usage.completion_tokens}
        details = resp.usage.completion_tokens_details
        reported = getattr(details, "reasoning_tokens", None) if details is not None else None
        if reported is not None:
            usage["reasoning_tokens"] = reported
    thinking_tokens = reported if reported is not None else count(thinking)  # 0 is a report too
    return _record(task, p, teacher, thinking, answer, model=model_name, thinking_tokens=thinking_tokens,
                   usage=usage, cost=price(usage, price_in, price_out), finish_reason=choice.finish_reason,
                   seconds=secs)


async def _run_openai(task, todo, out, teacher, base_url, model_name, fmt, sampling, budget, concurrency,
                      api_key_env, retries, backoff, max_backoff, request_timeout, price_in, price_out, count, stats,
                      seed):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=_api_key(base_url, api_key_env), max_retries=0,
                         timeout=request_timeout)
    pending = iter(todo)  # shared by the workers: asyncio runs one at a time, so next() never races
    bar = _bar(len(todo), "teacher")

    async def worker(k: int):
        rng = random.Random(f"backoff:{seed}:{k}")
        for p in pending:
            rec = await _ask(client, task, p, teacher, model_name, fmt, sampling, budget, retries, backoff,
                             max_backoff, price_in, price_out, count, stats, rng)
            if rec is not None:
                append_jsonl(out, rec)  # written the moment it completes: Ctrl-C loses only what is in flight
                stats["written"] += 1
                stats["errors"] += rec["error"] is not None
            bar.update(1)

    try:
        async with asyncio.TaskGroup() as group:
            for k in range(min(concurrency, len(todo))):
                group.create_task(worker(k))
    except BaseExceptionGroup as eg:  # one worker hit a fatal answer: the others were cancelled
        for e in eg.exceptions:
            if isinstance(e, UserError):
                raise e from None
        raise
    finally:
        bar.close()
        await client.close()


# ---- the command ------------------------------------------------------------------------------------------
def _distill(task: str, teacher: str, n: int | None, out: str | Path, seed: int = 0, budget: Budget | None = None,
            sampling: Sampling | None = None, model_name: str | None = None, concurrency: int = 8,
            api_key_env: str = "OPENAI_API_KEY", price_in: float | None = None, price_out: float | None = None,
            fmt: str = "tinyzero", task_options: dict | None = None, problems_path: str | Path | None = None,
            engine: str = "torch", tokenizer=None, retries: int = 8, backoff: float = 1.0,
            max_backoff: float = 60.0, request_timeout: float = 600.0, retry_errors: bool = False,
            stated_budgets: list[int] | None = None) -> dict:
    """Write a teacher's trace for each problem not yet in `out`; returns a summary of the run.

    task/task_options: which problems (and how they are scored); n, seed: how many, generated with this seed
    (or the first n of problems_path). teacher: a SPEC (see the module docstring). budget, sampling: budget
    forcing and sampling for model: and openai: teachers. concurrency: requests in flight (openai:) or the
    batch size (model:). tokenizer: a tokenizer (or its directory) to count thinking tokens where the teacher
    reports none. retries/backoff/max_backoff/request_timeout: the openai: retry loop (seconds).
    stated_budgets: solver teacher only: traces written under a thinking budget drawn from this list (see
    `_run_solver`), for budget-aware training."""
    kind, arg = parse_teacher(teacher)
    if stated_budgets:
        if kind != "solver":
            raise UserError("--stated-budgets needs --teacher solver (a model teacher is told a budget through "
                            "--max-thinking-tokens instead)")
        if any(b < 1 for b in stated_budgets):
            raise UserError(f"--stated-budgets must be positive token counts, e.g. 16,32,64,128; got {stated_budgets}")
    if kind == "openai" and not model_name:
        raise UserError(f"teacher {teacher!r} needs --model-name (the model the endpoint serves)")
    if concurrency < 1:
        raise UserError(f"--concurrency must be at least 1, got {concurrency}")
    for name, value in (("--price-in", price_in), ("--price-out", price_out)):
        if value is not None and (value < 0 or not math.isfinite(value)):
            raise UserError(f"{name} must be a non-negative price per million tokens, got {value}")
    budget = budget or Budget()
    sampling = sampling or Sampling()
    think_fmt = get_format(fmt)
    task_obj = get_task(task, **(task_options or {}))
    if stated_budgets and "budget" not in inspect.signature(task_obj.solve).parameters:
        raise UserError(f"the {task} solver cannot write a trace under a budget; --stated-budgets works with countdown")
    problems = load_problems(task_obj, n, seed, problems_path)
    out = Path(out)

    done: set[str] = set()
    repaired = 0
    if out.exists():
        repaired = repair_jsonl(out)  # a half-written last line from a crash: dropped here, redone below
        records = list(iter_jsonl(out))
        if retry_errors and any(r.get("error") for r in records):
            records = [r for r in records if not r.get("error")]
            write_jsonl(out, records)
        done = {str(r.get("id")) for r in records}
    todo = [p for p in problems if p.id not in done]
    stats = {"written": 0, "errors": 0, "failed": 0, "retried": 0, "retry_reasons": {}}
    print(f"distill: {len(problems)} problems, {len(problems) - len(todo)} already in {out}"
          + (f" (dropped a half-written last line of {repaired} bytes)" if repaired else "")
          + f", {len(todo)} to ask {teacher}", file=sys.stderr)
    count = _Counter(tokenizer)
    if todo:
        if kind == "solver":
            _run_solver(task_obj, todo, out, teacher, count, stats, stated_budgets, seed)
        elif kind == "model":
            _run_model(task_obj, todo, out, teacher, arg, think_fmt, sampling, budget, concurrency, engine,
                       price_in, price_out, count, stats)
        else:
            asyncio.run(_run_openai(task_obj, todo, out, teacher, arg, model_name, think_fmt, sampling, budget,
                                    concurrency, api_key_env, retries, backoff, max_backoff, request_timeout,
                                    price_in, price_out, count, stats, seed))
    if stats["failed"]:
        print(f"distill: {stats['failed']} requests still failed after {retries} retries "
              f"(last: {stats.get('last_failure')}); rerun the same command to ask them again", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.touch()
    lines = list(iter_jsonl(out))
    costs = [r["cost"] for r in lines if r.get("cost") is not None]
    summary = {"out": str(out), "teacher": teacher, "problems": len(problems), "skipped": len(problems) - len(todo),
               "written": stats["written"], "errors": stats["errors"], "failed": stats["failed"],
               "retried": stats["retried"], "retry_reasons": stats["retry_reasons"], "repaired_bytes": repaired,
               "lines": len(lines), "correct": sum(bool(r.get("correct")) for r in lines),
               "cost": sum(costs) if costs else None}
    return summary


def distill(task: str, teacher: str, n: int | None, out: str | Path, **kwargs) -> dict:
    """`_distill`, recorded as the `distill` stage in the ledger beside `out` (teacher API tokens and cost)."""
    from budgetthink.ledger import stage_ledger

    done = len(list(iter_jsonl(out))) if Path(out).exists() else 0
    with stage_ledger(Path(out).parent, stage="distill", model=None) as entry:
        summary = _distill(task, teacher, n, out, **kwargs)
        new = list(iter_jsonl(out))[done:]  # the lines this run wrote
        usage = [r.get("usage") or {} for r in new]
        costs = [r["cost"] for r in new if r.get("cost") is not None]
        api = teacher.startswith("openai:")
        entry.add(tokens_generated=0 if api else sum(int(r.get("thinking_tokens") or 0) for r in new),
                  api_input_tokens=sum(int(u.get("prompt_tokens") or 0) for u in usage) if api else 0,
                  api_output_tokens=sum(int(u.get("completion_tokens") or 0) for u in usage) if api else 0,
                  api_model=kwargs.get("model_name") if api else None,
                  api_cost=sum(costs) if api and costs else None)
    return summary
