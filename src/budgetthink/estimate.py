"""The FLOP estimator: wall time, GPU-hours and dollars of a recipe at full scale, from what the recipe implies.

`budgetthink estimate --recipe Y --gpu h100 --gpus 16 [--mfu 0.4]` -> `estimate(recipe, **settings)`.

The count, per token, for a transformer with N parameters in matrix multiplies (all parameters except an
untied input embedding, which is a table lookup), `layers` layers and attention width d (query heads x head
dimension; grouped-query attention shares keys and values, not query dot products), on causal sequences of
S tokens:

    forward   F(S) = 2 N + 2 layers d (S + 1)
              2 N: one multiply-add per parameter. Attention: query i attends to keys 1..i, so a sequence has
              S (S + 1) / 2 query-key pairs; each pair costs 2d for the score q.k and 2d for weighting v,
              4d per pair per layer = 2d (S + 1) per token per layer.
    backward  2 F(S): each multiply Y = X W needs dX = dY W^T and dW = X^T dY, two of the same size (and for
              the two attention multiplies, the gradients of both operands).
    training  3 F(S) per token; 4 F(S) with activation checkpointing, which runs the forward once more in
              the backward pass.
    generate  a causal forward over prompt + response: 2 N per token, the prompt prefilled once per group, and
              4 layers d per query-key pair (each new token attends to the prompt and to the response so far).

Stages:
  sft      tokens x epochs x (3 or 4) F(S). S is the length of the sequence each token sits in: the block size
           when sequences are packed to it (`packing: true`), else the mean example length tokens / examples
           (each example its own sequence; a lower bound on the token-weighted mean, as attention grows with the
           square), else the block size (an upper bound). With a batch size and an example count it also counts
           the optimizer steps, ceil(examples / batch) per epoch.
  rl       generation (above) of every rollout, then (3 or 4) F(S) per trained token per update pass at
           S = prompt + response; a reference model adds one forward, a critic of the policy's size its own
           training plus one forward for values.
  distill  the teacher's generation of every trace (a local teacher model; an API teacher is priced per token
           by the bill instead, and the `solver` teacher runs no model).

Time = FLOPs / (gpus x dense bf16 peak x utilisation). The utilisation (`mfu`) is an input, not a result: the
fraction of the peak the GPUs sustain on the FLOPs counted here. As the count includes the recomputed forward,
it is what PaLM calls hardware FLOPs utilisation. GPU-hours do not depend on the GPU count in this model. Not
counted: softmax, norms and other elementwise work, padding, communication, waiting for the longest sequence of
a step, data loading, evaluation, checkpoints, start-up. A recipe may carry the published cost of the run it
describes (`estimate.published`); the estimate then reports estimate / published and the arithmetic behind it:
seconds per step both ways and, for SFT, the sequence length at which every sequence of every step would cost
the published figure (a step with one sequence per GPU lasts as long as its longest sequence).
docs/cost.md has the derivation and the comparison with s1's published figures.

Recipe keys it reads (plain YAML; the first key found wins):
  model                                              name (Qwen2.5 sizes known) or local model directory
  params | estimate.params                           parameters in matrix multiplies, overrides the model's
  estimate.layers, estimate.attention_width          the attention shape, when the model is not known
  stage | estimate.stage                             sft, rl or distill (else: rl if a group size is given,
                                                     sft if epochs)
  estimate.activation_checkpointing | activation_checkpointing | gradient_checkpointing   (default false)
  estimate.published: {gpu_hours, gpus, source}      the run's published cost, to compare with
  SFT: epochs | num_epochs | num_train_epochs        (default 1)
       estimate.tokens | data_tokens | train_tokens  tokens of one epoch of data (or --tokens)
       estimate.examples | examples | num_examples   sequences in one epoch
       block_size | max_seq_len | max_seq_length | max_length      longest sequence
       packing                                       true: sequences are packed to the block size
       batch_size | global_batch_size | train_batch_size           sequences per optimizer step
  RL:  max_steps | total_steps | estimate.steps
       batch_size | prompts_per_step | train_batch_size                   prompts per step
       group_size | num_generations | n_samples | rollout_n | samples_per_prompt | n   (default 1)
       max_prompt_tokens | max_prompt_length | prompt_length
       max_new_tokens | max_response_tokens | max_response_length | response_length | max_completion_length
         (else budget.max_thinking_tokens + budget.max_answer_tokens)
       ppo_epochs | num_iterations | update_epochs   passes over each batch (default 1)
       algorithm: ppo | advantage: gae | critic      a critic of the policy's size is trained too
       kl_coef | beta | kl.beta                      > 0: a reference model runs a forward pass
  distill: teacher                                   model name or directory (`model:` prefix allowed)
       estimate.examples | examples | num_problems | n   problems sent to the teacher
       samples per problem, prompt and response lengths as for RL
"""

