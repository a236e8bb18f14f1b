"""The embedded default model: a character-level tokenizer and a tiny Qwen2, built and pretrained locally.

    budgetthink tiny --out runs/tiny-small --preset small

No model can be downloaded here or on an air-gapped box, so budgetthink builds its own default. The
result is an ordinary transformers model directory (config.json, model.safetensors, tokenizer.json):
`AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load it, and so can
vLLM or TRL.

The tokenizer is a byte-level BPE with *no merges* over printable ASCII and newline: one token per
character. It is written this way (rather than as a WordLevel tokenizer) because transformers 5 loads
every qwen2 directory through Qwen2Tokenizer whatever tokenizer_config.json says, which rebuilds a
byte-level pipeline; a byte-level vocabulary survives that round trip exactly, spaces and newlines included.
"""

import string

from pydantic import BaseModel, Field
from tokenizers import AddedToken, Tokenizer, decoders, models
from tokenizers.pre_tokenizers import ByteLevel

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>"]  # ids 0 and 1
ADDED_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]  # the tinyzero delimiters, one token each
CHARS = ["\n"] + [c for c in string.printable if c not in "\t\r\x0b\x0c\n"]  # 96 characters


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (what ByteLevel uses)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_tokenizer():
    """A PreTrainedTokenizerFast with one token per character, pad and end-of-text specials, think tags."""
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for c in CHARS:
        vocab[b2u[ord(c)]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>",
                                   model_max_length=2048)


class Preset(BaseModel):
    """Shape of a tiny Qwen2."""

    hidden_size: int = Field(description="model width")
    num_hidden_layers: int = Field(description="transformer blocks")
    num_attention_heads: int = Field(description="query heads")
    num_key_value_heads: int = Field(description="key/value heads (grouped-query attention)")
    intermediate_size: int = Field(description="MLP width")
    max_position_embeddings: int = Field(1024, description="context length in characters")


PRESETS = {
    "test": Preset(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=192),
    "small": Preset(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                    intermediate_size=768),
}


