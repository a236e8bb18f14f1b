"""The torch generation engine: batched decoding with a per-row KV cache, for any transformers causal LM.

    engine = TorchEngine("runs/tiny")                       # or TorchEngine(model, tokenizer)
    outs = engine.generate(prompts, Sampling(temperature=1.0, max_tokens=256, seed=0), n=8,
                           budget=Budget(max_thinking_tokens=64), fmt=get_format("tinyzero"))

A hand-written decoding loop (no `model.generate`), built for RL and evaluation on a CPU or one GPU:

- **Per-row KV cache.** `RowCache` preallocates [B, kv_heads, capacity, head_dim] keys and values per layer;
  row b's tokens sit compactly from slot 0 on. After the prefill, every step feeds each live row exactly one
  token: the first token of its prompt + output that is not in its cache yet. Usually that is the token it
  just sampled; after budget forcing inserted a string it is the string's next token (the row samples again
  once the whole string is in), so an insertion costs what its tokens cost and never widens the batch.
  Removing a delimiter the model wrote just lowers the row's length. Rows thus grow unevenly; the attention
  mask [B, 1, L, T] and the position ids are per row, and positions are logical (the row's own token index),
  so a row's output never depends on what else is in the batch. Nothing is ever re-encoded. Writes go
  through `index_copy_` into a flat view (4x faster here than `scatter_`). The attention reads whole buffers,
  which are kept only a little larger than needed (`room`): a strided slice would cost each matrix product
  a copy.
- **Prefill** feeds [P, L] blocks, left-padded so that the logits needed are at the last slot; a row's pads
  are written just after its tokens (overwritten later, never attended to).
- **Attention** through a registered function ("budgetthink_rows"). Grouped-query heads are folded into the
  query length instead of repeating keys and values. The prefill uses sdpa; a decoding step (one query per
  row) uses plain matrix products and an explicit softmax (faster here at 2 threads than the CPU sdpa
  kernel for one query; in bf16/fp16 on a CPU, the CPU flash kernel, which computes in float32). It is
  exact scaled-dot-product attention; models with sliding windows, soft-capping or attention sinks are not
  supported by this engine.
- **Shared prefill and prefix.** The n samples of a prompt share one prefill. With n > 1 the prompt (all but
  its last token) then stays in the cache once per prompt, and each decoding step attends to it once for the
  n samples (`prefix_attention`: one wider matrix product per prompt instead of n narrow ones, merged exactly
  with the attention over the row's own tokens by log-sum-exp); only the rest is kept per row.
- **Finished rows** are dropped once an eighth of the batch is done: the live rows' used cache positions are
  copied into new buffers (with `room` to grow), not the whole capacity.
- **Sampling**: greedy (temperature 0), temperature, top-k, top-p, seeded with a torch.Generator (`sample`). The
  log-probability of each sampled token is taken under the distribution actually sampled from (after
  temperature, top-k and top-p); under greedy it is the plain log-softmax of the logits. Inserted tokens
  get log-prob 0 and `sampled=False`.
- **Budget forcing** rules live in budget.py (`Forcing`); see its docstring for the exact semantics.
- **Linear layers through oneDNN** (`OneDNNLinears`): in float32 on a CPU, the engine's forwards run each
  larger `nn.Linear` as a oneDNN product on a prepacked copy of its weight (repacked when the weight changes,
  as in RL). torch's own fp32 product goes through MKL, which on AMD CPUs with AVX-512 runs its AVX2 code:
  there oneDNN's product was about twice as fast. The copy costs those weights' memory once more.

Numerics: a row's tokens are computed with the same weights and positions whatever the batch, but batched
matrix products may round differently from a single-row forward, so greedy ties can in principle break
differently in low precision; the exactness tests run in float64.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache

from budgetthink.budget import Budget, Forcing
from budgetthink.engine import Completion, Sampling, check_prompts, completion, eos_ids, model_dir
from budgetthink.errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
ATTENTION = "budgetthink_rows"
# below this temperature sampling is greedy: logits / T would overflow to inf (then NaN), and the distribution is
# one-hot to float precision long before that
GREEDY_BELOW = 1e-5


def row_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, row_cache=None, **kwargs):
    """Scaled-dot-product attention with a [B, 1, L, T] bool mask, grouped-query heads folded into the queries.

    query [B, H, L, D], key/value [B, Hkv, T, D] -> ([B, L, H, D], None). When `row_cache` holds a shared
    prompt prefix (decoding n > 1 samples per prompt), key/value are the rows' own positions only and the
    prefix is attended to once per prompt (`prefix_attention`).
    """
    B, H, L, D = query.shape
    Hkv, T = key.shape[1], key.shape[2]
    G = H // Hkv  # query heads per key/value head (head h uses kv head h // G)
    if L == 1:  # decoding: one query per row, the G heads sharing a kv head as G rows of one matrix product
        q, scale = query.reshape(B, Hkv, G, D), D ** -0.5 if scaling is None else scaling
        if row_cache is not None and row_cache.pk:
            out = prefix_attention(q, key, value, attention_mask, scale, row_cache, module.layer_idx)
        else:
            out = _attend(q, key, value, attention_mask, scale)[0].to(q.dtype)  # [B, Hkv, G, Dv]
        return out.reshape(B, 1, H, -1), None
    q = query.reshape(B, Hkv, G * L, D)
    mask = attention_mask
    if G > 1 and L > 1:  # (with one query per row the [B, 1, 1, T] mask broadcasts over the G folded heads)
        mask = mask[:, :, None].expand(B, 1, G, L, T).reshape(B, 1, G * L, T)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)  # [B, Hkv, G*L, Dv]
    return out.reshape(B, H, L, -1).transpose(1, 2), None


def _attend(q, key, value, valid, scale: float):
    """Attention of q [N, Hkv, M, D] over key/value [N, Hkv, T, D] where valid [N, 1, 1, T] -> (output
    [N, Hkv, M, Dv] in at least float32, log-sum-exp of the scores [N, Hkv, M, 1]), so that two parts over
    different keys can be merged exactly. A query with no valid key gets a very low log-sum-exp (weight 0)."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        # the CPU flash kernel converts blocks to float32 itself; plain matrix products would run in emulated bf16
        bias = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill(~valid, torch.finfo(q.dtype).min)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, key, value, 0.0, False,
                                                                             attn_mask=bias, scale=scale)
        return out.float(), lse[..., None]
    acc = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q, key.transpose(-1, -2)).to(acc) * scale  # [N, Hkv, M, T]
    s = s.masked_fill(~valid, torch.finfo(s.dtype).min)  # not -inf: an all-masked row must not give NaN
    m = s.amax(-1, keepdim=True)
    e = (s - m).exp()
    total = e.sum(-1, keepdim=True)
    return torch.matmul(e.to(value.dtype), value).to(acc) / total, m + total.log()


