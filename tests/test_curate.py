"""s1K-style curation: the selection's statistics, each filter stage, the funnel, determinism."""

import json
import math
import random
from collections import Counter

import pytest

from budgetthink.data.curate import curate, select
from budgetthink.data.distill import distill
from budgetthink.errors import UserError
from budgetthink.tasks import get_task


def _pool(sizes: dict[str, int], seed: int = 0):
    rng = random.Random(seed)
    return [(f"{d}-{i}", d, rng.randint(10, 10_000)) for d, m in sizes.items() for i in range(m)]


# ---- the selection ----------------------------------------------------------------------------------------
def test_every_domain_is_represented_when_n_reaches_the_domains():
    sizes = {"algebra": 40, "geometry": 3, "number": 1, "combinatorics": 25, "calculus": 2, "logic": 7, "prob": 12}
    items = _pool(sizes)
    for seed in range(30):
        for n in (len(sizes), len(sizes) + 5, 60):
            chosen = select(items, n, seed)
            assert len(chosen) == n and len(set(chosen)) == n
            domains = Counter(i.rsplit("-", 1)[0] for i in chosen)
            assert set(domains) == set(sizes), (seed, n, domains)
            # rounds: counts differ by at most one across domains that are not exhausted
            live = [domains[d] for d in sizes if sizes[d] > domains[d]]
            assert max(live) - min(live) <= 1


def test_draws_within_a_domain_follow_two_to_the_minus_rank():
    # One domain of 6 problems; the first draw has rank r (0 = longest) with p_r = 2^-r / sum_k 2^-k.
    m, trials = 6, 6000
    items = [(f"p{i}", "d", 100 * (m - i)) for i in range(m)]  # p0 longest ... p5 shortest
    counts = Counter(select(items, 1, seed)[0] for seed in range(trials))
    z = sum(2.0**-k for k in range(m))  # 1.96875
    for r in range(m):
        p = 2.0**-r / z
        sigma = math.sqrt(p * (1 - p) / trials)
        # tolerance: 4 binomial standard deviations (a false failure has probability < 1e-4 per rank)
        assert abs(counts[f"p{r}"] / trials - p) < 4 * sigma, (r, counts[f"p{r}"] / trials, p)
    # the second draw re-ranks what is left: given p0 was taken first, p1 is now rank 0
    pairs = [select(items, 2, seed) for seed in range(trials)]
    after_p0 = Counter(b for a, b in pairs if a == "p0")
    total = sum(after_p0.values())
    z2 = sum(2.0**-k for k in range(m - 1))
    for r, pid in enumerate(["p1", "p2", "p3", "p4", "p5"]):
        p = 2.0**-r / z2
        assert abs(after_p0[pid] / total - p) < 4 * math.sqrt(p * (1 - p) / total), (pid, after_p0[pid] / total, p)


def test_without_the_length_preference_draws_within_a_domain_are_uniform():
    m, trials = 6, 6000
    items = [(f"p{i}", "d", 100 * (m - i)) for i in range(m)]  # p0 longest ... p5 shortest
    counts = Counter(select(items, 1, seed, prefer_long=False)[0] for seed in range(trials))
    p = 1 / m  # every problem alike, the longest too (with the preference p0 would have 2^0 / 1.96875 = 0.51)
    for r in range(m):
        assert abs(counts[f"p{r}"] / trials - p) < 4 * math.sqrt(p * (1 - p) / trials), (r, counts[f"p{r}"] / trials)
    # the domains are still visited in rounds
    chosen = select(_pool({"a": 40, "b": 3, "c": 12}), 9, 0, prefer_long=False)
    assert Counter(i[0] for i in chosen) == {"a": 3, "b": 3, "c": 3}


def test_s1_draw_picks_domains_uniformly_and_keep_comes_first():
    items = _pool({"a": 3000, "b": 3000, "c": 3000})
    chosen = select(items, 3000, seed=1, draw="s1")
    share = Counter(i[0] for i in chosen)
    for d in "abc":  # 1000 expected each; binomial sigma ~ 25.8; tolerance 4 sigma
        assert abs(share[d] - 1000) < 4 * math.sqrt(3000 * (1 / 3) * (2 / 3)), share
    keep = {"a-5", "c-7"}
    chosen = select(items[:50] + [("c-7", "c", 1)], 10, seed=3, keep=keep)
    assert chosen[:2] == ["a-5", "c-7"] and len(chosen) == 10
    assert select(items, 50, 4) == select(items, 50, 4) != select(items, 50, 5)
    with pytest.raises(UserError):
        select(items, 5, 0, draw="bogus")


# ---- the stages --------------------------------------------------------------------------------------------
def _trace(i: int, prompt: str, thinking: str = "think think", answer: str = "<answer>1</answer>", **kw) -> dict:
    rec = {"id": f"q{i}", "task": "math", "problem": {"id": f"q{i}", "task": "math", "prompt": prompt,
           "answer": "1", "meta": {}}, "thinking": thinking, "answer": answer, "teacher": "test",
           "reward": 1.0, "correct": True, "thinking_tokens": None, "error": None}
    rec.update(kw)
    return rec


