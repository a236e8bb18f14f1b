"""Think formats: where thinking starts and ends, and how prompts and traces are rendered.

    fmt = get_format("s1")
    text = fmt.prompt(problem.prompt)             # base model: the prompt, then the opening delimiter
    text = fmt.chat_prompt(messages, tokenizer)   # chat model: its chat template, then the opening delimiter
    prompter = Prompter(fmt, tokenizer, "auto")   # what every command uses: chat template if the model has one
    text, ids = prompter.encode(problem.prompt)
    target = fmt.completion(trace.thinking, trace.answer)   # what a model should write after the prompt
    thinking, answer = fmt.split(completion_text)

| format   | opens thinking        | closes thinking           | answer prefix |
| tinyzero | `<think>`             | `</think>`                | (none)        |
| s1       | `<|im_start|>think\n` | `\n<|im_start|>answer\n`  | `Answer: `    |
| r1       | `<think>\n`           | `</think>`                | `\n\n`        |

The answer prefix is what the format writes between the closing delimiter and the answer in training
traces; a budget's `answer_prefix` is separate and appended only after a *forced* end of thinking.

One prompt path for every command that prompts with a task (generate, eval, rl, sft, distill's model teacher,
curate's difficulty models): `Prompter`. The server renders its clients' messages with the same `chat_prompt`
(serve/prompts.py), and a raw completion prompt gets the opening delimiter as `raw` does. Its style `auto`
(the default everywhere) uses the model's chat template when its tokenizer has one, the task's prompt as the
user message and the opening delimiter at the start of the assistant turn; otherwise (the tiny model) the
raw prompt then the opening delimiter. `chat` insists on the template, `raw` never uses it (the flag
`--prompt raw`, the config key `prompt: raw`). Chat text already holds the template's control tokens, so it is
encoded without the tokenizer's additions (no second BOS); raw text is encoded as the tokenizer does.
"""

from dataclasses import dataclass, field
from typing import Any

from budgetthink.errors import UserError

PROMPT_STYLES = ("auto", "chat", "raw")


@dataclass(frozen=True)
class ThinkFormat:
    name: str
    think_open: str
    think_close: str
    answer_prefix: str
    budget_template: str  # how a thinking budget is stated in the prompt ({budget} is the token count)

    def prompt(self, prompt: str, budget: int | None = None) -> str:
        """A base-model prompt: the task's text (optionally stating a budget), then the opening delimiter."""
        return prompt + (self.budget_phrase(budget) if budget is not None else "") + self.think_open

    def chat_prompt(self, messages: list[dict], tokenizer=None, budget: int | None = None,
                    template_kwargs: dict | None = None, think: bool = True) -> str:
        """A chat prompt through the tokenizer's chat template (plain `User:/Assistant:` lines without one), then
        the opening delimiter (once: a template that opens thinking itself is not given a second one).
        A stated budget goes at the end of the last user message; `think=False` leaves thinking unopened
        (a plain answer); template_kwargs go to the template (e.g. {"enable_thinking": False})."""
        if budget is not None:
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            at = users[-1] if users else len(messages) - 1
            messages = [{**m, "content": m["content"] + self.budget_phrase(budget)} if i == at else m
                        for i, m in enumerate(messages)]
        if has_chat_template(tokenizer):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                 **(template_kwargs or {}))
        else:
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant: "
        return text.removesuffix(self.think_open) + self.think_open if think else text

    def budget_phrase(self, budget: int) -> str:
        return self.budget_template.format(budget=int(budget))

    def completion(self, thinking: str, answer: str) -> str:
        """The text a model should write after the prompt: thinking, closing delimiter, answer prefix, answer."""
        return thinking + self.think_close + self.answer_prefix + answer

    def split(self, text: str) -> tuple[str, str]:
        """(thinking, answer) of a completion; all thinking if it never closed."""
        head, sep, tail = text.partition(self.think_close)
        if not sep:
            return text, ""
        tail = tail.removeprefix(self.answer_prefix)
        return head, tail

    def delimiters(self) -> list[str]:
        return [self.think_open, self.think_close]


def has_chat_template(tokenizer) -> bool:
    return bool(tokenizer is not None and getattr(tokenizer, "chat_template", None))


@dataclass(frozen=True)
class Prompter:
    """A task prompt -> the model's input text and ids, the same way in every command (see the docstring)."""

    fmt: ThinkFormat
    tokenizer: Any = field(repr=False)
    style: str = "auto"

    def __post_init__(self):
        if self.style not in PROMPT_STYLES:
            raise UserError(f"unknown prompt style {self.style!r}; use one of {', '.join(PROMPT_STYLES)}")
        if self.style == "chat" and not has_chat_template(self.tokenizer):
            raise UserError("prompt style 'chat' needs a chat template, and this model's tokenizer has none; "
                            "use --prompt raw (or auto)")

    @property
    def chat(self) -> bool:
        return self.style == "chat" or (self.style == "auto" and has_chat_template(self.tokenizer))

    def text(self, prompt: str, budget: int | None = None) -> str:
        """The input text for a task's prompt (optionally stating a thinking budget), ending in the opening delimiter."""
        if self.chat:
            return self.fmt.chat_prompt([{"role": "user", "content": prompt}], self.tokenizer, budget=budget)
        return self.fmt.prompt(prompt, budget)

    def ids(self, text: str) -> list[int]:
        """Token ids of a text from `text`: chat text carries its own control tokens (no BOS added twice)."""
        return self.tokenizer.encode(text, add_special_tokens=not self.chat)

    def encode(self, prompt: str, budget: int | None = None) -> tuple[str, list[int]]:
        text = self.text(prompt, budget)
        return text, self.ids(text)

    def check_thinking(self) -> None:
        """A UserError when the chat template closes thinking itself (budget forcing would have nothing to force)."""
        if not self.chat:
            return
        mark = "\ue000"  # a private-use character no template rewrites: the user message's content
        text = self.fmt.chat_prompt([{"role": "user", "content": mark}], self.tokenizer, think=False)
        if self.fmt.think_close in text.partition(mark)[2]:
            raise UserError(f"this model's chat template closes thinking itself ({self.fmt.think_close!r} follows "
                            "the user message), so a thinking budget has no place; drop the budget flags or use "
                            "--prompt raw")


FORMATS = {
    "tinyzero": ThinkFormat("tinyzero", "<think>", "</think>", "", "[budget {budget}]"),
    "s1": ThinkFormat("s1", "<|im_start|>think\n", "\n<|im_start|>answer\n", "Answer: ",
                      "Think for at most {budget} tokens.\n"),
    "r1": ThinkFormat("r1", "<think>\n", "</think>", "\n\n", "Think for at most {budget} tokens.\n"),
}


def get_format(name: str) -> ThinkFormat:
    if name not in FORMATS:
        raise UserError(f"unknown think format {name!r}; known formats: {', '.join(FORMATS)}")
    return FORMATS[name]