def prefix_attention(q, key, value, mask, scale, cache: "RowCache", layer: int) -> torch.Tensor:
    """One decoding step's attention over [the prompt's shared prefix] + [the row's own positions].

    q [B, Hkv, G, D] (one query per row, G query heads per kv head); key/value [B, Hkv, T, Dv] the rows' own
    positions with mask [B, 1, 1, T]; the prefix keys/values [Pp, Hkv, S, D] sit in the cache once per prompt.
    The rows' queries are laid out on a [Pp, n] grid (finished rows leave holes) so that each prompt's prefix
    is read once for its n samples: one [n*G, D] x [D, S] product per prompt and kv head instead of n of
    [G, D] x [D, S]. The two parts are merged exactly (softmax over their concatenation).
    """
    _, Hkv, G, D = q.shape
    Pp, n = cache.pk[layer].shape[0], cache.n
    o_own, lse_own = _attend(q, key, value, mask, scale)  # [B, Hkv, G, Dv], [B, Hkv, G, 1]
    grid = q.new_zeros(Pp * n, Hkv, G, D)
    grid[cache.slot] = q
    grid = grid.view(Pp, n, Hkv, G, D).transpose(1, 2).reshape(Pp, Hkv, n * G, D)
    o_pre, lse_pre = _attend(grid, cache.pk[layer], cache.pv[layer], cache.pmask[:, None, None, :], scale)

    def rows(x):  # [Pp, Hkv, n*G, c] -> [B, Hkv, G, c]
        return x.view(Pp, Hkv, n, G, -1).transpose(1, 2).reshape(Pp * n, Hkv, G, -1)[cache.slot]

    o_pre, lse_pre = rows(o_pre), rows(lse_pre)
    lse = torch.logaddexp(lse_own, lse_pre)
    return (o_own * (lse_own - lse).exp() + o_pre * (lse_pre - lse).exp()).to(q.dtype)