def test_quality_stage_counts_each_reason(tmp_path):
    lines = [json.dumps(_trace(i, f"question {i}")) for i in range(10)]
    lines += [json.dumps(_trace(10, "q", error="HTTP 400: refused")),
              json.dumps(_trace(11, "q", thinking="   ")),
              json.dumps(_trace(12, "q", thinking="a </think> b")),
              json.dumps(_trace(13, "q", thinking="x" * 500)),
              json.dumps(_trace(14, "q", correct=False)),
              json.dumps(_trace(3, "again")),  # a repeated id
              json.dumps({"id": "q15", "thinking": "no problem field"}),
              "{not json"]
    inp = tmp_path / "traces.jsonl"
    inp.write_text("\n".join(lines) + "\n" + json.dumps(_trace(16, "half"))[:30])  # + a crash's half line
    funnel = curate(inp, None, tmp_path / "sel.jsonl", require_correct=True, max_chars=200, domain_field="task")
    q = funnel["stages"][1]
    assert funnel["stages"][0]["count"] == 18  # 17 lines + 1 malformed; the half-written last line is not a line
    assert q["dropped"] == {"teacher_error": 1, "empty": 1, "broken_delimiters": 1, "too_long": 1, "wrong": 1,
                            "duplicate_id": 1, "malformed": 2}
    assert q["count"] == 10 and funnel["counts"] == [18, 10, 10, 10, 10]
    kept = [json.loads(x)["id"] for x in (tmp_path / "sel.jsonl").read_text().splitlines()]
    assert sorted(kept) == sorted(f"q{i}" for i in range(10))


def test_decontamination_catches_a_planted_duplicate(tmp_path):
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(500)]
    template = "Solve the following problem and put the final answer in a box please. "
    prompts = [template + " ".join(rng.choice(vocab) for _ in range(20)) for _ in range(40)]
    inp = tmp_path / "traces.jsonl"
    inp.write_text("".join(json.dumps(_trace(i, p)) + "\n" for i, p in enumerate(prompts)))
    planted = prompts[17].split(". ", 1)[1].split()
    # the evaluation set: unrelated problems in the same template, and one that embeds 8 words of problem 17,
    # re-cased and re-punctuated
    evals = [template + " ".join(rng.choice(vocab[250:]) + "x" for _ in range(20)) for _ in range(5)]
    evals.append("Other words first: " + ", ".join(w.upper() for w in planted[5:13]) + "! and more text.")
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"prompt": e}) + "\n" for e in evals))
    funnel = curate(inp, None, tmp_path / "sel.jsonl", decontaminate=[tmp_path / "eval.jsonl"], domain_field="task")
    stage = funnel["stages"][2]
    assert stage["stage"] == "decontamination" and stage["dropped_ids"] == ["q17"] and stage["count"] == 39
    assert stage["template_ngrams_ignored"] > 0  # the shared instruction alone flags nothing
    # seven shared words are not enough
    (tmp_path / "eval7.txt").write_text(" ".join(planted[5:12]) + "\n")
    funnel = curate(inp, None, tmp_path / "sel.jsonl", decontaminate=[tmp_path / "eval7.txt"], domain_field="task",
                    force=True)
    assert funnel["stages"][2]["dropped"] == 0


def test_countdown_end_to_end_is_deterministic_and_reports_its_funnel(tmp_path):
    task = get_task("countdown")
    traces = tmp_path / "traces.jsonl"
    distill("countdown", "solver", 150, traces, seed=0)
    test_problems = task.generate(150, seed=0)[:3]  # three pool problems leaked into an "evaluation set"
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(p.to_dict()) + "\n" for p in test_problems))
    kw = {"seed": 7, "decontaminate": [tmp_path / "eval.jsonl"], "max_chars": 2000}
    a = curate(traces, 30, tmp_path / "a" / "sel.jsonl", **kw)
    curate(traces, 30, tmp_path / "b" / "sel.jsonl", **kw)
    assert (tmp_path / "a" / "sel.jsonl").read_bytes() == (tmp_path / "b" / "sel.jsonl").read_bytes()
    assert a["counts"][:3] == [150, 150, 147] and a["counts"][-1] == 30
    assert json.loads((tmp_path / "a" / "funnel.json").read_text())["counts"] == a["counts"]
    assert (tmp_path / "a" / "curation.png").stat().st_size > 10_000
    sel = [json.loads(x) for x in (tmp_path / "a" / "sel.jsonl").read_text().splitlines()]
    assert not {r["id"] for r in sel} & {p.id for p in test_problems}
    div = a["stages"][-1]
    assert div["domains_selected"] == min(30, div["domains_in_pool"])
    assert all(r["curation"]["domain"].startswith("countdown:") for r in sel)
    c = curate(traces, 30, tmp_path / "c" / "sel.jsonl", seed=8)
    assert (tmp_path / "c" / "sel.jsonl").read_bytes() != (tmp_path / "a" / "sel.jsonl").read_bytes()
    assert c["stages"][2]["enabled"] is False


