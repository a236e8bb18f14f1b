"""Continuous batching over the torch engine: every running request's rows decode in one batch, whatever their
sampling settings, budgets and lengths; a request joins between two decoding steps and leaves when its last
row is done (or at once when its client disconnects or its time is up).

The engine already keeps everything per row: the KV cache (`RowCache`: each row at its own positions and
length), the attention mask and position ids, and budget forcing (`Forcing`, a per-row state machine). So a
running request here is a *group* of rows with its own `Forcing` (its budget, stop strings, max_tokens), its
own sampling settings and seeded generator, and its own output buffers; the groups' rows sit side by side in
one `RowCache`, and each decoding step is one forward of all of them. Sampling runs once per kind of
settings, the budget rules per group on its rows (a few tensor ops per group), so no setting ever has to
match another's.

One step, in the engine thread (`TorchEngine._run` does the same for a single group):
1. admit: the oldest waiting requests that fit in `max_batch` rows (first come, first served: a request that
   does not fit waits for rows to free up, and later ones wait behind it, so none starves; while others
   decode, joiners are gathered for up to JOIN_PATIENCE steps to share one prefill); their prompts are
   prefilled together and their rows appended to the cache;
2. sample: the groups that share sampling settings in one call, each with its own generator's draws; then
   each group applies its budget rules (`Forcing.advance`);
3. finished rows become Completions; a group with no row left settles its request; cancelled groups and
   finished rows leave the cache (when a group ends, or an eighth of the rows are done, as in the engine);
4. one forward: every live row feeds one token (a sampled token, or the next token of an inserted string).

Numerics: a row's tokens do not depend on what it is batched with, except that batched matrix products may
round differently (see the engine's docstring); greedy requests match `engine.generate` run alone.
"""

import asyncio
import logging
import threading
import time

import torch

from budgetthink.budget import Forcing
from budgetthink.engine import completion
from budgetthink.engine.torch import ATTENTION, GREEDY_BELOW, RowCache, left_padded, room, sample, uniforms
from budgetthink.errors import UserError
from budgetthink.serve.api import APIError
from budgetthink.serve.jobs import Job, admit

log = logging.getLogger("budgetthink.serve")
JOIN_PATIENCE = 4  # steps a joiner may wait for others to prefill with (see Scheduler.join)


class Group:
    """One request's rows (prompt-major, n per prompt) and their state."""

    def __init__(self, engine, fmt, job: Job):
        dev, n = engine.device, job.n
        self.job, self.engine, self.fmt, self.n = job, engine, fmt, n
        P = len(job.prompt_ids)
        B = P * n
        self.forcing = Forcing(engine.tokenizer, fmt, job.budget, job.sampling, engine.eos, rows=B,
                               vocab=engine.vocab, device=dev, context=engine.context, memo=engine._memo)
        lengths = torch.tensor([len(p) for p in job.prompt_ids], dtype=torch.long, device=dev)
        self.rep = torch.arange(P, device=dev).repeat_interleave(n)  # [B] prompt of each row
        self.plen = lengths[self.rep]  # [B]
        start = self.forcing.start_ids(self.plen)
        self.seqs = [p + start for p in job.prompt_ids]  # what the prefill feeds
        cap = job.sampling.max_tokens + len(start) + self.forcing.max_insert + 8
        self.out_tok = torch.full((B, cap), engine.pad, dtype=torch.long, device=dev)  # [B, cap] after the prompt
        self.out_lp = torch.zeros(B, cap, device=dev)  # [B, cap] log-probs (0 for inserted)
        self.out_smp = torch.zeros(B, cap, dtype=torch.bool, device=dev)  # [B, cap] sampled?
        self.out_tok[:, :len(start)] = torch.tensor(start, dtype=torch.long, device=dev)
        self.out_len = torch.full((B,), len(start), dtype=torch.long, device=dev)
        self.last_prompt = torch.tensor([p[-1] for p in job.prompt_ids], dtype=torch.long, device=dev)[self.rep]
        self.row_id = torch.arange(B, device=dev)  # [B] index of each row in `results`
        self.cache_len = None  # [B] tokens of each row in the cache (set by the prefill)
        self.results = [None] * B
        seed = job.sampling.seed
        self.generator = None if seed is None else torch.Generator(dev).manual_seed(seed)

    @property
    def rows(self) -> int:
        return len(self.row_id)

    def take(self, x: torch.Tensor, lp: torch.Tensor) -> None:
        """Keep the ready rows' sampled tokens x [b] (log-probs lp [b]) and apply the budget rules (the engine's
        step, per group)."""
        f, pad = self.forcing, self.engine.pad
        b = self.rows
        rows = torch.arange(b, device=x.device)
        ready = f.live & (self.cache_len == self.plen + self.out_len)  # [b] rows whose whole sequence is cached
        if int(self.out_len.max()) + 1 + f.max_insert > self.out_tok.shape[1]:  # room for this step's writes
            grow = self.out_tok.shape[1]
            self.out_tok = torch.cat([self.out_tok, self.out_tok.new_full((b, grow), pad)], 1)
            self.out_lp = torch.cat([self.out_lp, self.out_lp.new_zeros(b, grow)], 1)
            self.out_smp = torch.cat([self.out_smp, self.out_smp.new_zeros(b, grow)], 1)
        at = torch.where(ready, self.out_len, self.out_tok.shape[1] - 1)  # rows not sampling write to a spare slot
        self.out_tok[rows, at], self.out_lp[rows, at], self.out_smp[rows, at] = x, lp.float(), True
        self.out_len += ready
        for r, (drop, ins) in f.advance(self.out_tok, self.out_len, ready.long(), self.plen).items():
            end = int(self.out_len[r]) - drop
            self.cache_len[r] = min(int(self.cache_len[r]), int(self.plen[r]) + end)  # a removed delimiter leaves
            m = len(ins)
            self.out_tok[r, end:end + m] = torch.tensor(ins, dtype=torch.long, device=x.device)
            self.out_lp[r, end:end + m], self.out_smp[r, end:end + m] = 0.0, False
            self.out_len[r] = end + m

    def keep_live(self) -> torch.Tensor:
        """Turn the finished rows into Completions and keep only the live ones; their local indices before."""
        live = self.forcing.live
        for r in (~live).nonzero().flatten().tolist():
            m, i = int(self.out_len[r]), int(self.row_id[r])
            self.results[i] = completion(self.engine.tokenizer, self.fmt, self.engine.eos, self.forcing, r, i, self.n,
                                         self.out_tok[r, :m].tolist(), self.out_lp[r, :m].tolist(),
                                         self.out_smp[r, :m].tolist())
        keep = live.nonzero().flatten()
        self.forcing.select(keep)
        for name in ("out_tok", "out_lp", "out_smp", "out_len", "plen", "last_prompt", "row_id", "cache_len"):
            setattr(self, name, getattr(self, name)[keep])
        return keep

    def feed(self):
        """The token each live row feeds this step: (ids [b, 1], k [b], cache_len [b] before it)."""
        live = self.forcing.live
        refeed = live & (self.cache_len == self.plen + self.out_len)  # nothing pending: recompute the last token
        self.cache_len = self.cache_len - refeed.long()
        src = (self.cache_len - self.plen)[:, None]  # [b, 1] output index to feed (-1: the prompt's last token)
        ids = torch.where(src < 0, self.last_prompt[:, None], self.out_tok.gather(1, src.clamp(min=0)))
        return ids, live.long(), self.cache_len


