"""Prompt token ids from what a client sent, with user text never encoded as control tokens.

A tokenizer matches its added tokens (`<|endoftext|>`, `<think>`, `</think>`, `<|im_start|>`, ...) anywhere in
the text it is given, so a user who writes "</think>" or "<|endoftext|>" would close the model's thinking or end
its text. Here user text is encoded as plain text: `split_special_tokens` for the special ones, and any other
added token that still comes out is re-encoded character by character (it decodes to the same text). The
chat template's own control tokens stay control tokens: the template is rendered with a placeholder for each
message's content, its text encoded as usual and each content as user text. `allow_special_tokens` (the
server's `--allow-special-tokens`) restores plain `tokenizer.encode` of the whole prompt.

The tokenizer's own additions (a BOS some tokenizers put in front) are kept for raw prompts, as
`tokenizer.encode` adds them; a chat template writes its own, so chat prompts get none added.
"""

from budgetthink.formats import has_chat_template
from budgetthink.serve.api import APIError

MARK = "\ue000{}\ue001"  # placeholder for message i's content (private-use characters: no template touches them)


class PromptEncoder:
    """Prompt ids for one tokenizer and think format."""

    def __init__(self, tokenizer, fmt, allow_special: bool = False):
        self.tokenizer, self.fmt, self.allow_special = tokenizer, fmt, allow_special
        bare, full = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a")
        at = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), 0)
        self.head, self.tail = full[:at], full[at + len(bare):]  # what the tokenizer adds around a text (a BOS)
        self.control = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}

    def plain(self, text: str) -> list[int]:
        """Template or delimiter text: control strings are control tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def user(self, text: str) -> list[int]:
        """Ids of user text with no control token among them (their strings become plain text)."""
        if not text:
            return []
        tok = self.tokenizer
        ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if not any(i in self.control for i in ids):
            return ids
        out = []
        for i in ids:
            if i in self.control:  # a non-special added token (e.g. `</think>`): its characters one by one
                for ch in self.control[i]:
                    out += tok(ch, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            else:
                out.append(i)
        return out

    def completion(self, text: str) -> list[int]:
        """A raw prompt, then the format's opening delimiter (the engine's budget counts from it); a prompt that
        already ends with the delimiter gets it once."""
        text = text.removesuffix(self.fmt.think_open)
        if self.allow_special:
            return self.tokenizer.encode(text + self.fmt.think_open)
        return [*self.head, *self.user(text), *self.plain(self.fmt.think_open), *self.tail]

    def chat(self, messages: list[dict], template_kwargs: dict | None = None, think: bool = True) -> list[int]:
        """The chat template's prompt (then the opening delimiter unless `think` is off), each message's content
        encoded as user text; template_kwargs go to the template."""
        render = lambda ms: self.render(ms, template_kwargs, think)
        own = not has_chat_template(self.tokenizer)  # a template writes its own BOS: the tokenizer's would double it
        if self.allow_special:
            return self.tokenizer.encode(render(messages), add_special_tokens=own)
        marks = [MARK.format(i) for i in range(len(messages))]
        text = render([{**m, "content": mark} for m, mark in zip(messages, marks)])
        ids, at = [], 0
        for mark, m in zip(marks, messages):
            j = text.find(mark, at)
            if j < 0:  # the template rewrote a content (it may drop or edit some): encode it whole, refusing control strings
                return self._checked_whole(messages, render)
            ids += self.plain(text[at:j]) + self.user(m["content"])
            at = j + len(mark)
        return [*self.head, *ids, *self.plain(text[at:]), *self.tail] if own else ids + self.plain(text[at:])

    def _checked_whole(self, messages: list[dict], render) -> list[int]:
        for i, m in enumerate(messages):
            hit = next((c for c in self.control.values() if c and c in m["content"]), None)
            if hit is not None:
                raise APIError(400, f"messages[{i}].content: holds the control token {hit!r}, which this model's chat "
                                    "template cannot keep as plain text; remove it (or serve with --allow-special-tokens)",
                               param=f"messages[{i}].content", code="invalid_value")
        return self.tokenizer.encode(render(messages), add_special_tokens=not has_chat_template(self.tokenizer))

    def render(self, messages: list[dict], template_kwargs: dict | None = None, think: bool = True) -> str:
        try:
            return self.fmt.chat_prompt(messages, self.tokenizer, template_kwargs=template_kwargs, think=think)
        except Exception as e:  # noqa: BLE001  (a chat template may refuse a conversation: roles must alternate...)
            raise APIError(400, f"messages: the model's chat template rejected them ({e})", param="messages",
                           code="invalid_value") from None