import json
import math
import re
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from budgetthink.bill import hours, money
from budgetthink.config import Config, explain
from budgetthink.errors import UserError
from budgetthink.prices import load_prices, read_yaml_mapping


class EstimateSettings(Config):
    """What the estimate assumes beyond the recipe."""

    gpu: str = Field("h100", description="GPU kind: a key of the price table with peak_bf16_tflops (h100, a100, ...)")
    gpus: int = Field(1, ge=1, description="GPUs the run holds; GPU-hours = wall time x gpus")
    mfu: float = Field(0.4, gt=0, le=1, description=(
        "utilisation while training: the fraction of the GPU's dense bf16 peak sustained on the FLOPs counted "
        "here (recomputation included). 0.4 is a typical figure for well-tuned large dense training (PaLM "
        "reported 46% model / 58% hardware FLOPs utilisation); it is an assumption, never fitted to a result"))
    gen_mfu: float | None = Field(None, gt=0, le=1, description="utilisation while generating (RL, distill); "
                                                                "decoding is usually far below training's (None: mfu)")
    activation_checkpointing: bool | None = Field(None, description="one extra forward per step, recomputing "
                                                                    "activations (None: from the recipe, else no)")
    seq_len: float | None = Field(None, gt=0, description="tokens per sequence for the attention term (None: from "
                                                          "the recipe, see the module docstring)")
    tokens: float | None = Field(None, gt=0, description="SFT: tokens of one epoch; RL: tokens through the policy "
                                                         "per update pass, prompts + responses (None: the recipe)")
    gen_tokens: float | None = Field(None, gt=0, description="RL, distill: tokens generated in all (None: every "
                                                             "response at its maximum length, an upper bound)")
    params: float | None = Field(None, gt=0, description="parameters in matrix multiplies (None: the model's)")


# The Qwen2.5 family: total parameters (model cards, embeddings included) and the shape from each config.json:
# (total, layers, hidden, vocab, tied embeddings). Attention width = query heads x head dim = hidden for every size.
QWEN25 = {"0.5b": (0.49e9, 24, 896, 151936, True), "1.5b": (1.54e9, 28, 1536, 151936, True),
          "3b": (3.09e9, 36, 2048, 151936, True), "7b": (7.61e9, 28, 3584, 152064, False),
          "14b": (14.7e9, 48, 5120, 152064, False), "32b": (32.5e9, 64, 5120, 152064, False),
          "72b": (72.7e9, 80, 8192, 152064, False)}


def model_shape(model: str) -> dict:
    """{params (in matrix multiplies), params_total, layers, attention_width, source} of a Qwen2.5 name or a local
    model directory."""
    name = model.lower()
    m = re.search(r"(\d+(?:\.\d+)?)b\b", name)
    if re.search(r"qwen2[._-]?5", name) and m and f"{m[1]}b" in QWEN25:
        total, layers, hidden, vocab, tied = QWEN25[f"{m[1]}b"]
        return {"params": total - (0 if tied else vocab * hidden), "params_total": total, "layers": layers,
                "attention_width": hidden, "source": f"Qwen2.5-{m[1].upper()}B model card and config.json"}
    if (Path(model) / "config.json").is_file():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(model)
        with torch.device("meta"):
            net = AutoModelForCausalLM.from_config(cfg)
        total = float(sum(p.numel() for p in net.parameters()))
        tied = net.get_output_embeddings() is None or (
            net.get_output_embeddings().weight is net.get_input_embeddings().weight)
        lookup = 0 if tied else net.get_input_embeddings().weight.numel()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return {"params": total - lookup, "params_total": total, "layers": cfg.num_hidden_layers,
                "attention_width": cfg.num_attention_heads * head_dim, "source": f"counted from {model}/config.json"}
    raise UserError(f"unknown parameter count for model {model!r}; pass --params N or add `params:` to the recipe "
                    f"(known: Qwen2.5 {', '.join(QWEN25)}, or a local model directory)")