def merge(a: RowCache | None, b: RowCache) -> RowCache:
    """One cache holding a's rows, then b's (each row's used positions copied, with room to grow)."""
    if a is None or not a.keys:
        return b
    used = max(a.used, b.used)
    cap = used + room(used)
    out = RowCache(cap=cap, rows=0, device=b.off.device)
    for src_a, src_b, dst in ((a.keys, b.keys, out.keys), (a.values, b.values, out.values)):
        for ta, tb in zip(src_a, src_b):
            t = ta.new_zeros(ta.shape[0] + tb.shape[0], ta.shape[1], cap, ta.shape[3])
            t[:ta.shape[0], :, :a.used] = ta[:, :, :a.used]
            t[ta.shape[0]:, :, :b.used] = tb[:, :, :b.used]
            dst.append(t)
    out.off, out.used = torch.cat([a.off, b.off]), used
    return out


class Scheduler:
    """The queue, and the engine thread that runs the continuous batch (see the module docstring)."""

    def __init__(self, engine, fmt, metrics, max_batch: int = 32, max_queue: int = 256):
        self.engine, self.fmt, self.metrics = engine, fmt, metrics
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: list[Job] = []  # guarded by `cond`
        self.groups: list[Group] = []  # the running batch, in cache row order (engine thread only)
        self.cache: RowCache | None = None
        self.waited = 0  # steps the oldest waiting job has been held back to join with others
        self.logits: torch.Tensor | None = None  # [B, V] next-token logits of every row
        self.closing = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self.loop, name="engine", daemon=True)

    # --- the event loop's side
    @property
    def running(self) -> int:
        return len(self.groups)

    @property
    def rows(self) -> int:
        return sum(g.rows for g in self.groups)

    def start(self):
        self.thread.start()

    async def close(self):
        """Finish everything queued and running, then stop the engine thread."""
        with self.cond:
            self.closing = True
            self.cond.notify()
        await asyncio.get_running_loop().run_in_executor(None, self.thread.join)

    def submit(self, job: Job) -> Job:
        with self.cond:
            admit(len(self.waiting), self.max_queue, self.closing)
            self.waiting.append(job)
            self.cond.notify()
        return job

    def cancel(self, job: Job):
        """The client is gone (or out of time): a waiting job leaves the queue, a running one its rows at the
        next step."""
        job.cancelled = True
        with self.cond:
            if job in self.waiting:
                self.waiting.remove(job)

    # --- the engine thread
    def loop(self):
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self.waiting and not self.groups:
                        if self.closing:
                            return
                        self.cond.wait()
                try:
                    self.join()
                    if self.groups:
                        self.step()
                except Exception as e:  # never let the thread die: fail the running requests and go on
                    log.exception("engine step failed")
                    err = APIError(500, f"engine error: {type(e).__name__}: {e}", type="server_error",
                                   code="engine_error")
                    for g in self.groups:
                        g.job.settle(error=err)
                    self.groups, self.cache, self.logits = [], None, None

    def join(self):
        """Admit the oldest waiting jobs that fit, prefill them together, and append their rows. While others
        decode, joiners are gathered first: until their rows fill an eighth of the batch or the oldest has
        waited JOIN_PATIENCE steps. A prefill reads every weight once whatever its rows, like a decoding step,
        so where that reading is the cost (a real model on a CPU) four prompts prefill for about one's price."""
        free = self.max_batch - self.rows
        new = []
        with self.cond:
            few = sum(j.rows for j in self.waiting) < max(1, self.max_batch // 8)
            if self.groups and self.waiting and few and self.waited < JOIN_PATIENCE:
                self.waited += 1
                return
            self.waited = 0
            while self.waiting and self.waiting[0].rows <= free:
                job = self.waiting.pop(0)
                if job.cancelled:
                    continue
                try:
                    group = Group(self.engine, self.fmt, job)
                except UserError as e:  # this request's settings (e.g. a string the tokenizer cannot encode)
                    job.settle(error=APIError(400, str(e), code="invalid_request"))
                    continue
                new.append(group)
                free -= job.rows
        if not new:
            return
        eng, dev = self.engine, self.engine.device
        seqs = [s for g in new for s in g.seqs]
        ids, k = left_padded(seqs, eng.pad, dev)  # [P, L], [P]
        cache = RowCache(cap=ids.shape[1], rows=len(seqs), device=dev)
        t0 = time.perf_counter()
        try:
            logits = self.forward(cache, ids, k, torch.zeros(len(seqs), dtype=torch.long, device=dev))  # [P, V]
        except Exception as e:  # the running batch is untouched: fail only the joining requests
            log.exception("prefill failed")
            for g in new:
                g.job.settle(error=APIError(500, f"engine error: {type(e).__name__}: {e}", type="server_error",
                                            code="engine_error"))
            return
        rep, first = [], 0
        for g in new:
            rep.append(g.rep + first)
            g.cache_len = k[g.rep + first]
            first += len(g.seqs)
        rep = torch.cat(rep)
        cache.select(rep)  # the n rows of each prompt
        self.cache = merge(self.cache, cache)
        self.logits = logits[rep] if self.logits is None else torch.cat([self.logits, logits[rep]])
        self.groups += new
        self.metrics.engine_seconds += time.perf_counter() - t0

    def sample(self):
        """Sample every running group's rows. Groups with the same temperature, top-k and top-p sample in one
        call, each with the draws of its own generator, so a seeded request's tokens do not depend on what it
        is batched with (a step costs one sampling per kind of settings, not one per request)."""
        kinds, at = {}, 0
        for g in self.groups:
            if not g.job.cancelled:
                s = g.job.sampling
                kinds.setdefault((s.temperature, s.top_k, s.top_p), []).append((g, at))
            at += g.rows
        dev = self.logits.device
        for same in kinds.values():
            s = same[0][0].job.sampling
            idx = torch.cat([torch.arange(a, a + g.rows, device=dev) for g, a in same])
            logits = self.logits if len(idx) == len(self.logits) else self.logits[idx]  # [rows of this kind, V]
            r = None if s.temperature < GREEDY_BELOW else torch.cat([uniforms(g.rows, g.generator, dev)
                                                                     for g, _ in same])
            x, lp = sample(logits, s, None, r)
            first = 0
            for g, _ in same:
                g.take(x[first:first + g.rows], lp[first:first + g.rows])
                first += g.rows

    def step(self):
        t0 = time.perf_counter()
        self.sample()
        # finished rows and departed requests leave the batch
        done = sum(int((~g.forcing.live).sum()) for g in self.groups)
        ended = any(g.job.cancelled or not bool(g.forcing.live.any()) for g in self.groups)
        if ended or done >= max(1, self.rows // 8):
            keep, at, groups = [], 0, []
            for g in self.groups:
                b = g.rows
                if g.job.cancelled:
                    at += b
                    continue
                keep.append(g.keep_live() + at)
                at += b
                if g.rows:
                    groups.append(g)
                else:
                    g.job.settle(result=g.results)
            self.groups = groups
            if not groups:
                self.cache = self.logits = None
                return
            self.cache.select(torch.cat(keep))
        feeds = [g.feed() for g in self.groups]
        ids, k, cache_len = (torch.cat(x) for x in zip(*feeds))
        self.logits = self.forward(self.cache, ids, k, cache_len)
        for g, (_, kg, _) in zip(self.groups, feeds):
            g.cache_len = g.cache_len + kg
        self.metrics.batches += 1
        self.metrics.batch_rows += len(ids)
        self.metrics.engine_seconds += time.perf_counter() - t0

    def forward(self, cache, ids, k, cache_len):
        model = self.engine.model
        previous = model.config._attn_implementation
        model.config._attn_implementation = ATTENTION
        try:
            return self.engine._forward(cache, ids, k, cache_len)
        finally:
            model.config._attn_implementation = previous
