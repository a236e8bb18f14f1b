"""Budget forcing (s1): the `Budget` model and the rules, as a per-row state machine both engines run.

    budget = Budget(max_thinking_tokens=64, extensions=1)      # the one definition (CLI, configs, server, engines)
    forcing = Forcing(tokenizer, fmt, budget, sampling, eos_ids, rows=B, vocab=V, device=dev, context=C)
    out_ids = forcing.start_ids(prompt_len)    # what follows the prompt before the first sample ([] or a forced end)
    ... the engine samples tokens for the rows, appends them to their outputs (new[b] of them for row b), then
    edits = forcing.advance(out_tok, out_len, new, prompt_len)   # {row: (tokens to drop, ids to append)}
    forcing.room(r), forcing.watch(r)          # how far row r may sample before a rule can fire, and on what text

The engines own the mechanics (KV cache, batching, sampling); this module owns the rules: which phase each
row is in (thinking or answer), how many tokens it has sampled, when an end of thinking is removed and the
extension string appended, when the end is forced, and when the row is finished. The torch engine calls
`advance` after every decoding step (one new token per row); the vLLM engine calls it with all the tokens a
round of vLLM sampled for a row: `advance` applies the rules token by token up to the row's first event and
drops what was sampled after it, so both engines run the same code. The common case is a few vectorised
tensor ops over the batch (and over the new tokens); Python runs only for the rare tokens with an event (an
end of thinking, an end-of-text, a stop string candidate, a cap reached).

No budget is spelled `None`: `enforced(budget)` turns a Budget that enforces nothing into None, and every
user of a budget goes through it (an inactive Budget is accepted where a budget is, and means the same).

Semantics, per row, stated as the naive procedure the tests reimplement (run the model over the whole
sequence for every token; insert = append the ids of a string encoded on its own with add_special_tokens=False):

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
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic.fields import FieldInfo

from budgetthink.errors import UserError

TOKENS_MAX = 2**31 - 1  # bound on every token count: beyond any context, and safe in int64 tensor arithmetic
NO_LIMIT = 1 << 62  # the room of a cap that does not apply

# what ended a row (Forcing.stopped_by codes)
LIVE, EOS, STOP_STRING, MAX_TOKENS, MAX_ANSWER, CONTEXT = range(6)
FORCE = -1  # not an end: the thinking maximum reached (a cap in Forcing._rooms)
STOPPED_BY = {EOS: "eos", STOP_STRING: "stop_string", MAX_TOKENS: "max_tokens", MAX_ANSWER: "max_answer_tokens",
              CONTEXT: "context"}


class Budget(BaseModel):
    """Budget forcing (s1): bounds on thinking, counted in sampled tokens only."""

    model_config = ConfigDict(extra="forbid")
    max_thinking_tokens: int | None = Field(None, ge=0, le=TOKENS_MAX, description="force the end of thinking "
                                            "after this many sampled thinking tokens; None: no maximum")
    min_thinking_tokens: int = Field(0, ge=0, le=TOKENS_MAX,
                                     description="suppress the end of thinking until this many have been sampled")
    extensions: int = Field(0, ge=0, le=TOKENS_MAX,
                            description="ignore the end of thinking this many times, appending the extension string")
    extension_string: str | None = Field(None, description="what is appended when an end of thinking is "
                                         "suppressed; None: the tokenizer's spelling of Wait (extension_text)")
    answer_prefix: str = Field("", description="appended after a forced end of thinking, before the answer")
    max_answer_tokens: int = Field(64, ge=1, le=TOKENS_MAX, description="cap on sampled answer tokens after thinking ends")

    @field_validator("min_thinking_tokens")
    @classmethod
    def _min_within_max(cls, v: int, info: ValidationInfo) -> int:
        top = info.data.get("max_thinking_tokens")  # validated first (declared first); absent if it failed
        if top is not None and v > top:
            raise ValueError(f"min_thinking_tokens ({v}) is above max_thinking_tokens ({top}); "
                             "lower the minimum or raise the maximum")
        return v

    @property
    def active(self) -> bool:
        """Whether it enforces anything (a maximum, a minimum or extensions); an inactive one is no budget."""
        return self.max_thinking_tokens is not None or self.min_thinking_tokens > 0 or self.extensions > 0


def budget_field(name: str, **limits) -> FieldInfo:
    """Budget's field `name` (default, bounds, description) for a model that carries it under another name or
    with tighter `limits` (Field keywords), e.g. the server's request: declared here once, used there."""
    info = Budget.model_fields[name]
    return FieldInfo.merge_field_infos(info, Field(**limits)) if limits else info