def forward_flops(params: float, layers: int, width: int, seq_len: float) -> tuple[float, float]:
    """(dense, attention) FLOPs of one token's forward pass in a causal sequence of `seq_len` tokens (0: unknown,
    attention not counted): 2 params, and 2 x layers x width x (seq_len + 1)."""
    return 2 * params, (2 * layers * width * (seq_len + 1) if seq_len else 0.0)


def generation_pairs(prompts: float, prompt_len: float, samples: float, response_len: float) -> float:
    """Query-key pairs of generating `samples` responses of `response_len` tokens to each of `prompts` prompts of
    `prompt_len` tokens: each prompt prefilled once (causal), then every response token attends to the prompt
    and to the response so far, itself included."""
    return (prompts * prompt_len * (prompt_len + 1) / 2
            + prompts * samples * (response_len * prompt_len + response_len * (response_len + 1) / 2))


def _get(recipe: dict, keys: list[str]) -> tuple[Any, str | None]:
    """The first of the (dotted) keys present in the recipe, and which one it was."""
    for key in keys:
        node: Any = recipe
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node, key
    return None, None


GROUP_KEYS = ["group_size", "num_generations", "n_samples", "rollout_n", "samples_per_prompt", "n"]
EPOCH_KEYS = ["epochs", "num_epochs", "num_train_epochs"]
BLOCK_KEYS = ["block_size", "max_seq_len", "max_seq_length", "max_length"]
PROMPT_KEYS = ["max_prompt_tokens", "max_prompt_length", "prompt_length"]
RESPONSE_KEYS = ["max_new_tokens", "max_response_tokens", "max_response_length", "response_length",
                 "max_completion_length"]


def _response_len(recipe: dict) -> Any:
    resp_len, _ = _get(recipe, RESPONSE_KEYS)
    if resp_len is None and _get(recipe, ["budget.max_thinking_tokens"])[0] is not None:
        resp_len = _get(recipe, ["budget.max_thinking_tokens"])[0] + (_get(recipe, ["budget.max_answer_tokens"])[0] or 0)
    return resp_len


def _sft(recipe: dict, path: Path, s: EstimateSettings, assumptions: list[str]) -> tuple[dict, float, dict]:
    """SFT: (counts, sequence length for attention, tokens by FLOP term)."""
    epochs, _ = _get(recipe, EPOCH_KEYS)
    if epochs is None:
        epochs = 1
        assumptions.append("1 epoch (the recipe names none)")
    t_value, _ = _get(recipe, ["estimate.tokens", "data_tokens", "train_tokens"])
    if s.tokens is None and t_value is None:
        raise UserError(f"{path}: no token count of the training data; pass --tokens N (tokens in one epoch)")
    per_epoch = float(s.tokens if s.tokens is not None else t_value)
    examples, _ = _get(recipe, ["estimate.examples", "examples", "num_examples"])
    block, block_key = _get(recipe, BLOCK_KEYS)
    if s.seq_len is not None:
        seq, how = float(s.seq_len), "--seq-len"
    elif recipe.get("packing") and block:
        seq, how = float(block), f"sequences packed to {block_key}"
    elif examples:
        seq = per_epoch / float(examples)
        seq, how = (min(seq, float(block)) if block else seq), (
            "the mean example length, tokens / examples: one example per sequence, no padding; a lower bound "
            "on the token-weighted mean, as attention grows with the square of the length")
    elif block:
        seq, how = float(block), f"{block_key}, as if every sequence were that long (an upper bound)"
    else:
        seq, how = 0.0, "attention not counted: no examples, block size or --seq-len"
    assumptions.append(f"attention at {seq:,.0f} tokens per sequence: {how}")
    assumptions.append("every data token is trained on once per epoch")
    batch, _ = _get(recipe, ["batch_size", "global_batch_size", "train_batch_size"])
    # the trainer's steps: the last batch of an epoch may be partial
    steps = math.ceil(float(examples) / float(batch)) * epochs if examples and batch else None
    trained = per_epoch * float(epochs)
    counts = {"tokens_per_epoch": per_epoch, "epochs": epochs, "examples": examples, "block_size": block,
              "seq_len": seq, "batch_size": batch, "steps": steps, "tokens_trained": trained, "tokens_generated": 0}
    return counts, seq, {"train": trained}


