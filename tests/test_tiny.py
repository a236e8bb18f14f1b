"""The embedded default model: an ordinary model directory, an exact tokenizer, a reported greedy check,
a corpus that is what its settings say, and builds that are deterministic per seed."""

import hashlib
import json
import re
import string

import pytest

from budgetthink import tiny
from budgetthink.errors import UserError
from budgetthink.formats import get_format
from budgetthink.tasks import get_task
from budgetthink.tasks.arith import evaluate

PRINTABLE = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")  # what the tokenizer covers


@pytest.fixture(scope="session")
def report(tiny_model_dir) -> dict:
    return json.loads((tiny_model_dir / "build_report.json").read_text())


def test_model_directory_loads_through_auto_classes(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "build_report.json"):
        assert (tiny_model_dir / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == tiny.EOS_ID
    assert tok.pad_token_id == tiny.PAD_ID
    assert GenerationConfig.from_pretrained(tiny_model_dir).eos_token_id == tiny.EOS_ID
    assert model.config.vocab_size == len(tok)


@pytest.mark.parametrize("text", [
    PRINTABLE,
    "two  spaces, a trailing space \nand\n\nblank lines\n",
    "  leading spaces and a tab-free line ending in a newline\n",
    "punctuation after spaces: a , b . c ! d ? e 's f n't g ; h :",
    "9 7 5 -> 52\n<think>9+7=16 16+5=21<52\n9*5=45 45+7=52==52</think><answer>(9*5)+7</answer>",
    "<answer> (1 + 2) / 3 </answer>",
    "Wait<think></think>Wait",
])
def test_tokenizer_round_trip_through_auto_tokenizer(tiny_model_dir, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    # one token per character, one per tag
    tags = sum(text.count(t) for t in tiny.ADDED_TOKENS)
    assert len(ids) == len(text) - sum(len(t) * text.count(t) for t in tiny.ADDED_TOKENS) + tags


def test_every_printable_character_is_its_own_token(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in PRINTABLE]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(PRINTABLE)
    assert [tok.decode(i) for i in ids] == list(PRINTABLE)
    for t in tiny.ADDED_TOKENS:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1


def test_build_report_fields(report, tiny_model_dir):
    assert report["preset"] == "test" and report["seed"] == 0
    assert report["parameters"] < 1_000_000
    for key in ("steps", "tokens", "wall_s", "cpu_s", "tokens_per_s", "final_loss", "dtype"):
        assert key in report["train"], key
    check = report["check"]
    for key in ("problems", "format_rate", "accuracy", "mean_reward", "thinking_closed_rate", "wall_s"):
        assert key in check, key
    assert 0 <= check["accuracy"] <= check["format_rate"] <= 1
    assert report["train"]["final_loss"] < report["train"]["first_loss"]
    assert report["target"] is None and report["target_met"] is None  # targets are the `small` preset's
    weights = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert report["weights_sha256"] == weights


def test_test_preset_writes_the_answer_format(report):
    # the test model need not be good, but it must close its thinking and answer in the format sometimes
    assert report["check"]["format_rate"] > 0
    assert report["check"]["thinking_closed_rate"] > 0


def test_cached_build_reuses_the_directory(tiny_model_dir):
    before = (tiny_model_dir / "model.safetensors").stat().st_mtime_ns
    again = tiny.cached_build("test", tiny_model_dir.parent)
    assert again == tiny_model_dir
    assert (again / "model.safetensors").stat().st_mtime_ns == before


# ---- the corpus is what its settings say --------------------------------------------------------------------

def _corpus(**update):
    s = tiny.Schedule(steps=10, batch_size=4, lr=1e-3, warmup_steps=1, train_problems=40, arith_share=0.0,
                      empty_share=0.0, wait_share=0.0).model_copy(update=update)
    return tiny.build_corpus(seed=3, s=s)


def _solver_doc(task, fmt, problem):
    trace = task.solve(problem)
    return fmt.prompt(problem.prompt) + fmt.completion(trace.thinking, trace.answer)


def _problem(task, doc):
    head = doc.split("\n", 1)[0]  # "3 5 7 -> 22"
    nums, target = head.split(" -> ")
    return task.make([int(n) for n in nums.split()], int(target))


def test_never_giving_up_gives_the_solver_traces():
    task, fmt = get_task("countdown", template="compact"), get_format("tinyzero")
    docs, stats = _corpus(give_up=[0.0])
    assert stats["kinds"] == {"solved": 40, "give_up": 0, "empty": 0, "arithmetic": 0}
    for doc in docs:
        problem = _problem(task, doc)
        assert doc == _solver_doc(task, fmt, problem)
        assert task.score(problem, doc[len(fmt.prompt(problem.prompt)):]).correct


def test_always_giving_up_stops_after_the_first_line_with_a_guess():
    task, fmt = get_task("countdown", template="compact"), get_format("tinyzero")
    docs, stats = _corpus(give_up=[1.0])
    for doc in docs:
        problem = _problem(task, doc)
        solver_thinking = task.solve(problem).thinking.split("\n")
        thinking, answer = fmt.split(doc[len(fmt.prompt(problem.prompt)):])
        if len(solver_thinking) == 2:  # found on the first line: nothing to give up on
            assert doc == _solver_doc(task, fmt, problem)
        else:
            assert thinking == solver_thinking[0]
            guess = answer.removeprefix("<answer>").removesuffix("</answer>")
            assert sorted(map(int, re.findall(r"\d+", guess))) == sorted(problem.answer["numbers"])
    assert stats["kinds"]["give_up"] > 0


def test_waiting_instead_of_giving_up_writes_the_extension_and_searches_on():
    task, fmt = get_task("countdown", template="compact"), get_format("tinyzero")
    docs, _ = _corpus(give_up=[1.0], wait_share=1.0)
    for doc in docs:
        problem = _problem(task, doc)
        trace = task.solve(problem)
        lines = trace.thinking.split("\n")
        expected = "Wait\n".join(lines[:-1]) + "\n" + lines[-1]  # "Wait" at every line end before the hit
        assert doc == fmt.prompt(problem.prompt) + fmt.completion(expected, trace.answer)


def test_corpus_mix_and_determinism():
    docs, stats = _corpus(arith_share=0.5, empty_share=0.5, steps=50)
    assert docs == _corpus(arith_share=0.5, empty_share=0.5, steps=50)[0]
    kinds = stats["kinds"]
    assert sum(kinds.values()) == len(docs) == 200
    assert 60 < kinds["arithmetic"] < 140 and kinds["empty"] > 20
    for doc in docs:
        if "->" not in doc:  # an arithmetic drill: every fact is true
            for fact in doc.split():
                parts = fact.split("=")
                assert len({evaluate(p) for p in parts}) == 1, fact


# ---- builds ----------------------------------------------------------------------------------------------

FAST = tiny.Schedule(steps=3, batch_size=4, lr=1e-3, warmup_steps=1, train_problems=30, eval_problems=2,
                     eval_max_tokens=8)


def test_builds_are_deterministic_per_seed(tmp_path):
    a = tiny.build(tmp_path / "a", "test", seed=1, schedule=FAST, progress=False)
    b = tiny.build(tmp_path / "b", "test", seed=1, schedule=FAST, progress=False)
    c = tiny.build(tmp_path / "c", "test", seed=2, schedule=FAST, progress=False)
    assert a["weights_sha256"] == b["weights_sha256"] != c["weights_sha256"]
    assert a["check"]["examples"] == b["check"]["examples"]


def test_build_replaces_an_earlier_build_and_refuses_other_directories(tmp_path):
    out = tmp_path / "model"
    tiny.build(out, "test", seed=1, schedule=FAST, progress=False)
    first = (out / "build_report.json").read_text()
    tiny.build(out, "test", seed=2, schedule=FAST, progress=False)
    assert (out / "build_report.json").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary directories left behind
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a tiny model build"):
        tiny.build(other, "test", schedule=FAST, progress=False)
    assert (other / "notes.txt").read_text() == "mine"


def test_unknown_preset_is_a_user_error():
    with pytest.raises(UserError, match="unknown tiny preset"):
        tiny.init_model("huge")
