"""Budget forcing (s1) as a per-row state machine that runs inside the engine's decoding loop.

    forcing = Forcing(tokenizer, fmt, budget, sampling, eos_ids, rows=B, vocab=V, device=dev, context=C)
    out_ids = forcing.start_ids()              # what follows the prompt before the first sample ([] or a forced end)
    ... every step: the engine samples x [B] for the `ready` rows (whose sequence is all in the cache),
    appends it to their output, then
    edits = forcing.advance(x, out_tok, out_len, prompt_len, ready)   # {row: (tokens to drop, ids to append)}

The engine owns the mechanics (KV cache, batching, sampling); this module owns the rules: which phase each
row is in (thinking or answer), how many tokens it has sampled, when an end of thinking is removed and the
extension string appended, when the end is forced, and when the row is finished. The common step is a few
vectorised tensor ops over the batch; Python runs only for the rare rows with an event (an end of thinking,
an end-of-text while thinking, a stop string candidate, a forced end).

Semantics (DESIGN.md, "Budget forcing semantics (s1)"), per row, stated as the naive procedure the tests
reimplement (run the model over the whole sequence for every token; insert = append the ids of a string
encoded on its own with add_special_tokens=False):

    loop:
      if sampled >= sampling.max_tokens:            finish "length"                 (every sampled token counts,
                                                                                      kept or removed, EOS too)
      if answering and answer_tokens >= budget.max_answer_tokens: finish (answer cap)
      if prompt + output reach the model's context: finish "length"
      if thinking and max_thinking_tokens is set and thinking_tokens >= max_thinking_tokens:
          append close + budget.answer_prefix (inserted), answer phase, forced        -- no extension after
      x = sample(); sampled += 1
      thinking, x is end-of-text:
          extension due (thinking_tokens < min or extensions < N): append the extension string (x dropped)
          otherwise: append close + budget.answer_prefix (x dropped), answer phase, forced
      thinking, otherwise: keep x, thinking_tokens += 1; if the end of thinking is detected (below):
          the delimiter's tokens stop counting as thinking; extension due: drop them, append the extension
          string; otherwise keep them: answer phase (the model closed thinking itself, nothing is inserted)
      answering: keep x, answer_tokens += 1; x is end-of-text or a stop string appears: finish "stop"

"Extension due" is evaluated after the delimiter's tokens were uncounted: thinking_tokens < min_thinking_tokens
or extensions < budget.extensions. Each insertion of the extension string counts as one extension.

End-of-thinking detection, one rule for single- and multi-token delimiters: a *segment* is the run of
sampled tokens since thinking began or since the last inserted string; the model has ended thinking when the
decoded text of the current segment contains the format's `think_close` (checked after every sampled token,
so the first time it does). Inserted text never counts as part of a model-written delimiter. The delimiter's
tokens are those from the first one whose text reaches into the occurrence of `think_close` to the end: the
kept thinking is the longest prefix of the segment whose decoded text ends at or before the occurrence starts
(so a token that straddles the delimiter's start is removed with it). A single-token delimiter is the case
where that is just the last token.

Counts: `thinking_tokens` counts the sampled tokens kept in the thinking (a model-written delimiter and an
end-of-text are not thinking); `answer_tokens` counts sampled tokens after the end of thinking (the
delimiter itself excluded; a final end-of-text included, and kept in the token ids so RL sees it). The
budget is checked after each sample, so while a multi-token delimiter is being written its first tokens count
until it is recognised. `Sampling.max_tokens` is a hard cap on everything the model samples for the row
(including removed delimiters and end-of-text tokens), so the loop always ends even if the model keeps
closing its thinking under a minimum; a row stopped by it reports finish "length" even in mid-thinking.

Without an active budget (no max, min 0, no extensions) nothing is ever inserted and there is no answer cap:
the row runs until end-of-text, a stop string (anywhere in the text) or `max_tokens`; with a format the
phases are still tracked so thinking and answer tokens are counted. With an active budget stop strings are
looked for only in the answer (the text after the closing delimiter). Stop strings and end-of-text are kept
in the output.

finish_reason: "length" when `max_tokens` or the context ended the row; else "forced" when the end of
thinking was forced (maximum reached, or end-of-text replaced); else "length" when the answer hit
`max_answer_tokens`; else "stop". `Completion.meta["stopped_by"]` says exactly what ended the row.
"""

import torch

from budgetthink.errors import UserError

# what ended a row (Forcing.stopped_by codes)
LIVE, EOS, STOP_STRING, MAX_TOKENS, MAX_ANSWER, CONTEXT = range(6)
STOPPED_BY = {EOS: "eos", STOP_STRING: "stop_string", MAX_TOKENS: "max_tokens", MAX_ANSWER: "max_answer_tokens",
              CONTEXT: "context"}