def _generation(recipe: dict, path: Path, s: EstimateSettings, prompts: float, stage: str,
                assumptions: list[str]) -> dict:
    """Counts of generating every response: rollouts, tokens generated and prefilled, pairs, mean lengths."""
    # in a distill recipe `n` is the number of problems, in an RL recipe the samples per prompt
    group, _ = _get(recipe, GROUP_KEYS if stage == "RL" else GROUP_KEYS[:-1])
    if group is None:
        group = 1
        assumptions.append("1 sample per prompt (no group size in the recipe)")
    prompt_len, _ = _get(recipe, PROMPT_KEYS)
    resp_len = _response_len(recipe)
    rollouts = prompts * group
    if s.gen_tokens is not None:
        generated = float(s.gen_tokens)
    elif resp_len is not None:
        generated = float(rollouts * resp_len)
        assumptions.append("every response runs to its maximum length (an upper bound)")
    else:
        raise UserError(f"{path}: {stage} recipe lacks max_new_tokens (or budget.max_thinking_tokens); add it or "
                        "pass --gen-tokens")
    if prompt_len is None:
        prompt_len = 0
        assumptions.append("prompts not counted (no max_prompt_tokens in the recipe)")
    else:
        assumptions.append("prompts are prefilled once per group and run at their maximum length")
    mean_resp = generated / rollouts if rollouts else 0.0
    return {"samples_per_prompt": group, "rollouts": rollouts, "max_prompt_tokens": prompt_len,
            "max_response_tokens": resp_len, "mean_response_tokens": mean_resp, "tokens_generated": generated,
            "tokens_prefilled": float(prompts * prompt_len),
            "generate_pairs": generation_pairs(prompts, prompt_len, group, mean_resp)}


def _rl(recipe: dict, path: Path, s: EstimateSettings, assumptions: list[str]) -> tuple[dict, float, dict]:
    """RL: (counts, sequence length for attention, tokens by FLOP term)."""
    steps, _ = _get(recipe, ["max_steps", "total_steps", "estimate.steps"])
    prompts, _ = _get(recipe, ["batch_size", "prompts_per_step", "train_batch_size"])
    missing = [n for n, v in (("max_steps", steps), ("prompts_per_step", prompts)) if v is None]
    if missing:
        raise UserError(f"{path}: RL recipe lacks {', '.join(missing)}; add them to the recipe")
    gen = _generation(recipe, path, s, float(steps * prompts), "RL", assumptions)
    passes, _ = _get(recipe, ["ppo_epochs", "num_iterations", "update_epochs"])
    passes = passes or 1
    trained = float(s.tokens) if s.tokens is not None else gen["rollouts"] * gen["max_prompt_tokens"] + gen[
        "tokens_generated"]
    seq = float(s.seq_len) if s.seq_len is not None else gen["max_prompt_tokens"] + gen["mean_response_tokens"]
    assumptions.append(f"attention at {seq:,.0f} tokens per trained sequence (prompt + mean response)")
    algo = str(recipe.get("algorithm") or recipe.get("advantage") or "").lower()
    critic = algo in ("ppo", "gae") or bool(recipe.get("critic"))
    kl, _ = _get(recipe, ["kl_coef", "beta", "kl.beta"])
    if critic:
        assumptions.append("the critic has the policy's size")
    assumptions.append("log-probabilities of the sampling policy come with generation (no extra forward)")
    counts = {"steps": steps, "prompts_per_step": prompts, **gen, "update_passes": passes, "seq_len": seq,
              "tokens_trained": trained, "critic": critic, "reference_model": bool(kl)}
    terms = {"generate": gen["tokens_generated"] + gen["tokens_prefilled"], "train": trained * passes}
    if kl:
        terms["reference"] = trained
    if critic:
        terms["critic"] = trained * passes
        terms["critic_values"] = trained
    return counts, seq, terms