AttentionInterface.register(ATTENTION, row_attention)


def room(used: int) -> int:
    """Free slots a cache buffer gets beyond `used` when it is (re)allocated: the attention reads the whole
    buffer (contiguous: a strided slice costs the matrix products a copy), so the slack is kept small, and
    proportional so that growing to T slots copies O(T) in all. Against reading a slice of doubled buffers,
    interleaved A/B runs here (64 x 8 rows, fp32, 2 threads): 16 slots of slack (what this gives up to 128
    used) +9.6% and +2.0% at 128 tokens, +0.4% at 256; 32 slots +6.7%, 64 slots +3%; and +10% on budget
    forcing with extensions (16 x 8 rows)."""
    return max(16, used // 8)


class RowCache(Cache):
    """Keys and values per layer in preallocated [B, Hkv, cap, D] buffers; each row written at its own positions.

    Row b's slot j holds its logical position off[b] + j. Before each forward the engine sets `pos` [B, L]
    (the slots each fed token is written to) and `used` (slots in use by the longest row); the attention reads
    all `cap` slots, the mask hiding what a row has not written.

    With n samples per prompt, `share_prefix` moves all but the last prompt token out of the rows into one
    [Pp, Hkv, S, D] prefix per prompt (`pk`, `pv`, valid positions `pmask` [Pp, S]); `slot` [B] is each row's
    place (prompt * n + sample) on the prompt grid that `prefix_attention` reads.
    """

    def __init__(self, cap: int, rows: int, device):
        super().__init__(layers=[])
        self.cap, self.keys, self.values = cap, [], []
        self.pos: torch.Tensor | None = None  # [B, L]
        self.flat: torch.Tensor | None = None  # [B * Hkv * L] where this forward's keys go in a [-1, D] view
        self.used = 0
        self.off = torch.zeros(rows, dtype=torch.long, device=device)  # [B] logical position of each row's slot 0
        self.pk, self.pv, self.pmask, self.slot, self.n = [], [], None, None, 1

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        B, Hkv, _, D = key_states.shape  # [B, Hkv, L, D]
        if layer_idx == len(self.keys):
            self.keys.append(key_states.new_zeros(B, Hkv, self.cap, D))
            self.values.append(value_states.new_zeros(B, Hkv, self.cap, value_states.shape[-1]))
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if layer_idx == 0:  # row b's slot l goes to position pos[b, l]: as rows of a [B * Hkv * cap, D] view
            rows = torch.arange(B * Hkv, device=k.device).view(B, Hkv, 1) * self.cap
            self.flat = (rows + self.pos[:, None, :]).flatten()  # [B * Hkv * L]
        k.view(-1, D).index_copy_(0, self.flat, key_states.reshape(-1, D))
        v.view(-1, v.shape[-1]).index_copy_(0, self.flat, value_states.reshape(-1, v.shape[-1]))
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.used

    def reserve(self, need: int) -> None:
        """Make room for `need` positions (and `room(need)` more)."""
        if need <= self.cap:
            return
        new = need + room(need)
        for buf in (self.keys, self.values):
            for i, t in enumerate(buf):
                buf[i] = torch.cat([t, t.new_zeros(*t.shape[:2], new - t.shape[2], t.shape[3])], dim=2)
        self.cap = new

    def _rebuild(self, rows: list[list[torch.Tensor]], idx: torch.Tensor, used: int) -> None:
        """New buffers: row i gets rows[.][.][idx[i], :, :used] (the first `used` positions), and `room(used)`
        free slots (`reserve` adds more when a row needs them)."""
        cap = used + room(used)
        for buf, src in zip((self.keys, self.values), rows):
            for i, t in enumerate(src):
                new = t.new_empty(len(idx), t.shape[1], cap, t.shape[3])
                torch.index_select(t[:, :, :used], 0, idx, out=new[:, :, :used])
                new[:, :, used:] = 0  # read (masked) before rows write there: must hold no NaN
                buf[i] = new
        self.cap = cap

    def select(self, idx: torch.Tensor) -> None:
        """Keep (or repeat) rows `idx`. Only the used positions are copied, so dropping finished rows costs a
        copy of what is live, not of the whole capacity. Prompts left with no row leave the prefix."""
        self._rebuild([self.keys, self.values], idx, self.used)
        self.off = self.off[idx]
        if self.pk:
            self.slot = self.slot[idx]
            prompt = self.slot // self.n
            keep = prompt.unique()
            if len(keep) < self.pmask.shape[0]:
                self.pk = [t[keep] for t in self.pk]
                self.pv = [t[keep] for t in self.pv]
                self.pmask = self.pmask[keep]
                renum = torch.zeros(int(keep.max()) + 1, dtype=torch.long, device=idx.device)
                renum[keep] = torch.arange(len(keep), device=idx.device)
                self.slot = renum[prompt] * self.n + self.slot % self.n

    def share_prefix(self, n: int, shared: torch.Tensor, lengths: torch.Tensor) -> None:
        """After a prefill of P sequences of `lengths` [P], decode n samples of each: positions below shared[p]
        become sequence p's prefix, kept once; the n rows of each (prompt-major) keep the rest from slot 0."""
        P, dev = len(lengths), lengths.device
        S = max(1, int(shared.max()))
        self.pk = [t[:, :, :S].clone() for t in self.keys]
        self.pv = [t[:, :, :S].clone() for t in self.values]
        self.pmask = torch.arange(S, device=dev)[None, :] < shared[:, None]  # [P, S]
        used = int((lengths - shared).max())
        at = (shared[:, None] + torch.arange(used, device=dev))[:, None, :, None]  # [P, 1, used, 1]
        tails = [[t.gather(2, at.expand(-1, t.shape[1], -1, t.shape[3])) for t in buf]  # [P, Hkv, used, D]
                 for buf in (self.keys, self.values)]
        rep = torch.arange(P, device=dev).repeat_interleave(n)
        self._rebuild(tails, rep, used)
        self.used, self.off, self.slot, self.n = used, shared[rep], torch.arange(P * n, device=dev), n


class OneDNNLinears:
    """For the duration of a `with`, a model's larger fp32 `nn.Linear` layers on the CPU compute through oneDNN
    on prepacked weights (inference only: with gradients on it does nothing). A weight is packed once and again
    only when it changes (its version counter moves, as an optimizer step makes it), so one instance serves a
    model that trains between generations."""

    MIN_WEIGHT = 1 << 18  # smaller layers lose more to converting their input than oneDNN's product gains

    def __init__(self, model):
        self.layers = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.numel() >= self.MIN_WEIGHT]
        self.on = torch.backends.mkldnn.is_available()
        self.packed: dict[int, tuple] = {}  # id(layer) -> ((weight version, data pointer), its oneDNN forward)
        self.active: list = []  # the layers patched by the current `with`

    def _forward(self, m):
        key = (m.weight._version, m.weight.data_ptr())
        got = self.packed.get(id(m))
        if got is None or got[0] != key:
            w = m.weight.detach().to_mkldnn()
            b = (m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)).to_mkldnn()
            got = self.packed[id(m)] = key, lambda x: torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), w,
                                                                                  b).to_dense()
        return got[1]

    def __enter__(self):
        if self.on and not torch.is_grad_enabled():
            self.active = [m for m in self.layers if m.weight.dtype == torch.float32 and m.weight.is_cpu]
        for m in self.active:
            m.forward = self._forward(m)
        return self

    def __exit__(self, *exc):
        for m in self.active:
            del m.forward
        self.active = []


