"""The RL batch as tensors, and the forward passes over it: completions of shared prompts, log-probs, values.

Used by train/rl.py: `collate` turns rollouts (prompt ids, completion ids, which tokens were sampled) into
padded tensors with each distinct prompt once; `minibatch_plan` / `micro` split a batch for the update;
`forward_completions` runs a prompt once per group and its n completions after the prompt's KV cache.
"""

import torch

from budgetthink.errors import UserError
from budgetthink.train import losses as L


def collate(rows: list, pad_id: int, truncated_mode: str, device) -> dict:
    """The distinct prompts once (left-padded), the completions per row (right-padded).

    p_ids, p_attn, p_pos [U, P]: the U distinct prompts; row_prompt [b]: which prompt each row continues;
    resp [b, T]: completion ids; c_pos [b, T]: their positions; attn [b, P+T]: prompt then completion mask;
    mask [b, T]: 1.0 where the model sampled the token (inserted tokens and padding 0; truncated rows 0 with
    truncated=mask)."""
    prompts: dict[tuple, int] = {}
    row_prompt = [prompts.setdefault(tuple(r.prompt_ids), len(prompts)) for r in rows]
    P = max(len(p) for p in prompts)
    T = max(max(len(r.completion.token_ids) for r in rows), 1)
    U, b = len(prompts), len(rows)
    p_ids = torch.full((U, P), pad_id, dtype=torch.long)
    p_attn = torch.zeros((U, P), dtype=torch.long)
    for p, u in prompts.items():
        p_ids[u, P - len(p):] = torch.tensor(p, dtype=torch.long)
        p_attn[u, P - len(p):] = 1
    resp = torch.full((b, T), pad_id, dtype=torch.long)
    r_attn = torch.zeros((b, T), dtype=torch.long)
    mask = torch.zeros((b, T), dtype=torch.float32)
    for i, r in enumerate(rows):
        c = r.completion.token_ids
        resp[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        r_attn[i, :len(c)] = 1
        if not (truncated_mode == "mask" and r.truncated):
            mask[i, :len(c)] = torch.tensor(r.completion.sampled, dtype=torch.float32)
    row = torch.tensor(row_prompt, dtype=torch.long)
    plen = p_attn.sum(1)[row]  # [b]
    out = {"p_ids": p_ids, "p_attn": p_attn, "p_pos": (p_attn.cumsum(-1) - 1).clamp(min=0), "row_prompt": row,
           "resp": resp, "c_pos": plen[:, None] + torch.arange(T)[None, :], "attn": torch.cat([p_attn[row], r_attn], 1),
           "mask": mask}
    return {k: v.to(device) for k, v in out.items()}


def micro(idx: list[int], size: int) -> list[list[int]]:
    """`idx` in consecutive pieces of at most `size` (micro-batches)."""
    return [idx[i:i + size] for i in range(0, len(idx), size)]


def minibatch_plan(B: int, n: int, size: int, epochs: int, gen: torch.Generator) -> list[list[int]]:
    """The mini-batches (row indices) of `epochs` passes over B rows, groups of n kept together and, when there
    is more than one pass or mini-batch, shuffled by group each pass (a micro-batch still shares prompts)."""
    plan = []
    for _ in range(epochs):
        order = list(range(B))
        if epochs > 1 or size < B:
            order = [g * n + j for g in torch.randperm(B // n, generator=gen).tolist() for j in range(n)]
        plan += micro(order, size)
    return plan


def lm_parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(backbone, lm_head) of a causal LM, or of a peft model around one: the backbone's last hidden state
    times the head's weight are the model's logits (refused where the model transforms them further)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(lm.config, name, None) not in (None, 1.0):
            raise UserError(f"rl: the model's logits are post-processed ({name}={getattr(lm.config, name)}), "
                             "which the chunked log-probs do not apply; use a model without it")
    head = lm.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise UserError(f"rl: the model's lm-head is a {type(head).__name__}, not a plain linear layer (an adapter "
                         "on it?); the chunked log-probs read its weight: leave lm_head out of lora.target_modules")
    return lm.get_decoder(), head


def forward_completions(backbone, batch: dict, dtype: str, share: bool = True) -> torch.Tensor:
    """Last hidden states [b, T, H] of `backbone` at the position before each completion token: what predicts
    it (through the lm-head) or values the state it was sampled from (through the critic's head).

    share: run each distinct prompt once and feed the completions after its (repeated) KV cache, so a group
    of n samples pays for its prompt once, forward and backward; else one pass over prompt + completion."""
    T, row = batch["resp"].shape[1], batch["row_prompt"]
    with torch.autocast(batch["resp"].device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        if not share:
            ids = torch.cat([batch["p_ids"][row], batch["resp"]], 1)
            pos = torch.cat([batch["p_pos"][row], batch["c_pos"]], 1)
            return backbone(input_ids=ids, attention_mask=batch["attn"], position_ids=pos).last_hidden_state[:, -T - 1:-1]
        out = backbone(input_ids=batch["p_ids"], attention_mask=batch["p_attn"], position_ids=batch["p_pos"],
                       use_cache=True)
        first = out.last_hidden_state[row, -1:]  # [b, 1, H]: the last prompt position predicts completion token 0
        if T == 1:
            return first
        cache = out.past_key_values
        cache.reorder_cache(row)  # [U, ...] -> [b, ...], differentiable (index_select)
        rest = backbone(input_ids=batch["resp"][:, :-1], attention_mask=batch["attn"][:, :-1],
                        position_ids=batch["c_pos"][:, :-1], past_key_values=cache, use_cache=True).last_hidden_state
        return torch.cat([first, rest], 1)  # [b, T, H]


def policy_forward(model, batch: dict, temperature: float, entropy: bool, dtype: str, share: bool = True,
                   entropy_grad: bool = False):
    """(log-probs [b, T], entropy [b, T] or None) of the completion tokens under `model` (0 on padding); the
    entropy carries a gradient only with entropy_grad (an entropy bonus), else it is a metric without one.
    Only the completion tokens go through the lm-head, in chunks (losses.head_logprobs)."""
    backbone, head = lm_parts(model)
    hidden = forward_completions(backbone, batch, dtype, share)  # [b, T, H]
    real = batch["attn"][:, -hidden.shape[1]:].bool()  # [b, T]: completion tokens, not padding
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        lp, ent = L.head_logprobs(hidden[real], head, batch["resp"][real], temperature, entropy, entropy_grad)
    logp = hidden.new_zeros(real.shape, dtype=torch.float32).masked_scatter(real, lp)
    if ent is not None:
        ent = hidden.new_zeros(real.shape, dtype=torch.float32).masked_scatter(real, ent)
    return logp, ent


def critic_forward(critic, batch: dict, dtype: str, share: bool = True) -> torch.Tensor:
    """Values [b, T]: V at the position before each completion token (the state it was sampled from)."""
    hidden = forward_completions(critic.backbone, batch, dtype, share)  # [b, T, H]
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        return critic.head(hidden)[..., 0].float()