def _distill(recipe: dict, path: Path, s: EstimateSettings, assumptions: list[str]) -> tuple[dict, float, dict]:
    """Distillation: the teacher generates every trace; (counts, 0 (no training), tokens by FLOP term)."""
    problems, _ = _get(recipe, ["estimate.examples", "examples", "num_problems", "n"])
    if problems is None:
        raise UserError(f"{path}: distill recipe lacks the number of problems; add `examples: N`")
    gen = _generation(recipe, path, s, float(problems), "distill", assumptions)
    counts = {"problems": problems, **gen, "seq_len": gen["max_prompt_tokens"] + gen["mean_response_tokens"],
              "tokens_trained": 0}
    return counts, 0.0, {"generate": gen["tokens_generated"] + gen["tokens_prefilled"]}


def _teacher(recipe: dict, path: Path) -> str:
    """The model a distill recipe runs: its teacher (a name or directory), never an API or the solver."""
    teacher = str(recipe.get("teacher") or "")
    if teacher == "solver" or teacher.startswith("openai:"):
        raise UserError(f"{path}: teacher {teacher!r} runs on no GPU of yours (an API is priced per token by "
                        "`budgetthink cost`, the solver is a program); estimate a local teacher: teacher: model:PATH")
    if not teacher:
        raise UserError(f"{path}: distill recipe lacks `teacher:` (a model name or directory)")
    return teacher.removeprefix("model:")


def _vs_published(recipe: dict, result: dict) -> dict | None:
    """Estimate / published, with the figures that explain it, when the recipe carries the published cost."""
    pub, _ = _get(recipe, ["estimate.published"])
    if not isinstance(pub, dict) or pub.get("gpu_hours") is None:
        return None
    published = float(pub["gpu_hours"])
    ratio = result["gpu_hours"] / published
    out = {"gpu_hours": published, "gpus": pub.get("gpus"), "source": pub.get("source"),
           "estimate_over_published": ratio,
           # the utilisation on the counted FLOPs at which the estimate would equal the published figure
           "mfu_that_matches": result["mfu"] * ratio}
    steps = result.get("steps")
    if steps and pub.get("gpus"):
        out["s_per_step_published"] = published * 3600 / float(pub["gpus"]) / steps
        out["s_per_step_estimated"] = result["gpu_hours"] * 3600 / float(pub["gpus"]) / steps
        out["tokens_per_step"] = result["tokens_trained"] / steps
    if steps and result.get("batch_size") and result["stage"] == "sft":
        # Each GPU holding one sequence waits for the step's longest: solve for the length L at which
        # steps x batch sequences of L tokens cost the published GPU-hours at the same utilisation,
        # k L (2N + a (L + 1)) per sequence with a = 2 layers d and k = 3 (4 with checkpointing).
        k = 4 if result["activation_checkpointing"] else 3
        a = 2 * result["layers"] * result["attention_width"]
        per_sequence = published * 3600 * float(result["peak_bf16_tflops"]) * 1e12 * result["mfu"] / (
            steps * float(result["batch_size"]))
        qa, qb = k * a, k * (2 * result["params"] + a)
        length = per_sequence / qb if qa == 0 else (math.sqrt(qb * qb + 4 * qa * per_sequence) - qb) / (2 * qa)
        out["seq_len_that_matches"] = length
        out["seq_len_that_matches_over_mean"] = length / result["seq_len"] if result["seq_len"] else None
    return out


