"""One request's work as the batchers see it, and the admission rule they share."""

import asyncio
import time
from dataclasses import dataclass, field

from budgetthink.engine import Budget, Sampling
from budgetthink.serve.api import APIError


@dataclass(eq=False)
class Job:
    """A request's prompts (token ids), each sampled n times under its own sampling and budget settings."""

    prompt_ids: list[list[int]]
    n: int
    sampling: Sampling
    budget: Budget
    future: asyncio.Future
    cancelled: bool = False  # the client left or timed out: its rows are freed at the next decoding step
    submitted: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return len(self.prompt_ids) * self.n

    def settle(self, result=None, error: Exception | None = None) -> None:
        """Resolve the future from any thread (once; a departed client's job is dropped)."""
        def set_():
            if not self.future.done():
                if error is not None:
                    self.future.set_exception(error)
                else:
                    self.future.set_result(result)
        self.future.get_loop().call_soon_threadsafe(set_)


def admit(waiting: int, max_queue: int, closing: bool) -> None:
    """Refuse a new job when the server is shutting down (503) or the queue is full (429)."""
    if closing:
        raise APIError(503, "the server is shutting down; retry on another instance", type="server_error",
                       code="shutting_down")
    if waiting >= max_queue:
        raise APIError(429, f"the queue is full ({max_queue} requests waiting); retry shortly",
                       type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
