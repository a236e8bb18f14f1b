"""The RL batch as tensors, and the forward passes over it: completions of shared prompts, log-probs, values.

Used by train/rl.py: `collate` turns rollouts (prompt ids, completion ids, which tokens were sampled) into
padded tensors with each distinct prompt once; `forward_completions` runs a prompt once per group and its n
completions after the prompt's KV cache.
"""

import torch

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


def forward_completions(model, batch: dict, dtype: str, share: bool = True) -> torch.Tensor:
    """Outputs [b, T, X] of `model` at the position before each completion token: the logits that predict it
    (for the critic, the value of the state it was sampled from).

    share: run each distinct prompt once and feed the completions after its (repeated) KV cache, so a group
    of n samples pays for its prompt once, forward and backward; else one pass over prompt + completion."""
    T, row = batch["resp"].shape[1], batch["row_prompt"]
    with torch.autocast(batch["resp"].device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        if not share:
            ids = torch.cat([batch["p_ids"][row], batch["resp"]], 1)
            pos = torch.cat([batch["p_pos"][row], batch["c_pos"]], 1)
            return model(input_ids=ids, attention_mask=batch["attn"], position_ids=pos, logits_to_keep=T + 1).logits[:, :-1]
        out = model(input_ids=batch["p_ids"], attention_mask=batch["p_attn"], position_ids=batch["p_pos"],
                    use_cache=True, logits_to_keep=1)
        first = out.logits[row]  # [b, 1, X]: the last prompt position predicts completion token 0
        if T == 1:
            return first
        cache = out.past_key_values
        cache.reorder_cache(row)  # [U, ...] -> [b, ...], differentiable (index_select)
        rest = model(input_ids=batch["resp"][:, :-1], attention_mask=batch["attn"][:, :-1],
                     position_ids=batch["c_pos"][:, :-1], past_key_values=cache, use_cache=True).logits  # [b, T-1, X]
        return torch.cat([first, rest], 1)


def policy_forward(model, batch: dict, temperature: float, entropy: bool, dtype: str, share: bool = True,
                   entropy_grad: bool = False):
    """(log-probs [b, T], entropy [b, T] or None) of the completion tokens under `model`; the entropy carries
    a gradient only with entropy_grad (an entropy bonus), else it is a metric computed without one."""
    logits = forward_completions(model, batch, dtype, share).float() / temperature  # [b, T, V]
    ent = None
    if entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            ent = L.entropy_from_logits(logits if entropy_grad else logits.detach())
    return L.token_logprobs(logits, batch["resp"]), ent


def critic_forward(critic, batch: dict, dtype: str, share: bool = True) -> torch.Tensor:
    """Values [b, T]: V at the position before each completion token (the state it was sampled from)."""
    return forward_completions(critic, batch, dtype, share)[..., 0].float()
