"""Generation engines: one interface, a torch backend (default) and a vLLM backend (optional).

    engine = load_engine("runs/tiny", backend="torch")          # a path, or a loaded (model, tokenizer)
    outs = engine.generate(prompts, Sampling(temperature=1.0, max_tokens=256), n=8,
                           budget=Budget(max_thinking_tokens=64, extensions=1), fmt=get_format("tinyzero"))
    # outs: list of len(prompts) * n Completions, prompt-major (all samples of prompt 0 first)

`Budget` and the budget forcing rules live in budgetthink.budget (its docstring states the semantics); both
engines run them through `budget.Forcing`.
"""

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from budgetthink.budget import Budget, Forcing, decode
from budgetthink.errors import UserError

__all__ = ["Budget", "Completion", "Sampling", "check_prompts", "completion", "eos_ids", "load_engine", "model_dir"]


class Sampling(BaseModel):
    """How tokens are drawn."""

    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(1.0, ge=0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 keeps all")
    max_tokens: int = Field(256, ge=1, description="cap on sampled tokens per completion (thinking + answer)")
    stop: list[str] = Field(default_factory=list, description="stop strings (in the answer, or anywhere without a budget)")
    seed: int | None = Field(None, description="seed for sampling; None draws from torch's global generator")


@dataclass
class Completion:
    prompt_index: int  # which prompt this sample belongs to
    text: str  # everything after the prompt, inserted strings included
    thinking: str  # text before the closing delimiter (all of it if thinking never closed)
    answer: str  # text after the closing delimiter and the format's answer prefix
    token_ids: list[int]  # every token after the prompt, inserted ones included
    logprobs: list[float]  # log-prob of each token under the sampling distribution used; 0.0 for inserted
    sampled: list[bool]  # True where the model sampled the token, False where the engine inserted it
    finish_reason: str  # "stop" (end-of-text or stop string), "length" (max_tokens hit), "forced" (max thinking hit)
    thinking_tokens: int = 0  # sampled thinking tokens (what the budget counts)
    answer_tokens: int = 0  # sampled answer tokens
    extensions: int = 0  # number of extension strings inserted
    meta: dict = field(default_factory=dict)


def check_prompts(tokenizer, prompts: list[str], prompt_ids: list[list[int]] | None, n: int, context: int,
                  context_name: str) -> list[list[int]]:
    """The prompts' token ids (encoded unless given), checked: n >= 1, none empty, each within the context."""
    if n < 1:
        raise UserError(f"n must be >= 1, got {n}")
    if prompt_ids is None:
        prompt_ids = [tokenizer.encode(p) for p in prompts]
    if len(prompt_ids) != len(prompts):
        raise UserError(f"got {len(prompts)} prompts but {len(prompt_ids)} prompt_ids")
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise UserError(f"prompt {i} is empty; give at least one token")
        if len(ids) >= context:
            raise UserError(f"prompt {i} is {len(ids)} tokens but the model's context is {context} "
                            f"({context_name}); shorten the prompt")
    return prompt_ids


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def model_dir(path) -> Path:
    """A model directory to load, checked: it has a config.json and a tokenizer (without one, transformers may
    hand back a tokenizer that encodes every prompt to nothing)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"model directory {path} not found (no config.json); "
                        "build one with `budgetthink tiny --out DIR` or pass an existing model directory")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"model directory {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                        "copy the tokenizer files of the model it came from into it")
    return path


def eos_ids(tokenizer, *sources) -> list[int]:
    """The end-of-text ids: the tokenizer's and those of `sources` (an id, a list of ids, or None each)."""
    ids = []
    for source in (tokenizer.eos_token_id, *sources):
        ids += source if isinstance(source, list) else [] if source is None else [source]
    return sorted(set(ids))


def completion(tokenizer, fmt, eos: list[int], forcing: Forcing, row: int, index: int, n: int, ids: list[int],
               logprobs: list[float], sampled: list[bool]) -> Completion:
    """Row `row` of `forcing`, finished with output `ids`, as the Completion of sample `index` (n per prompt)."""
    text = decode(tokenizer, ids[:-1] if ids and ids[-1] in eos else ids)
    thinking, answer = fmt.split(text) if fmt is not None else ("", text)
    return Completion(prompt_index=index // n, text=text, thinking=thinking, answer=answer, token_ids=ids,
                      logprobs=logprobs, sampled=sampled, **forcing.counts(row))


def load_engine(model, backend: str = "torch", **kwargs):
    """An engine over `model` (a model directory, or a `(model, tokenizer)` pair)."""
    if backend == "torch":
        from budgetthink.engine.torch import TorchEngine
        return TorchEngine(model, **kwargs)
    if backend == "vllm":
        from budgetthink.engine.vllm import VLLMEngine
        return VLLMEngine(model, **kwargs)
    raise UserError(f"unknown engine {backend!r}; use torch or vllm")