def enforced(budget: Budget | None) -> Budget | None:
    """The one spelling of "no budget": None (a Budget that enforces nothing becomes None)."""
    return budget if budget is not None and budget.active else None


def decode(tokenizer, ids: list[int]) -> str:
    """The text of token ids, special tokens included (the one decoding used by every rule here)."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def extension_text(tokenizer, extension_string: str | None) -> str:
    """The extension string as given, else "Wait" as a word of this tokenizer: " Wait" where the tokenizer has
    word pieces (BPE: without the space it glues onto the last word, "times?Wait"), "Wait" on a character-level
    tokenizer (what the tiny model's traces hold: "Wait" right after a line's last character)."""
    if extension_string is not None:
        return extension_string
    pieces = len(tokenizer.encode("Wait", add_special_tokens=False)) < len("Wait")
    return " Wait" if pieces else "Wait"


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

    STATE = ("thinking", "think_n", "answer_n", "sampled_n", "ext_n", "seg_start", "answer_start", "forced",
             "removed_n", "stopped_by")

    def __init__(self, tokenizer, fmt, budget: Budget | None, sampling, eos_ids: list[int], rows: int, vocab: int,
                 device, context: int, memo: dict | None = None):
        """memo: a dict the caller keeps across calls, caching the candidate-token masks (one vocabulary decode)."""
        self.tokenizer, self.fmt, self.sampling, self.context = tokenizer, fmt, sampling, context
        self.budget = enforced(budget)
        self.on = self.budget is not None
        if self.on and fmt is None:
            raise UserError("budget forcing needs a think format (e.g. --format tinyzero)")
        self.eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
        self.eos_set = set(eos_ids)
        self.stops = [s for s in sampling.stop if s]
        self.close = fmt.think_close if fmt is not None else None
        self.close_ids, self.force_ids, self.ext_ids = [], [], []
        if fmt is not None:
            encode_insert(tokenizer, fmt.think_open, "opening delimiter")
            self.close_ids = encode_insert(tokenizer, fmt.think_close, "closing delimiter")
        if self.on:
            self.force_ids = self.close_ids + encode_insert(tokenizer, self.budget.answer_prefix, "answer prefix")
            self.ext_ids = encode_insert(tokenizer, extension_text(tokenizer, self.budget.extension_string),
                                         "extension string")
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
        self.max_insert = len(self.force_ids) + len(self.ext_ids)  # ids one step can append
        b = self.budget
        self.max_think = NO_LIMIT if b is None or b.max_thinking_tokens is None else b.max_thinking_tokens
        self.max_answer = NO_LIMIT if b is None else b.max_answer_tokens

        z = lambda dtype=torch.long: torch.zeros(rows, dtype=dtype, device=device)
        self.thinking = z(torch.bool) | (fmt is not None)  # [B] in the thinking phase
        self.think_n, self.answer_n, self.sampled_n, self.ext_n = z(), z(), z(), z()  # [B] counts
        self.seg_start = z()  # [B] index in the output where the current sampled thinking segment starts
        self.answer_start = z()  # [B] index in the output where the answer text starts (stop strings)
        self.forced = z(torch.bool)  # [B] the end of thinking was forced
        self.removed_n = z()  # [B] closing delimiters the model wrote that were removed (end-of-text not counted)
        self.stopped_by = z()  # [B] LIVE or what ended the row

    # --- batch bookkeeping ---------------------------------------------------------------------------------
    def start_ids(self, prompt_len: torch.Tensor) -> list[int]:
        """Ids appended after every prompt (lengths prompt_len [B]) before the first sample: a forced end when
        max_thinking_tokens is 0. Rows whose prompt and these ids fill the context are finished."""
        ids = []
        if self.on and self.budget.max_thinking_tokens == 0:
            self.thinking[:] = False
            self.forced[:] = True
            self.answer_start[:] = len(self.close_ids)
            ids = list(self.force_ids)
        self.stopped_by[prompt_len + len(ids) >= self.context] = CONTEXT
        return ids

    def select(self, idx: torch.Tensor) -> None:
        """Keep (or repeat) rows `idx` of every state tensor."""
        for name in self.STATE:
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

    def counts(self, row: int) -> dict:
        """The row's counts, as Completion fields (thinking_tokens, answer_tokens, extensions, meta)."""
        return {"finish_reason": self.finish_reason(row), "thinking_tokens": int(self.think_n[row]),
                "answer_tokens": int(self.answer_n[row]), "extensions": int(self.ext_n[row]),
                "meta": {"stopped_by": STOPPED_BY.get(int(self.stopped_by[row]), "live"),
                         "forced": bool(self.forced[row]), "sampled_tokens": int(self.sampled_n[row]),
                         "closes_removed": int(self.removed_n[row])}}

    # --- the caps ----------------------------------------------------------------------------------------------
    def _rooms(self, idx, length: torch.Tensor, prompt_len: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Each cap with its room for rows `idx` (an index tensor or slice) whose outputs are `length` tokens
        long: how many more sampled tokens reach it (each sampled token lowers every room that applies by one).
        At room 0 FORCE (the thinking maximum) closes thinking; the others end the row, checked in this order."""
        thinking = self.thinking[idx]
        return [(MAX_TOKENS, self.sampling.max_tokens - self.sampled_n[idx]),
                (MAX_ANSWER, torch.where(thinking, NO_LIMIT, self.max_answer - self.answer_n[idx])),
                (CONTEXT, self.context - prompt_len - length),
                (FORCE, torch.where(thinking, self.max_think - self.think_n[idx], NO_LIMIT))]

    def room(self, r: int, length: int, prompt_len: int) -> int:
        """How many tokens row r (its output `length` tokens long) may sample before a cap is reached."""
        dev = self.think_n.device
        at = lambda v: torch.tensor([v], device=dev)
        return min(int(v[0]) for _, v in self._rooms(at(r), at(length), at(prompt_len)))

    def watch(self, r: int) -> list[str]:
        """The strings whose appearance in row r's sampled text may be an event: the closing delimiter while
        thinking under a budget (the stop strings wait for the answer then), else the stop strings."""
        return [self.close] if self.on and bool(self.thinking[r]) else list(self.stops)

    def _caps(self, r: int, length: int, prompt_len: int) -> list[int]:
        """After row r sampled a token (its output now `length` long): end it at a cap, or force the end of
        thinking at the maximum; returns the ids to append."""
        dev = self.think_n.device
        at = lambda v: torch.tensor([v], device=dev)
        for code, left in self._rooms(at(r), at(length), at(prompt_len)):
            if int(left[0]) <= 0 and int(self.stopped_by[r]) == LIVE:
                if code == FORCE:  # the naive loop goes round again: the forced ids may fill the context
                    ids = self._force(r, length)
                    return ids + self._caps(r, length + len(ids), prompt_len)
                self.stopped_by[r] = code
        return []

    # --- sampled tokens ------------------------------------------------------------------------------------------
    def advance(self, out_tok: torch.Tensor, out_len: torch.Tensor, new: torch.Tensor, prompt_len: torch.Tensor):
        """Apply the rules to the last new[b] tokens of each row's output (just sampled and appended).

        out_tok [B, cap] and out_len [B] are the engine's output buffer (read here, not written); new [B] counts
        the sampled tokens at the end of each row's output (0 for rows that did not sample); prompt_len [B].
        The tokens of a row are taken in order; the first one with an event (an edit, or the row finished)
        is the last one kept: the tokens sampled after it are dropped, as if never sampled. Returns {row:
        (drop, ids)}: drop that many tokens from the end of the row's output, then append ids as inserted (not
        sampled) tokens. Finished rows get stopped_by set.
        """
        events: dict[int, tuple[int, list[int]]] = {}
        rest = torch.where(self.live, new, 0)  # [B] new tokens not taken yet
        while True:
            T = int(rest.max()) if len(rest) else 0
            if T == 0:
                return events
            first = out_len - rest  # [B] output index of each row's first token not taken yet
            t = torch.arange(T, device=rest.device)
            tok = out_tok.gather(1, (first[:, None] + t).clamp(max=out_tok.shape[1] - 1))  # [B, T]
            thinking = self.thinking[:, None]
            # tokens that may be an event: an end-of-text, a possible delimiter or stop string, a cap reached
            trig = torch.isin(tok, self.eos)
            if self.close:
                trig |= thinking & self.close_cand[tok]
            if self.stops:
                trig |= self.stop_cand[tok] & ~thinking if self.on else self.stop_cand[tok]
            room = torch.stack([left for _, left in self._rooms(slice(None), first, prompt_len)]).amin(0)  # [B]
            trig |= t >= room[:, None] - 1
            trig &= t < rest[:, None]
            plain = torch.where(trig.any(1), trig.long().argmax(1), rest)  # [B] tokens before the first trigger
            self.sampled_n += plain
            self.think_n += plain * self.thinking
            self.answer_n += plain * ~self.thinking
            rest = rest - plain
            hit = (rest > 0).nonzero().flatten().tolist()
            more = False
            for r in hit:  # the trigger token: the rules in Python
                n = int(first[r] + plain[r]) + 1  # the output's length up to and including it
                after = int(rest[r]) - 1  # tokens sampled after it
                drop, ins = self._event(r, int(out_tok[r, n - 1]), n, out_tok, int(prompt_len[r]))
                if drop or ins or int(self.stopped_by[r]) != LIVE:
                    rest[r] = 0
                    if drop or ins or after:
                        events[r] = (drop + after, ins)
                else:
                    rest[r] = after
                    more |= after > 0
            if not more:
                return events

    def _event(self, r: int, x: int, n: int, out_tok: torch.Tensor, prompt_len: int) -> tuple[int, list[int]]:
        """Row r sampled x, the n-th token of its output: count it and apply the rules (see the docstring)."""
        self.sampled_n[r] += 1
        drop, ins = 0, []
        if bool(self.thinking[r]):
            if x in self.eos_set:
                if self.on:
                    drop, ins = self._end(r, n)
                else:
                    self.stopped_by[r] = EOS
            else:
                self.think_n[r] += 1
                if self.close and bool(self.close_cand[x]):
                    lo = max(int(self.seg_start[r]), n - self.close_window)
                    keep = find_end(self.tokenizer, out_tok[r, lo:n].tolist(), self.close)
                    if keep is not None:
                        d = n - (lo + keep)  # the delimiter's tokens, x included
                        self.think_n[r] -= d
                        if self.on and self._extension_due(r):
                            self.removed_n[r] += 1
                            drop, ins = self._extend(r, n, d)
                        else:  # the model closed thinking itself: nothing inserted
                            self.thinking[r] = False
                            self.answer_start[r] = n
                if not self.on:  # without a budget, stop strings count anywhere
                    self._stop_string(r, x, n, out_tok)
        else:
            self.answer_n[r] += 1
            if x in self.eos_set:
                self.stopped_by[r] = EOS
            else:
                self._stop_string(r, x, n, out_tok)
        return drop, ins + self._caps(r, n - drop + len(ins), prompt_len)

    def _stop_string(self, r: int, x: int, n: int, out_tok: torch.Tensor) -> None:
        """Finish row r if a stop string ends in its text (the answer's, under a budget) at its n-th token x."""
        if not self.stops or not bool(self.stop_cand[x]):
            return
        lo = max(int(self.answer_start[r]) if self.on else 0, n - self.stop_window)
        text = decode(self.tokenizer, out_tok[r, lo:n].tolist())
        if any(s in text for s in self.stops):
            self.stopped_by[r] = STOP_STRING

    def _extension_due(self, r: int) -> bool:
        return bool(self.think_n[r] < self.budget.min_thinking_tokens) or bool(self.ext_n[r] < self.budget.extensions)

    def _end(self, r: int, n: int) -> tuple[int, list[int]]:
        """End-of-text (the n-th token) while thinking under a budget: extend if due, else force the end."""
        if self._extension_due(r):
            return self._extend(r, n, 1)
        return 1, self._force(r, n - 1)

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
