"""The `budgetthink` command: one sub-command per stage, no logic (each stage lives in its own module).

    budgetthink --help
"""

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from budgetthink import __version__
from budgetthink.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Reasoning models for tens of dollars: distil, force, reinforce, measure, serve, and bill.")
data_app = typer.Typer(no_args_is_help=True, help="Problem files: generate and score.")
export_app = typer.Typer(no_args_is_help=True, help="Hand a task off to other trainers.")
app.add_typer(data_app, name="data")
app.add_typer(export_app, name="export")
DEBUG = False


def _version(value: bool):
    if value:
        print(f"budgetthink {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
):
    global DEBUG
    DEBUG = debug


# --- shared options -------------------------------------------------------------------------------------
Out = Annotated[Path, typer.Option("--out", help="Output directory (or file).")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]
TaskOpt = Annotated[str, typer.Option("--task", help="Task: countdown, multiply or math.")]
TaskOptions = Annotated[Optional[list[str]], typer.Argument(help="Task options key=value, e.g. num_numbers=4 split=test.")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="Config overrides key=value (dotted keys nest).")]
MaxThink = Annotated[Optional[int], typer.Option("--max-thinking-tokens", help="Force the end of thinking after this many sampled tokens.")]
MinThink = Annotated[int, typer.Option("--min-thinking-tokens", help="Suppress the end of thinking until this many sampled tokens.")]
Extensions = Annotated[int, typer.Option("--extensions", help="Ignore the end of thinking N times, appending the extension string.")]
ExtString = Annotated[str, typer.Option("--extension-string", help="Appended when an end of thinking is suppressed.")]
AnsPrefix = Annotated[str, typer.Option("--answer-prefix", help="Appended after a forced end of thinking.")]
MaxAnswer = Annotated[int, typer.Option("--max-answer-tokens", help="Cap on answer tokens after thinking.")]
Format = Annotated[str, typer.Option("--format", help="Think format: tinyzero, s1 or r1.")]


def _options(items: list[str] | None) -> dict:
    from budgetthink.data.problems import parse_options

    return parse_options(items or [])


def _print_json(obj) -> None:
    import json

    print(json.dumps(obj))


def _budget(max_thinking_tokens, min_thinking_tokens, extensions, extension_string, answer_prefix, max_answer_tokens):
    from pydantic import ValidationError

    from budgetthink.config import explain
    from budgetthink.engine import Budget

    try:
        return Budget(max_thinking_tokens=max_thinking_tokens, min_thinking_tokens=min_thinking_tokens,
                      extensions=extensions, extension_string=extension_string, answer_prefix=answer_prefix,
                      max_answer_tokens=max_answer_tokens)
    except ValidationError as e:
        raise explain(Budget, e, "budget flags") from None


# --- stages ---------------------------------------------------------------------------------------------
@app.command()
def tiny(out: Out, preset: Annotated[str, typer.Option(help="test (< 1M params, seconds) or small (the demo's model).")] = "small",
         seed: Seed = 0):
    """Build and pretrain the tiny default model."""
    from budgetthink.tiny import build

    build(out, preset=preset, seed=seed)


@data_app.command("generate")
def data_generate(task: TaskOpt, n: Annotated[int, typer.Option(help="Number of problems.")], out: Out,
                  seed: Seed = 0, options: TaskOptions = None):
    """Write N problems of a task as JSONL (task options as key=value, e.g. num_numbers=4 split=test)."""
    from budgetthink.data import problems

    _print_json(problems.generate(task, n, seed, out, _options(options)))


@data_app.command("score")
def data_score(task: TaskOpt, inp: Annotated[Path, typer.Option("--in", help="JSONL of problem fields plus `completion`.")],
               out: Annotated[Optional[Path], typer.Option("--out", help="Write scored lines here.")] = None,
               skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip malformed lines (and count them).")] = False,
               options: TaskOptions = None):
    """Score completions: prints mean reward, accuracy and format rate."""
    from budgetthink.data import problems

    _print_json(problems.score(task, inp, out, skip_bad, _options(options)))


@app.command()
def cost(run_dirs: Annotated[list[Path], typer.Argument(help="Run directories holding ledger.jsonl files.")],
         as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
         prices: Annotated[Optional[Path], typer.Option(help="YAML price table overriding the defaults.")] = None):
    """The bill: every stage's cost, priced and unpriced lines, and what it leaves out."""
    from budgetthink import ledger

    ledger.cost(run_dirs, as_json=as_json, prices=prices)


@app.command()
def estimate(recipe: Annotated[Path, typer.Option(help="Recipe YAML (sft or rl).")],
             gpu: Annotated[str, typer.Option(help="GPU kind from the price table, e.g. h100.")] = "h100",
             gpus: Annotated[int, typer.Option(help="Number of GPUs.")] = 1,
             mfu: Annotated[float, typer.Option(help="Model FLOPs utilisation assumed for training.")] = 0.4,
             gen_mfu: Annotated[Optional[float], typer.Option(help="Utilisation assumed for generation.")] = None,
             tokens: Annotated[Optional[float], typer.Option(help="Override: tokens trained.")] = None,
             gen_tokens: Annotated[Optional[float], typer.Option(help="Override: tokens generated.")] = None,
             params: Annotated[Optional[float], typer.Option(help="Override: model parameters.")] = None,
             prices: Annotated[Optional[Path], typer.Option(help="YAML price table overriding the defaults.")] = None,
             as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False):
    """Project wall time, GPU-hours and dollars for a recipe at full scale."""
    from budgetthink import ledger

    ledger.estimate(recipe, gpu=gpu, gpus=gpus, mfu=mfu, tokens=tokens, gen_tokens=gen_tokens, params=params,
                    gen_mfu=gen_mfu, prices=prices, as_json=as_json)


@export_app.command("verl")
def export_verl(task: TaskOpt, out: Out,
                n_train: Annotated[int, typer.Option("--n-train", help="Training problems.")] = 10000,
                n_test: Annotated[int, typer.Option("--n-test", help="Test problems.")] = 1024,
                seed: Seed = 0, format: Format = "tinyzero", options: TaskOptions = None):
    """Write veRL's parquet files, a reward module and launch scripts with TinyZero's hyper-parameters."""
    from budgetthink.integrations.verl import export_verl as export

    _print_json(export(task, n_train, n_test, out, seed=seed, task_options=_options(options), format=format))


def main():
    try:
        app()
    except UserError as e:
        if DEBUG:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
