"""Think formats: where thinking starts and ends, and how prompts and traces are rendered.

    fmt = get_format("s1")
    text = fmt.prompt(problem.prompt)             # base model: the prompt, then the opening delimiter
    text = fmt.chat_prompt(messages, tokenizer)   # chat model: its chat template, then the opening delimiter
    target = fmt.completion(trace.thinking, trace.answer)   # what a model should write after the prompt
    thinking, answer = fmt.split(completion_text)

| format   | opens thinking        | closes thinking           | answer prefix |
| tinyzero | `<think>`             | `</think>`                | (none)        |
| s1       | `<|im_start|>think\n` | `\n<|im_start|>answer\n`  | `Answer: `    |
| r1       | `<think>\n`           | `</think>`                | `\n\n`        |

The answer prefix is what the format writes between the closing delimiter and the answer in training
traces; a budget's `answer_prefix` is separate and appended only after a *forced* end of thinking.
"""

from dataclasses import dataclass

from budgetthink.errors import UserError


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

    def chat_prompt(self, messages: list[dict], tokenizer=None, budget: int | None = None) -> str:
        """A chat prompt through the tokenizer's chat template (plain `User:/Assistant:` lines without one)."""
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant: "
        return self.prompt(text, budget)

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