def test_clusters_and_bad_options(tmp_path):
    topics = {"geometry": "triangle circle angle radius", "algebra": "polynomial root equation variable",
              "counting": "ways choose arrange permutations"}
    recs, rng = [], random.Random(1)
    for words in topics.values():
        for _ in range(15):
            ws = words.split()
            recs.append(_trace(len(recs), " ".join(rng.choice(ws) for _ in range(12)), thinking="t" * rng.randint(5, 50)))
    inp = tmp_path / "t.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    funnel = curate(inp, 6, tmp_path / "sel.jsonl", clusters=3)
    sel = [json.loads(x) for x in (tmp_path / "sel.jsonl").read_text().splitlines()]
    # k-means recovers the three topics; two draws from each
    by_cluster = Counter(r["curation"]["domain"] for r in sel)
    assert funnel["stages"][-1]["domains_in_pool"] == 3 and sorted(by_cluster.values()) == [2, 2, 2]
    topic_of = {r["id"]: int(r["id"][1:]) // 15 for r in recs}
    assert len({topic_of[r["id"]] for r in sel}) == 3
    with pytest.raises(UserError, match="domain-field"):
        curate(inp, 6, tmp_path / "x.jsonl", domain_field="problem.meta.nothing")
    with pytest.raises(UserError):
        curate(inp, 0, tmp_path / "x.jsonl")


# ---- difficulty: a model that really solves some problems ------------------------------------------------
def _memorize(model_dir, prompts: list[str], targets: list[str], out, steps: int = 100) -> float:
    """A copy of the tiny model trained on prompt -> target until greedy decoding reproduces the targets.
    Returns the last loss (over target tokens only)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    seqs = [tok(p + t + tok.eos_token, add_special_tokens=False)["input_ids"] for p, t in zip(prompts, targets)]
    starts = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)  # [B, T]
    mask = torch.zeros(len(seqs), T, dtype=torch.long)  # [B, T]
    labels = torch.full((len(seqs), T), -100)  # [B, T]: loss on the target tokens only
    for i, (s, k) in enumerate(zip(seqs, starts)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, k:len(s)] = torch.tensor(s[k:])
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return loss.item()


def test_difficulty_drops_what_a_model_solves(tmp_path, tiny_model_dir, one_thread):
    from budgetthink.engine import Budget, Sampling, load_engine
    from budgetthink.formats import get_format

    task = get_task("countdown")
    fmt = get_format("tinyzero")
    problems = task.generate(40, seed=5)
    learnt = problems[:3]
    numbers = {tuple(sorted(p.answer["numbers"])) for p in learnt}
    others = [p for p in problems[3:] if tuple(sorted(p.answer["numbers"])) not in numbers][:5]
    pool = learnt + others
    # a model that certainly solves three of them: the test model, trained on their answers
    trained = tmp_path / "solves-three"
    loss = _memorize(tiny_model_dir, [fmt.prompt(p.prompt) for p in learnt],
                     [fmt.completion("", task.solve(p).answer) for p in learnt], trained)
    # the reference: each model answers each problem on its own (greedy, as the stage does), scored here
    solved = {}
    for model in (tiny_model_dir, trained):
        engine = load_engine(str(model))
        outs = engine.generate([fmt.prompt(p.prompt) for p in pool], Sampling(temperature=0.0, max_tokens=40), n=1,
                               budget=Budget(), fmt=fmt)
        solved[model] = {p.id for p, c in zip(pool, outs) if task.score(p, c.text).correct}
    assert {p.id for p in learnt} <= solved[trained], f"the trained model did not learn its answers (loss {loss})"

    traces = tmp_path / "traces.jsonl"
    distill("countdown", "solver", None, traces, problems_path=_problems_file(tmp_path, pool))
    funnel = curate(traces, None, tmp_path / "sel.jsonl", difficulty_models=[tiny_model_dir, trained],
                    difficulty_max_tokens=40)
    stage = funnel["stages"][3]
    assert stage["stage"] == "difficulty"
    # each model is asked what the earlier ones left; a problem any of them solves is dropped
    assert stage["solved_by"] == {str(tiny_model_dir): len(solved[tiny_model_dir]),
                                  str(trained): len(solved[trained] - solved[tiny_model_dir])}
    kept = {json.loads(x)["id"] for x in (tmp_path / "sel.jsonl").read_text().splitlines()}
    assert kept == {p.id for p in pool} - solved[tiny_model_dir] - solved[trained]
    assert stage["count"] == len(kept) <= 5


def _problems_file(tmp_path, problems):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in problems))
    return path