def decode(tokenizer, ids: list[int]) -> str:
    """The text of token ids, special tokens included (the one decoding used by every rule here)."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def encode_insert(tokenizer, text: str, what: str) -> list[int]:
    """Ids of a string the engine inserts, encoded on its own; a UserError if the tokenizer cannot round-trip it."""
    ids = tokenizer.encode(text, add_special_tokens=False) if text else []
    back = decode(tokenizer, ids)
    if back != text:
        raise UserError(f"the tokenizer cannot encode the {what} {text!r} exactly (it decodes back as {back!r}); "
                        "use a tokenizer that covers it or another format/string")
    return ids


def find_end(tokenizer, seg: list[int], close: str) -> int | None:
    """If the decoded text of `seg` contains `close`: how many leading tokens to keep (the rest is the delimiter)."""
    text = decode(tokenizer, seg)
    at = text.find(close)
    if at < 0:
        return None
    keep = len(seg) - 1
    while keep > 0 and len(decode(tokenizer, seg[:keep])) > at:
        keep -= 1
    return keep


def candidate_ids(tokenizer, strings: list[str], vocab: int) -> torch.Tensor:
    """[V] bool: tokens that can complete one of `strings` (their text holds its last character, or a partial one)."""
    known = min(vocab, len(tokenizer))  # an output layer may be padded beyond the tokenizer's vocabulary
    texts = tokenizer.batch_decode([[i] for i in range(known)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    lasts = {s[-1] for s in strings if s}
    marks = [any(c in t for c in lasts) or "\ufffd" in t for t in texts] + [False] * (vocab - known)
    return torch.tensor(marks, dtype=torch.bool)


class Forcing:
    """The per-row state of thinking, answering and budget forcing for B rows (tensors on the model's device)."""

    def __init__(self, tokenizer, fmt, budget, sampling, eos_ids: list[int], rows: int, vocab: int,
                 device, context: int, memo: dict | None = None):
        """memo: a dict the caller keeps across calls, caching the candidate-token masks (one vocabulary decode)."""
        self.tokenizer, self.fmt, self.sampling, self.context = tokenizer, fmt, sampling, context
        self.on = budget is not None and budget.active
        if self.on and fmt is None:
            raise UserError("budget forcing needs a think format (e.g. --format tinyzero)")
        self.budget = budget
        self.eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
        self.stops = [s for s in sampling.stop if s]
        self.close = fmt.think_close if fmt is not None else None
        if fmt is not None:
            encode_insert(tokenizer, fmt.think_open, "opening delimiter")
            self.close_ids = encode_insert(tokenizer, fmt.think_close, "closing delimiter")
        if self.on:
            self.force_ids = self.close_ids + encode_insert(tokenizer, budget.answer_prefix, "answer prefix")
            self.ext_ids = encode_insert(tokenizer, budget.extension_string, "extension string")
        # windows of tokens that can hold a delimiter / stop string (each token is at least one byte)
        self.close_window = 2 * len(self.close.encode()) + 4 if self.close else 0
        self.stop_window = 2 * max((len(s.encode()) for s in self.stops), default=0) + 4
        memo = {} if memo is None else memo

        def cand(strings):
            key = (tuple(strings), vocab, str(device))
            if key not in memo:
                memo[key] = candidate_ids(tokenizer, strings, vocab).to(device)
            return memo[key]

        self.close_cand = cand([self.close]) if self.close else None  # [V] bool
        self.stop_cand = cand(self.stops) if self.stops else None  # [V] bool
        self.max_insert = len(self.force_ids) + len(self.ext_ids) if self.on else 0  # ids one step can append

        z = lambda dtype=torch.long: torch.zeros(rows, dtype=dtype, device=device)
        self.thinking = z(torch.bool) | (fmt is not None)  # [B] in the thinking phase
        self.think_n, self.answer_n, self.sampled_n, self.ext_n = z(), z(), z(), z()  # [B] counts
        self.seg_start = z()  # [B] index in the output where the current sampled thinking segment starts
        self.answer_start = z()  # [B] index in the output where the answer text starts (stop strings)
        self.forced = z(torch.bool)  # [B] the end of thinking was forced
        self.removed_n = z()  # [B] closing delimiters the model wrote that were removed (end-of-text not counted)
        self.stopped_by = z()  # [B] LIVE or what ended the row

    # --- batch bookkeeping ---------------------------------------------------------------------------------
    def start_ids(self) -> list[int]:
        """Ids appended after every prompt before the first sample: a forced end when max_thinking_tokens is 0."""
        if self.on and self.budget.max_thinking_tokens == 0:
            self.thinking[:] = False
            self.forced[:] = True
            self.answer_start[:] = len(self.close_ids)
            return list(self.force_ids)
        return []

    def select(self, idx: torch.Tensor) -> None:
        """Keep (or repeat) rows `idx` of every state tensor."""
        for name in ("thinking", "think_n", "answer_n", "sampled_n", "ext_n", "seg_start", "answer_start",
                     "forced", "removed_n", "stopped_by"):
            setattr(self, name, getattr(self, name)[idx])

    @property
    def live(self) -> torch.Tensor:
        return self.stopped_by == LIVE

    def finish_reason(self, row: int) -> str:
        by = int(self.stopped_by[row])
        if by in (MAX_TOKENS, CONTEXT):
            return "length"
        if bool(self.forced[row]):
            return "forced"
        return "length" if by == MAX_ANSWER else "stop"

    # --- one decoding step -----------------------------------------------------------------------------------
    def advance(self, x: torch.Tensor, out_tok: torch.Tensor, out_len: torch.Tensor, prompt_len: torch.Tensor,
                ready: torch.Tensor):
        """Apply the rules after the `ready` rows [B] sampled x [B] (appended: out_tok[r, out_len[r]-1] == x[r]).

        Rows not ready (live, still feeding an inserted string) are left alone. out_tok [B, cap] and out_len [B]
        are the engine's output buffer (read here, not written); prompt_len [B]. Returns {row: (drop, ids)}:
        drop that many tokens from the end of the row's output, then append ids as inserted (not sampled)
        tokens. Finished rows get stopped_by set.
        """
        live = self.live & ready
        self.sampled_n += live
        eos = torch.isin(x, self.eos)
        think = self.thinking & live
        answer = ~self.thinking & live
        # plain end-of-text: in the answer, or while thinking without a budget (kept in the output)
        ends = eos & (answer | think) if not self.on else eos & answer
        self.stopped_by[ends] = EOS
        self.think_n += think & ~eos
        self.answer_n += answer
        events: dict[int, tuple[int, list[int]]] = {}

        # rows whose step needs Python: end-of-text while forcing, a possible delimiter, a possible stop string
        eos_think = think & eos if self.on else None
        close_cand = think & ~eos & self.close_cand[x] if self.close else None
        stop_cand = None
        if self.stops:
            stop_cand = (answer if self.on else live) & ~eos & self.stop_cand[x]
        masks = [m for m in (eos_think, close_cand, stop_cand) if m is not None]
        if masks and bool(torch.stack(masks).any()):
            if eos_think is not None:
                for r in eos_think.nonzero().flatten().tolist():
                    events[r] = self._end(r, int(out_len[r]), drop=1)
            if close_cand is not None:
                for r in close_cand.nonzero().flatten().tolist():
                    n, start = int(out_len[r]), int(self.seg_start[r])
                    lo = max(start, n - self.close_window)
                    keep = find_end(self.tokenizer, out_tok[r, lo:n].tolist(), self.close)
                    if keep is None:
                        continue
                    drop = n - (lo + keep)  # the delimiter's tokens, x included
                    self.think_n[r] -= drop
                    if self.on and self._extension_due(r):
                        self.removed_n[r] += 1
                        events[r] = self._extend(r, n, drop)
                    else:  # the model closed thinking itself: nothing inserted
                        self.thinking[r] = False
                        self.answer_start[r] = n
            if stop_cand is not None:
                for r in stop_cand.nonzero().flatten().tolist():
                    n, start = int(out_len[r]), int(self.answer_start[r]) if self.on else 0
                    lo = max(start, n - self.stop_window)
                    text = decode(self.tokenizer, out_tok[r, lo:n].tolist())
                    if any(s in text for s in self.stops):
                        self.stopped_by[r] = STOP_STRING

        # caps, then the forced end at the maximum (for rows that go on)
        live = self.live & ready
        self.stopped_by[live & (self.sampled_n >= self.sampling.max_tokens)] = MAX_TOKENS
        if self.on:
            self.stopped_by[live & ~self.thinking & (self.answer_n >= self.budget.max_answer_tokens)] = MAX_ANSWER
        grown = out_len + prompt_len  # [B] sequence length once this step's edits are applied
        if events:
            grown = grown.clone()
            for r, (drop, ins) in events.items():
                grown[r] += len(ins) - drop
        self.stopped_by[self.live & ready & (grown >= self.context)] = CONTEXT
        if self.on and self.budget.max_thinking_tokens is not None:
            at_max = self.live & ready & self.thinking & (self.think_n >= self.budget.max_thinking_tokens)
            if bool(at_max.any()):
                for r in at_max.nonzero().flatten().tolist():
                    drop, ins = events.get(r, (0, []))
                    n = int(out_len[r]) - drop + len(ins)
                    events[r] = (drop, ins + self._force(r, n))
        return events

    def _extension_due(self, r: int) -> bool:
        return bool(self.think_n[r] < self.budget.min_thinking_tokens) or bool(self.ext_n[r] < self.budget.extensions)

    def _end(self, r: int, n: int, drop: int) -> tuple[int, list[int]]:
        """End-of-text while thinking (budget on): extend if due, else force the end."""
        if self._extension_due(r):
            return self._extend(r, n, drop)
        return drop, self._force(r, n - drop)

    def _extend(self, r: int, n: int, drop: int) -> tuple[int, list[int]]:
        """Remove the model's end (the last `drop` tokens of n) and append the extension string."""
        self.ext_n[r] += 1
        self.seg_start[r] = n - drop + len(self.ext_ids)
        return drop, list(self.ext_ids)

    def _force(self, r: int, n: int) -> list[int]:
        """Close thinking at output length n: the delimiter and the answer prefix, inserted."""
        self.thinking[r] = False
        self.forced[r] = True
        self.answer_start[r] = n + len(self.close_ids)
        return list(self.force_ids)
