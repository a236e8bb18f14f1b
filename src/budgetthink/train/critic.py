"""The PPO critic: a causal-LM backbone (no LM head) with a scalar value head on every position.

    critic = Critic.from_pretrained("runs/tiny")          # a policy's model directory, or a saved critic
    values = critic(input_ids, attention_mask, position_ids).logits[..., 0]   # [B, L]: V after tokens 0..t
    critic.save_pretrained(dir)        # the backbone as an ordinary model directory + value_head.safetensors
    stats = update(critic, optimizer, scheduler, plan, rows, data, cfg, pad_id, device, check)  # one PPO step

The head starts at zero, so every initial value is 0 and the first advantages are the returns.
"""

from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

from budgetthink.train import losses as L
from budgetthink.train.batch import collate, critic_forward, micro
from budgetthink.train.common import clip_grad

HEAD_FILE = "value_head.safetensors"


class Critic(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "Critic":
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(path, dtype=dtype)  # drops a causal LM's head if there is one
        critic = cls(backbone, backbone.config.hidden_size).to(dtype)
        head = Path(path) / HEAD_FILE
        if head.exists():
            critic.head.load_state_dict(load_file(head))
        return critic

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                logits_to_keep: int = 0) -> SimpleNamespace:
        """Values as `.logits` [B, L, 1] (float32; the last `logits_to_keep` positions if set) and the KV cache
        as `.past_key_values`: the same shape of output as a causal LM's, so the same code runs both."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, use_cache=use_cache)
        hidden = out.last_hidden_state  # [B, L, H]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return SimpleNamespace(logits=self.head(hidden).float(), past_key_values=out.past_key_values)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.backbone.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, path / HEAD_FILE)


def update(critic: Critic, optimizer, scheduler, plan: list[list[int]], rows: list, data: dict, cfg, pad_id: int,
           device, check) -> dict[str, list[float]]:
    """The critic's part of a PPO step: over the policy's mini-batches (`plan`), the clipped value loss against
    the returns (a token mean over each mini-batch), one optimizer step each; then the schedule steps.
    `data` holds mask, values and returns [B, T] (rl.score_batch); `check(**values)` stops on a non-finite one."""
    stats: dict[str, list[float]] = {"value_loss": [], "value_clip_frac": []}
    share = not cfg.gradient_checkpointing
    for mb in plan:
        mb_tokens = float(data["mask"][mb].sum().clamp(min=1.0))
        optimizer.zero_grad(set_to_none=True)
        for idx in micro(mb, cfg.micro_batch_size):
            batch = collate([rows[i] for i in idx], pad_id, cfg.truncated, device)
            T = batch["resp"].shape[1]
            mask, old, ret = (data[k][idx][:, :T] for k in ("mask", "values", "returns"))
            vl, clipped = L.value_loss(critic_forward(critic, batch, cfg.dtype, share), old, ret, cfg.critic.value_clip)
            loss = L.aggregate(vl, mask, "token-mean")
            check(value_loss=loss.item())
            (loss * (float(mask.sum()) / mb_tokens)).backward()
            stats["value_loss"].append(loss.item())
            stats["value_clip_frac"].append(L.masked_mean(clipped.float(), mask).item())
        gn = clip_grad(critic.parameters(), cfg.critic.optim.grad_clip)
        check(critic_grad_norm=gn)
        optimizer.step()
    scheduler.step()
    return stats
