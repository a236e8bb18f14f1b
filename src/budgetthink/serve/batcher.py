"""Whole-call batching, for engines that generate a batch in one call (the vLLM engine, or any object with
`generate`): requests wait in one queue; one worker takes the oldest request together with every waiting
request that has the same sampling and budget settings (up to `max_batch` rows = prompts x n) and runs them in
one `engine.generate` call, in a thread so the event loop stays responsive. A request with a `seed` runs alone,
so that its output does not depend on what it was batched with. The torch engine is served by the continuous
scheduler instead (scheduler.py), where mixed settings share every decoding step.
"""

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from budgetthink.errors import UserError
from budgetthink.serve.api import APIError
from budgetthink.serve.jobs import Job, admit

log = logging.getLogger("budgetthink.serve")


def batch_key(job: Job) -> str:
    """Jobs with equal keys may share an engine call (a seeded job has a key of its own)."""
    return job.sampling.model_dump_json() + job.budget.model_dump_json() + (str(id(job)) if job.sampling.seed is not None else "")


class Batcher:
    """A queue of jobs and the one worker that runs them through the engine in batches."""

    def __init__(self, engine, fmt, metrics, max_batch: int = 32, max_queue: int = 256, window: float = 0.05):
        self.engine, self.fmt, self.metrics = engine, fmt, metrics
        self.max_batch, self.max_queue, self.window = max_batch, max_queue, window
        self.waiting: list[Job] = []
        self.running = self.rows = 0  # requests and rows in the engine call
        self.closing = False
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

    def submit(self, job: Job) -> Job:
        admit(len(self.waiting), self.max_queue, self.closing)
        self.waiting.append(job)
        self.wake.set()
        return job

    def cancel(self, job: Job):
        """The client is gone: drop the job if it has not started (a running batch finishes and is discarded)."""
        job.cancelled = True
        if job in self.waiting:
            self.waiting.remove(job)

    def take(self) -> list[Job]:
        """The oldest job and every waiting job with the same settings, oldest first, up to max_batch rows."""
        key = batch_key(self.waiting[0])
        batch, rows = [], 0
        for job in list(self.waiting):
            if batch_key(job) == key and (not batch or rows + job.rows <= self.max_batch):
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
            self.running, self.rows = len(batch), self.last_rows
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
                self.running = self.rows = 0

    async def run(self, batch: list[Job]):
        """One engine call for the batch; each job gets its own completions, prompt-major."""
        ns = {job.n for job in batch}
        n = ns.pop() if len(ns) == 1 else 1  # mixed n: repeat each prompt n times and sample once
        ids = [p for job in batch for p in job.prompt_ids for _ in range(job.n // n)]
        head = batch[0]
        t0 = time.perf_counter()
        try:
            outs = await asyncio.get_running_loop().run_in_executor(
                self.pool, lambda: self.engine.generate([""] * len(ids), sampling=head.sampling, n=n, budget=head.budget,
                                                        fmt=self.fmt, prompt_ids=ids))
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
        self.metrics.batch_rows += len(ids) * n
        if len(outs) != len(ids) * n:
            raise RuntimeError(f"engine returned {len(outs)} completions for {len(ids) * n} rows")
        start = 0
        for job in batch:
            if not job.future.done():
                job.future.set_result(outs[start:start + job.rows])
            start += job.rows
