"""`budgetthink export verl`: veRL's parquet schema read back, and reward.py loaded the way veRL loads it."""

import importlib.util
import json
import os
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from budgetthink.errors import UserError
from budgetthink.integrations.verl import export_verl
from budgetthink.tasks import Problem, get_task

TINYZERO_START = "A conversation between User and Assistant."


def load_reward(path):
    """As veRL's loader does (verl.utils.import_utils.load_module): a spec from the file, then exec."""
    spec = importlib.util.spec_from_file_location(f"custom_module_{hash(os.path.abspath(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.compute_score


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("verl")
    manifest = export_verl("countdown", n_train=12, n_test=4, out=out, seed=3)
    return out, manifest


def test_parquet_schema_and_rows(exported):
    out, manifest = exported
    assert manifest["task_options"] == {"template": "base"} and (manifest["n_train"], manifest["n_test"]) == (12, 4)
    train, test = pq.read_table(out / "train.parquet"), pq.read_table(out / "test.parquet")
    assert train.num_rows == 12 and test.num_rows == 4
    for table in (train, test):
        s = table.schema
        assert s.names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
        assert s.field("data_source").type == pa.string() and s.field("ability").type == pa.string()
        assert s.field("prompt").type == pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
        rm = s.field("reward_model").type
        assert rm.field("style").type == pa.string()
        gt = rm.field("ground_truth").type
        assert gt.field("target").type == pa.int64() and gt.field("numbers").type == pa.list_(pa.int64())
        assert {f.name for f in s.field("extra_info").type} == {"split", "index", "id", "problem"}

    # the rows are the task's own problems, in order, with TinyZero's prompt and ground truth
    expected = get_task("countdown", template="base").generate(12 + 8, 3)[:12]
    rows = train.to_pylist()
    for i, (row, p) in enumerate(zip(rows, expected)):
        assert row["data_source"] == "countdown" and row["ability"] == "math"
        assert row["prompt"] == [{"role": "user", "content": p.prompt + "<think>"}]
        assert row["prompt"][0]["content"].startswith(TINYZERO_START)
        assert row["reward_model"] == {"style": "rule", "ground_truth": p.answer}
        assert row["extra_info"]["split"] == "train" and row["extra_info"]["index"] == i
        assert Problem.from_dict(json.loads(row["extra_info"]["problem"])) == p
    test_rows = test.to_pylist()
    assert [r["extra_info"]["index"] for r in test_rows] == [0, 1, 2, 3]
    assert {r["extra_info"]["split"] for r in test_rows} == {"test"}
    assert not {r["prompt"][0]["content"] for r in test_rows} & {r["prompt"][0]["content"] for r in rows}


def test_reward_module_scores_as_the_project_scorer(exported):
    out, _ = exported
    compute_score = load_reward(str(out / "reward.py"))
    task = get_task("countdown", template="base")
    checked = 0
    for row in pq.read_table(out / "test.parquet").to_pylist():
        problem = Problem.from_dict(json.loads(row["extra_info"]["problem"]))
        trace = task.solve(problem)
        gt = row["reward_model"]["ground_truth"]
        # pandas-based readers hand over numpy arrays; both forms must score the same
        gt_numpy = {"target": np.int64(gt["target"]), "numbers": np.array(gt["numbers"])}
        for completion, expected in ((trace.thinking + "</think>" + trace.answer, 1.0),
                                     ("I guess</think><answer>1 + 2</answer>", 0.1),
                                     ("no answer at all", 0.0)):
            ours = task.score(problem, completion).reward
            assert ours == expected
            assert compute_score(row["data_source"], completion, gt, row["extra_info"]) == ours
            assert compute_score(row["data_source"], completion, gt_numpy, None) == ours
            checked += 1
    assert checked == 12


def test_run_scripts(exported):
    out, _ = exported
    for name, must in (("run_ppo.sh", ["algorithm.adv_estimator=gae", "critic.optim.lr=1e-5",
                                       "algorithm.use_kl_in_reward=True", "actor_rollout_ref.rollout.n=1"]),
                       ("run_grpo.sh", ["algorithm.adv_estimator=grpo", "actor_rollout_ref.actor.kl_loss_coef=0.001",
                                        "kl_loss_type=low_var_kl"])):
        path = out / name
        assert os.access(path, os.X_OK)
        subprocess.run(["bash", "-n", str(path)], check=True)
        text = path.read_text()
        for part in must + ["custom_reward_function.path=\"$HERE/reward.py\"", "custom_reward_function.name=compute_score",
                            "data.train_batch_size=256", "data.max_prompt_length=256", "data.max_response_length=1024",
                            "actor_rollout_ref.actor.optim.lr=1e-6", "actor_rollout_ref.actor.ppo_mini_batch_size=64",
                            "actor_rollout_ref.actor.entropy_coeff=0.001", "gpu_memory_utilization=0.4",
                            "trainer.total_epochs=15", "trainer.test_freq=100", "trainer.save_freq=100"]:
            assert part in text, (name, part)


def test_pass_through_chat_template_keeps_the_prompt(exported):
    """The template the scripts give veRL renders the exported prompt unchanged."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    out, _ = exported
    template = next(line.split("'", 1)[1].rsplit("'", 1)[0] for line in (out / "run_ppo.sh").read_text().splitlines()
                    if line.startswith("PASS_THROUGH="))
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    messages = pq.read_table(out / "train.parquet").to_pylist()[0]["prompt"]
    text = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    assert text == messages[0]["content"]


def test_multiply_and_bad_sizes(tmp_path):
    export_verl("multiply", n_train=5, n_test=2, out=tmp_path, seed=0)
    table = pq.read_table(tmp_path / "train.parquet")
    assert table.schema.field("reward_model").type.field("ground_truth").type == pa.int64()
    compute_score = load_reward(str(tmp_path / "reward.py"))
    row = table.to_pylist()[0]
    answer = row["reward_model"]["ground_truth"]
    assert compute_score("multiply", f"<answer>{answer}</answer>", np.int64(answer), row["extra_info"]) == 1.0
    with pytest.raises(UserError, match="at least 1"):
        export_verl("countdown", n_train=0, n_test=2, out=tmp_path, seed=0)