def estimate(recipe_path: str | Path, *, prices: str | Path | None = None, as_json: bool = False,
             **settings: Any) -> dict:
    """`budgetthink estimate`: project wall time, GPU-hours and dollars of a recipe; `settings` are the fields of
    `EstimateSettings` (gpu, gpus, mfu, ...). Returns (and prints) the estimate with every FLOP term."""
    try:
        s = EstimateSettings(**{k: v for k, v in settings.items() if v is not None})
    except ValidationError as e:
        raise explain(EstimateSettings, e, "estimate") from None
    path = Path(recipe_path)
    recipe = read_yaml_mapping(path, f"recipe {path} not found; pass a YAML file (see recipes/)",
                               "expected a mapping of key: value at the top level")
    table = load_prices(prices)
    if s.gpu not in table["devices"] or not table["devices"][s.gpu].get("peak_bf16_tflops"):
        known = [k for k, e in table["devices"].items() if e.get("peak_bf16_tflops")]
        raise UserError(f"unknown GPU {s.gpu!r} (no peak_bf16_tflops in the price table); known: {', '.join(known)}")
    dev = table["devices"][s.gpu]
    peak = float(dev["peak_bf16_tflops"]) * 1e12
    gen_mfu = s.mfu if s.gen_mfu is None else s.gen_mfu
    assumptions: list[str] = []

    stage, _ = _get(recipe, ["stage", "estimate.stage"])
    if stage is None:
        stage = "rl" if _get(recipe, GROUP_KEYS)[0] is not None else "sft" if _get(
            recipe, EPOCH_KEYS)[0] is not None else None
        if stage is None:
            raise UserError(f"{path}: cannot tell whether this is an SFT or RL recipe; add `stage: sft` or `stage: rl`")
        assumptions.append(f"stage read as {stage} from the recipe's keys")
    stage = str(stage).lower()
    if stage not in ("sft", "rl", "distill"):
        raise UserError(f"{path}: stage {stage!r} unknown; use sft, rl or distill")

    # the model that runs: the trained one, or the teacher when distilling
    model = _teacher(recipe, path) if stage == "distill" else recipe.get("model")
    p_value, p_key = _get(recipe, ["params", "estimate.params"])
    given = s.params if s.params is not None else p_value
    shape: dict = {}
    if isinstance(model, str):
        try:
            shape = model_shape(model)
        except UserError:
            if given is None:
                raise
    if given is not None:
        shape = {**shape, "params": float(given), "params_total": None,
                 "source": "--params" if s.params is not None else f"recipe key {p_key}"}
    elif not shape:
        raise UserError(f"{path}: no `model:` or `params:`; pass --params N")
    for key in ("layers", "attention_width"):
        value, _ = _get(recipe, [f"estimate.{key}"])
        if value is not None:
            shape[key] = int(value)
    if not shape.get("layers") or not shape.get("attention_width"):
        shape["layers"], shape["attention_width"] = 0, 0
        assumptions.append("attention not counted: the model's shape is unknown "
                           "(add estimate.layers and estimate.attention_width to the recipe)")

    counts, seq, terms = {"sft": _sft, "rl": _rl, "distill": _distill}[stage](recipe, path, s, assumptions)
    ckpt = s.activation_checkpointing
    if ckpt is None:
        ckpt = bool(_get(recipe, ["estimate.activation_checkpointing", "activation_checkpointing",
                                  "gradient_checkpointing"])[0])
    ckpt = ckpt and stage != "distill"  # nothing is trained
    dense, attention = forward_flops(shape["params"], shape["layers"], shape["attention_width"], seq)
    passes_per_token = {"generate": 1, "reference": 1, "critic_values": 1, "train": 3, "critic": 3}
    flops: dict[str, float] = {}
    for term, tokens in terms.items():
        n = passes_per_token[term]
        flops[f"{term}_dense"] = n * dense * tokens
        flops[f"{term}_attention"] = n * attention * tokens
        if ckpt and n == 3:  # training recomputes its forward once
            flops[f"{term}_recompute"] = (dense + attention) * tokens
    if "generate_pairs" in counts:  # decoding attends to the whole context, prefill causally: count pairs exactly
        flops["generate_attention"] = 4 * shape["layers"] * shape["attention_width"] * counts["generate_pairs"]
    gen = flops.get("generate_dense", 0.0) + flops.get("generate_attention", 0.0)
    train = sum(flops.values()) - gen
    wall = train / (s.gpus * peak * s.mfu) + gen / (s.gpus * peak * gen_mfu)
    gpu_hours = wall * s.gpus / 3600
    rate = dev.get("usd_per_hour")
    result = {
        "recipe": str(path), "stage": stage, "model": model, "params": shape["params"],
        "params_total": shape.get("params_total"), "params_source": shape["source"], "layers": shape["layers"],
        "attention_width": shape["attention_width"], "activation_checkpointing": ckpt, "gpu": s.gpu, "gpus": s.gpus,
        "peak_bf16_tflops": dev["peak_bf16_tflops"], "peak_source": dev.get("peak_source"), "mfu": s.mfu,
        "gen_mfu": gen_mfu, **counts,
        "flops_per_token": {"forward_dense": dense, "forward_attention": attention},
        "flops": {**flops, "total": sum(flops.values())},
        "wall_s": wall, "wall_h": wall / 3600, "gpu_hours": gpu_hours,
        "usd_per_gpu_hour": rate, "price_date": dev.get("date"), "price_source": dev.get("source"),
        "cost_usd": gpu_hours * float(rate) if rate is not None else None,
        "assumptions": assumptions + [
            "FLOPs per token: forward 2 x params + 2 x layers x attention width x (seq_len + 1); backward twice the "
            "forward" + ("; activation checkpointing runs the forward once more" if ckpt else
                         "; no activation checkpointing"),
            f"each GPU sustains {s.mfu:.0%} of its dense bf16 peak on these FLOPs while training"
            + (f", {gen_mfu:.0%} while generating" if gen else ""),
            ("not counted: elementwise work, padding, communication, waiting for a step's longest sequence, "
             "data loading, checkpoints, evaluation, start-up")],
    }
    result["published"] = _vs_published(recipe, result)
    if as_json:
        print(json.dumps(result, indent=2))
        return result
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Estimate: {path.name} on {s.gpus} x {s.gpu}", show_header=False)
    t.add_row("model", f"{model} ({shape['params'] / 1e9:.3g}B parameters in matmuls; {shape['source']})")
    for k, v in counts.items():
        t.add_row(k.replace("_", " "), f"{v:,.4g}" if isinstance(v, float) else str(v))
    for k, v in flops.items():
        t.add_row(f"FLOPs {k.replace('_', ' ')}", f"{v:.3e}")
    t.add_row("peak per GPU", f"{dev['peak_bf16_tflops']} TFLOP/s bf16 dense ({dev.get('peak_source')})")
    t.add_row("wall time", hours(wall))
    t.add_row("GPU-hours", f"{gpu_hours:,.2f}")
    t.add_row("cost", f"{money(result['cost_usd'])} at ${rate}/GPU-hour (price of {dev.get('date')})")
    pub = result["published"]
    if pub:
        t.add_row("published", f"{pub['gpu_hours']:,.4g} GPU-hours: estimate / published = "
                               f"{pub['estimate_over_published']:.2f} (the two agree at {pub['mfu_that_matches']:.0%} "
                               "utilisation)")
        if "s_per_step_published" in pub:
            t.add_row("seconds per step", f"{pub['s_per_step_estimated']:.2f} estimated, "
                                          f"{pub['s_per_step_published']:.2f} published")
        if pub.get("seq_len_that_matches"):
            t.add_row("length that matches", f"{pub['seq_len_that_matches']:,.0f} tokens per sequence would cost "
                                             f"the published figure ({pub['seq_len_that_matches_over_mean']:.2f} x "
                                             "the mean): each step waits for its longest sequence")
    con = Console()
    con.print(t)
    con.print(f"Price source: {dev.get('source')}")
    con.print("Assumptions:")
    for a in result["assumptions"]:
        con.print(f"  - {a}")
    return result