def left_padded(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefill block: seqs left-padded to one length, [P, L] ids, and each one's length k [P]."""
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), pad, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s, dtype=torch.long, device=device)
    return ids, torch.tensor([len(s) for s in seqs], dtype=torch.long, device=device)


BLOCK = 256  # tokens per block of the two-level sampling in `inverse_cdf`


def inverse_cdf(mass: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The token of each row whose cumulative mass first exceeds r * the row's total: mass [B, V] >= 0
    (unnormalised), r [B, 1] uniform in [0, 1) as float64 -> (tokens [B], total mass [B] in float64). A token
    of zero mass is never drawn.

    Two levels: a float64 running sum over the sums of blocks of 256 tokens picks the block, a float32 one
    within that block the token. Only the chosen block is cumulated: a running sum over all 49k tokens costs
    more than the rest of sampling together here, and in float32 it would lose up to ~0.3% of the last
    tokens' mass."""
    B, V = mass.shape
    if V % BLOCK:
        mass = F.pad(mass, (0, BLOCK - V % BLOCK))
    blocks = mass.view(B, -1, BLOCK)  # [B, nb, BLOCK]
    outer = blocks.sum(-1, dtype=torch.float64).cumsum(-1)  # [B, nb] mass up to each block's end
    u = r * outer[:, -1:]  # [B, 1]
    j = torch.searchsorted(outer, u, right=True).clamp(max=outer.shape[1] - 1)  # [B, 1] the block
    before = torch.where(j > 0, outer.gather(1, (j - 1).clamp(min=0)), 0.0)  # mass of the blocks before it
    inner = blocks.gather(1, j[:, :, None].expand(B, 1, BLOCK))[:, 0].cumsum(-1)  # [B, BLOCK]
    k = torch.searchsorted(inner, (u - before).to(inner.dtype), right=True).clamp(max=BLOCK - 1)
    x = (j * BLOCK + k)[:, 0]
    empty = mass.gather(1, x[:, None])[:, 0] == 0
    if bool(empty.any()):  # rounding ran past a block's last token with mass: take the nearest token with mass
        far = (torch.arange(mass.shape[1], device=mass.device) - x[:, None]).abs().masked_fill(mass == 0, 1 << 62)
        x = torch.where(empty, far.argmin(-1), x)
    return x, outer[:, -1]


def uniforms(rows: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """The uniform draws [rows, 1] (float64) that `sample` turns into tokens, one per row."""
    return torch.rand(rows, 1, dtype=torch.float64, device=device, generator=generator)


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None, r: torch.Tensor | None = None):
    """logits [B, V] (float32 or float64) -> (tokens [B], log-probs [B] under the distribution sampled from).
    r: the rows' uniform draws (`uniforms`), when they come from several generators; else drawn from generator.

    Sampling inverts the cumulative distribution (`inverse_cdf`): one uniform draw per row. Over a 49k
    vocabulary that is ~10x cheaper on a CPU than a draw per token (an exponential race, or
    `torch.multinomial`), which took a quarter of a SmolLM2 decoding step."""
    if sampling.temperature < GREEDY_BELOW:
        x = logits.argmax(-1)
        return x, logits.log_softmax(-1).gather(-1, x[:, None])[:, 0]
    if sampling.temperature != 1:
        logits = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        beyond = probs.cumsum(-1) - probs > sampling.top_p  # mass before this token already exceeds top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(beyond, float("-inf")))
    shifted = logits - logits.amax(-1, keepdim=True)  # [B, V], <= 0: exp cannot overflow
    r = uniforms(len(logits), generator, logits.device) if r is None else r
    x, total = inverse_cdf(shifted.exp(), r)
    lp = shifted.gather(-1, x[:, None])[:, 0] - total.log().to(shifted.dtype)
    return x, lp


class TorchEngine:
    """Generation with a hand-written batched decoding loop (see the module docstring)."""

    def __init__(self, model_or_path, tokenizer=None, device=None, dtype=None, max_batch: int = 512,
                 eos_token_ids: list[int] | None = None):
        """`model_or_path`: a model directory, a loaded causal LM (with `tokenizer`), or a (model, tokenizer) pair.

        device/dtype apply when loading from a directory (default: cuda if available, float32); a loaded model
        is used where and as it is. max_batch bounds the rows decoded together (prompts x n). eos_token_ids
        overrides the end-of-text ids (default: the tokenizer's and the model's; [] never stops on one).
        """
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        if isinstance(model_or_path, tuple):
            model_or_path, tokenizer = model_or_path
        if isinstance(model_or_path, (str, Path)):
            path = model_dir(model_or_path)
            from safetensors import SafetensorError
            from transformers import AutoModelForCausalLM, AutoTokenizer

            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            try:
                model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype or torch.float32)
            except (OSError, ValueError, SafetensorError) as e:  # a truncated or damaged weights file
                raise UserError(f"cannot load the model in {path} ({str(e).splitlines()[0]}); its weights may be "
                                "truncated or damaged: save or copy the model again") from None
            model.to(device)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(path, local_files_only=True)
        else:
            model = model_or_path
            if tokenizer is None:
                raise UserError("TorchEngine needs a tokenizer with a loaded model: TorchEngine(model, tokenizer)")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = next(model.parameters()).device
        self.max_batch = max_batch
        config = model.config
        self.context = getattr(config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length",
                                                                                   None) or 1 << 30
        self.vocab = model.get_output_embeddings().weight.shape[0]
        if eos_token_ids is None:
            eos_token_ids = eos_ids(tokenizer, getattr(model.generation_config, "eos_token_id", None),
                                    config.eos_token_id)
        self.eos = sorted(set(eos_token_ids))
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or [0])[0]
        self._memo: dict = {}  # Forcing's per-tokenizer caches
        self._linears = OneDNNLinears(model)

    # --- the public call ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: list[str], sampling: Sampling, n: int = 1, budget: Budget | None = None,
                 fmt=None, prompt_ids: list[list[int]] | None = None) -> list[Completion]:
        """len(prompts) * n Completions, prompt-major (all samples of prompt 0 first).

        prompts are encoded with the tokenizer's defaults (special tokens as it adds them), unless prompt_ids
        gives the ids directly. With a budget, the prompts should end with fmt's opening delimiter.
        """
        prompt_ids = check_prompts(self.tokenizer, prompts, prompt_ids, n, self.context, "max_position_embeddings")
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(self.device).manual_seed(sampling.seed)
        results: list[Completion | None] = [None] * (len(prompt_ids) * n)
        per = max(1, self.max_batch // n)
        previous = self.model.config._attn_implementation
        self.model.config._attn_implementation = ATTENTION
        try:
            for c in range(0, len(prompt_ids), per):
                self._run(prompt_ids[c:c + per], c, n, sampling, budget, fmt, generator, results)
        finally:
            self.model.config._attn_implementation = previous
        return results

    # --- one batch ----------------------------------------------------------------------------------------------
    def _forward(self, cache: RowCache, ids: torch.Tensor, k: torch.Tensor, cache_len: torch.Tensor):
        """Feed ids [B, L] (row b's k[b] tokens left-padded) after cache_len [B] tokens -> last logits [B, V]."""
        L = ids.shape[1]
        j = torch.arange(L, device=ids.device)
        valid = j[None, :] >= (L - k)[:, None]  # [B, L]
        pos = cache_len[:, None] + (j[None, :] + k[:, None]) % L  # [B, L]: valid slots in order, pads after them
        at = pos - cache.off[:, None]  # [B, L] cache slots (a row's slot 0 holds its position off)
        cache.used = int(at.max()) + 1
        cache.reserve(cache.used)
        cache.pos = at
        t = torch.arange(cache.cap, device=ids.device)
        mask = torch.where(valid[..., None], t <= at[..., None], t == at[..., None])[:, None]  # [B, 1, L, T]
        with self._linears:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                             use_cache=True, logits_to_keep=1, row_cache=cache)
        logits = out.logits[:, -1]
        return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits

    def _run(self, prompts: list[list[int]], first: int, n: int, sampling: Sampling, budget: Budget | None,
             fmt, generator, results: list) -> None:
        dev, P = self.device, len(prompts)
        B = P * n
        forcing = Forcing(self.tokenizer, fmt, budget, sampling, self.eos, rows=B, vocab=self.vocab, device=dev,
                          context=self.context, memo=self._memo)
        plen = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=dev)  # [P] prompt lengths
        rep = torch.arange(P, device=dev).repeat_interleave(n)  # [B] prompt of each row
        start = forcing.start_ids(plen[rep])
        cap = sampling.max_tokens + len(start) + forcing.max_insert + 8
        out_tok = torch.full((B, cap), self.pad, dtype=torch.long, device=dev)  # [B, cap] tokens after the prompt
        out_lp = torch.zeros(B, cap, device=dev)  # [B, cap] log-probs (0 for inserted)
        out_smp = torch.zeros(B, cap, dtype=torch.bool, device=dev)  # [B, cap] sampled?
        out_tok[:, : len(start)] = torch.tensor(start, dtype=torch.long, device=dev)
        out_len = torch.full((B,), len(start), dtype=torch.long, device=dev)

        # prefill each prompt once (with the forced end when max_thinking_tokens is 0), then repeat rows n times
        seqs = [p + start for p in prompts]
        ids, k = left_padded(seqs, self.pad, dev)
        L = ids.shape[1]
        cache = RowCache(cap=L, rows=P, device=dev)  # the prefill's room; the decoding rows get theirs below
        logits = self._forward(cache, ids, k, torch.zeros(P, dtype=torch.long, device=dev))  # [P, V]
        if n > 1:  # the n samples read the prompt (but its last token) from one shared prefix
            cache.share_prefix(n, plen - 1, k)
        else:
            cache.select(rep)
        logits, cache_len, plen = logits[rep], k[rep], plen[rep]
        last_prompt = torch.tensor([p[-1] for p in prompts], dtype=torch.long, device=dev)[rep]  # [B]
        row_id = first * n + torch.arange(B, device=dev)  # [B] index of each row in `results`

        while True:
            # logits [B, V] are the next-token logits of the rows whose whole sequence is now in the cache
            B = len(row_id)
            rows = torch.arange(B, device=dev)
            ready = forcing.live & (cache_len == plen + out_len)  # [B] rows that sample this step
            x, lp = sample(logits, sampling, generator)
            if int(out_len.max()) + 1 + forcing.max_insert > out_tok.shape[1]:  # room for this step's writes
                grow = out_tok.shape[1]
                out_tok = torch.cat([out_tok, out_tok.new_full((B, grow), self.pad)], 1)
                out_lp = torch.cat([out_lp, out_lp.new_zeros(B, grow)], 1)
                out_smp = torch.cat([out_smp, out_smp.new_zeros(B, grow)], 1)
            at = torch.where(ready, out_len, out_tok.shape[1] - 1)  # rows not sampling write to a spare slot
            out_tok[rows, at], out_lp[rows, at], out_smp[rows, at] = x, lp.float(), True
            out_len += ready
            edits = forcing.advance(out_tok, out_len, ready.long(), plen)
            for r, (drop, ins) in edits.items():
                end = int(out_len[r]) - drop
                cache_len[r] = min(int(cache_len[r]), int(plen[r]) + end)  # a removed delimiter leaves the cache
                m = len(ins)
                out_tok[r, end:end + m] = torch.tensor(ins, dtype=torch.long, device=dev)
                out_lp[r, end:end + m], out_smp[r, end:end + m] = 0.0, False
                out_len[r] = end + m

            live = forcing.live
            done = int((~live).sum())
            if done == B:
                self._collect(rows, row_id, out_tok, out_lp, out_smp, out_len, forcing, fmt, n, results)
                return
            if done >= max(1, B // 8):  # drop finished rows so they stop costing compute
                self._collect((~live).nonzero().flatten(), row_id, out_tok, out_lp, out_smp, out_len, forcing, fmt,
                              n, results)
                keep = live.nonzero().flatten()
                cache.select(keep)
                forcing.select(keep)
                out_tok, out_lp, out_smp, out_len = out_tok[keep], out_lp[keep], out_smp[keep], out_len[keep]
                plen, last_prompt, row_id, cache_len = plen[keep], last_prompt[keep], row_id[keep], cache_len[keep]
                live = live[keep]

            # every live row feeds one token: the first of prompt + output not yet in its cache (inserted
            # strings thus go in one token per step, as cheap as sampled ones, and never widen the batch)
            refeed = live & (cache_len == plen + out_len)  # nothing pending (x dropped, nothing inserted)
            cache_len = cache_len - refeed.long()  # recompute the last token to get its logits again
            src = (cache_len - plen)[:, None]  # [B, 1] output index of the token to feed (-1: the prompt's last)
            ids = torch.where(src < 0, last_prompt[:, None], out_tok.gather(1, src.clamp(min=0)))
            k = live.long()
            logits = self._forward(cache, ids, k, cache_len)
            cache_len = cache_len + k

    def _collect(self, idx: torch.Tensor, row_id, out_tok, out_lp, out_smp, out_len, forcing: Forcing, fmt, n: int,
                 results: list) -> None:
        """Turn finished rows `idx` into Completions in `results`."""
        for r in idx.tolist():
            m, i = int(out_len[r]), int(row_id[r])
            results[i] = completion(self.tokenizer, fmt, self.eos, forcing, r, i, n, out_tok[r, :m].tolist(),
                                    out_lp[r, :m].tolist(), out_smp[r, :m].tolist())
