"""Sample scored completions from a model on a task's problems, with budget forcing.

    budgetthink generate --model runs/tiny --task countdown --n 8 --seed 0 --max-thinking-tokens 64 [--json]
    budgetthink generate --model models/smollm2-135m --prompt auto --max-thinking-tokens 64

`--n` problems are drawn from the task with `--seed` (the same problems `budgetthink data generate` writes),
each prompt is rendered in the think format (`--format`, default tinyzero) through `Prompter` (`--prompt`:
`auto` uses the model's chat template when it has one, as every command does) and sampled `--samples` times
(default 1) with the torch engine; every completion is scored by the task. Without `--json` a readable view
goes to stdout (thinking, answer, reward, counts, then a summary); with `--json` one JSON object per line per
sample: the problem id, the rendered prompt (`prompt`), every Completion field (`text`, `thinking`, `answer`,
`token_ids` of everything after the prompt, inserted tokens included, `logprobs`, `sampled`, `finish_reason`,
`thinking_tokens`, `answer_tokens`, `extensions`, `meta`), and the score (`reward`, `correct`, `formatted`,
`extracted`).
"""

import json
import sys
from dataclasses import asdict

from budgetthink.engine import Budget, Sampling, load_engine
from budgetthink.formats import Prompter, get_format
from budgetthink.tasks import get_task


def run(model, task: str, n: int, seed: int, budget: Budget | None, sampling: Sampling, fmt: str = "tinyzero",
        json_out: bool = False, task_options: dict | None = None, samples: int = 1, engine=None,
        prompt: str = "auto", device: str | None = None, dtype: str | None = None) -> list[dict]:
    """Generate, score and print; returns the records (one per sample, prompt-major).

    model: a model directory (or a loaded engine via `engine`); sampling.seed defaults to `seed`.
    """
    from budgetthink.errors import UserError

    if n < 1 or samples < 1:
        raise UserError(f"--n and --samples must be >= 1, got {n} and {samples}")
    think = get_format(fmt)
    the_task = get_task(task, **(task_options or {}))
    problems = the_task.generate(n, seed)
    if sampling.seed is None:
        sampling = sampling.model_copy(update={"seed": seed})
    engine = engine or load_engine(model, backend="torch", device=device, dtype=dtype)
    context = getattr(engine, "context", None)
    if context is not None and sampling.max_tokens >= context:
        raise UserError(f"--max-tokens {sampling.max_tokens} cannot be reached: the model's context is {context} "
                        "tokens, prompt included; lower it")
    prompter = Prompter(think, engine.tokenizer, prompt)
    if budget is not None:
        prompter.check_thinking()
    encoded = [prompter.encode(p.prompt) for p in problems]
    prompts = [text for text, _ in encoded]
    from rich.console import Console

    with Console(stderr=True).status(f"sampling {len(prompts)} x {samples} completions"):
        outs = engine.generate(prompts, sampling, n=samples, budget=budget, fmt=think,
                               prompt_ids=[ids for _, ids in encoded])
    records = []
    for i, o in enumerate(outs):
        problem = problems[o.prompt_index]
        score = the_task.score(problem, o.text)
        records.append({"problem_id": problem.id, "sample": i % samples, "prompt": prompts[o.prompt_index],
                        **{k: v for k, v in asdict(o).items() if k != "prompt_index"},
                        "reward": score.reward, "correct": score.correct, "formatted": score.formatted,
                        "extracted": score.extracted})
    if json_out:
        for r in records:
            sys.stdout.write(json.dumps(r, ensure_ascii=False) + "\n")
    else:
        show(records, think)
    return records


def show(records: list[dict], think) -> None:
    """A readable view of scored samples, then a summary line."""
    from rich.console import Console
    from rich.markup import escape
    from rich.panel import Panel

    console = Console()
    for r in records:
        mark = "[green]correct[/]" if r["correct"] else ("[yellow]wrong[/]" if r["formatted"] else "[red]no answer[/]")
        body = (f"[dim]{escape(r['prompt'])}[/]"
                f"[cyan]{escape(r['thinking'])}[/]"
                + (f"[bold]{escape(r['text'][len(r['thinking']):])}[/]" if len(r["text"]) > len(r["thinking"]) else ""))
        title = (f"{r['problem_id']} #{r['sample']}: {mark} reward {r['reward']:g} | thinking {r['thinking_tokens']} "
                 f"answer {r['answer_tokens']} tokens | {r['finish_reason']}"
                 + (f" | {r['extensions']} extension(s)" if r["extensions"] else ""))
        console.print(Panel(body, title=title, title_align="left"))
    k = len(records)
    console.print(f"{k} samples: accuracy {sum(r['correct'] for r in records) / k:.3f}, "
                  f"format {sum(r['formatted'] for r in records) / k:.3f}, "
                  f"mean reward {sum(r['reward'] for r in records) / k:.3f}, "
                  f"mean thinking tokens {sum(r['thinking_tokens'] for r in records) / k:.1f}")
