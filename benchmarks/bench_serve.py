"""Serving throughput: requests per second and p50/p99 latency at concurrency 1 and 16 against one server,
for an identical and a mixed workload.

    python benchmarks/bench_serve.py [--model DIR | --preset test|small] [--requests 96] [--mixed 500] [--max-tokens 32]

The server (`budgetthink.serve.run`, torch engine, continuous batching) runs in a subprocess on 127.0.0.1; this
process is the client (httpx, asyncio). Identical workload: the same kind of /v1/completions call every time
(temperature 1, `--max-tokens`), at concurrency 1 and 16. Mixed workload, at 16: every request differs from its
neighbours in temperature (0 / 0.7 / 1), max_tokens (8 to `--max-tokens`), thinking budget (none, a cap, a
floor with an extension), n (1 or 2), streaming (one in four) and endpoint (chat or completions). Its mixed
requests are shorter on average than the identical ones, and at this size a request's fixed costs (HTTP,
tokenising, admission) weigh as much as its tokens, so a third level holds the work equal: identical requests,
as many as the mixed ones, with max_tokens set to the mixed requests' mean completion length. The mixed
workload's throughput target is judged against that level (the cost of mixing alone); its shares of the
plain identical level are recorded too. Writes
benchmarks/results/bench_serve.json: the machine, the settings, each level's raw latencies and figures, and a
`summary` with each target beside its figure, as the entry `--shape` of the file (the other shapes' kept).
"""

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from paths import cpu_flags, record

ROOT = Path(__file__).resolve().parent.parent


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile: the ceil(q/100 * N)-th smallest."""
    s = sorted(xs)
    return s[min(len(s), max(1, math.ceil(q / 100 * len(s)))) - 1]


def identical(model: str, prompt: str, i: int, max_tokens: int) -> tuple[str, dict]:
    return "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0}


def mixed(model: str, prompt: str, i: int, max_tokens: int) -> tuple[str, dict]:
    """Request i of the mixed workload: its own sampling, length, budget, n, streaming and endpoint."""
    body = {"model": model, "max_tokens": 8 + i * 7 % (max_tokens - 7), "temperature": [0.0, 0.7, 1.0][i % 3],
            "n": 1 + (i % 5 == 0), "stream": i % 4 == 0}
    body.update([{}, {"max_thinking_tokens": 6}, {"min_thinking_tokens": 4, "thinking_extensions": 1}][i % 3 - 1])
    if i % 2:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**body, "prompt": prompt}


async def level(url: str, model: str, concurrency: int, prompts: list[str], max_tokens: int, make=identical) -> dict:
    """Send every prompt once with `concurrency` requests in flight; latencies and throughput."""
    sem = asyncio.Semaphore(concurrency)
    latencies, tokens, failures = [], [], 0
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(prompt):
            nonlocal failures
            async with sem:
                route, body = make(model, prompt, prompts.index(prompt), max_tokens)
                if body.get("stream"):
                    body["stream_options"] = {"include_usage": True}
                t0 = time.perf_counter()
                r = await client.post(route, json=body)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200 or (body.get("stream") and not r.text.rstrip().endswith("data: [DONE]")):
                    failures += 1
                elif body.get("stream"):
                    usage = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")][-1]["usage"]
                    tokens.append(usage["completion_tokens"])
                else:
                    tokens.append(r.json()["usage"]["completion_tokens"])

        t0 = time.perf_counter()
        await asyncio.gather(*[one(p) for p in prompts])
        wall = time.perf_counter() - t0
        metrics = (await client.get("/metrics")).text
    return {"concurrency": concurrency, "requests": len(prompts), "failures": failures, "wall_s": wall,
            "requests_per_s": len(prompts) / wall, "completion_tokens_per_s": sum(tokens) / wall,
            "mean_completion_tokens": statistics.mean(tokens) if tokens else 0.0,
            "p50_latency_s": percentile(latencies, 50), "p99_latency_s": percentile(latencies, 99),
            "latencies_s": [round(x, 5) for x in latencies], "metrics_after": metrics_subset(metrics)}


def summary_of(results: dict, ratio: float, args) -> dict:
    """Each target beside its figure. Mixed requests differ in length, so throughput compares tokens per second,
    against identical requests of the same mean length (and, recorded beside it, against the plain level)."""
    m, same, matched = results["mixed"], results[16], results["matched"]
    share = m["completion_tokens_per_s"] / matched["completion_tokens_per_s"]
    req_share = m["requests_per_s"] / same["requests_per_s"]
    tail = m["p99_latency_s"] / m["p50_latency_s"]
    return {
        "identical": {"throughput_16_over_1": ratio, "target": 8.0, "met": ratio >= 8.0,
                      **{f"c{c}_{k}": results[c][k] for c in (1, 16) for k in ("p50_latency_s", "p99_latency_s")}},
        "mixed": {"tokens_per_s_share_of_matched_identical": share,
                  "matched_identical_mean_tokens": matched["mean_completion_tokens"],
                  "mixed_mean_tokens": m["mean_completion_tokens"],
                  "tokens_per_s_share_of_identical": m["completion_tokens_per_s"] / same["completion_tokens_per_s"],
                  "requests_per_s_share_of_identical": req_share, "target_share": 0.8, "share_met": share >= 0.8,
                  "p99_over_p50": tail, "target_tail": 3.0, "tail_met": tail <= 3.0, "requests": m["requests"],
                  "failures": m["failures"], "failures_met": m["failures"] == 0 and m["requests"] >= 500}}


def show(name, r: dict) -> None:
    print(f"{name} at concurrency {r['concurrency']:>2}: {r['requests_per_s']:.2f} req/s, "
          f"{r['completion_tokens_per_s']:.0f} tok/s, p50 {r['p50_latency_s']:.3f} s, "
          f"p99 {r['p99_latency_s']:.3f} s, {r['failures']} failures", file=sys.stderr)


def metrics_subset(text: str) -> dict:
    keep = ("budgetthink_batches_total", "budgetthink_batch_rows_total", "budgetthink_engine_seconds_total")
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.split(" ")[0] in keep}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: the tiny model of --preset, built if needed)")
    ap.add_argument("--preset", default="test", help="tiny preset when --model is not given: test or small")
    ap.add_argument("--requests", type=int, default=96, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    ap.add_argument("--mixed", type=int, default=500, help="requests of the mixed workload (at concurrency 16)")
    ap.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="the server's intra-op threads (OMP_NUM_THREADS); a tiny model gains nothing from more, "
                         "and on a busy machine more threads spin against other work")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_serve.json"))
    ap.add_argument("--shape", default=None, help="the JSON entry (default: tiny-PRESET, or the model folder's name)")
    args = ap.parse_args()
    args.model_given = args.model
    if args.model is None:
        from budgetthink import tiny

        args.model = str(tiny.cached_build(args.preset, ROOT / ".cache" / "tests", progress=True))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    load_before = os.getloadavg()[0]  # other work on the machine skews the figures: recorded beside them
    code = (f"from budgetthink.serve import run; run({args.model!r}, '127.0.0.1', {port}, "
            f"max_batch={args.max_batch}, max_queue=1024)")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.torch_threads)}
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                if server.poll() is not None or time.time() > deadline:
                    sys.exit("the server did not start")
                time.sleep(0.2)
        prompts = [f"{10 + i % 90}*{3 + i // 90}=" for i in range(args.requests)]  # distinct short prompts
        asyncio.run(level(url, args.model, 4, prompts[:8], args.max_tokens))  # warm-up
        results = {}
        many = [f"{10 + i % 90}*{3 + i // 90}=" for i in range(args.mixed)]
        for name, c, ps, make in ((1, 1, prompts, identical), (16, 16, prompts, identical),
                                  ("mixed", 16, many, mixed)):
            results[name] = asyncio.run(level(url, args.model, c, ps, args.max_tokens, make))
            r = results[name]
            show(name, r)
        matched_tokens = max(1, round(results["mixed"]["mean_completion_tokens"]))
        results["matched"] = asyncio.run(level(url, args.model, 16, many, matched_tokens))
        show(f"identical at {matched_tokens} tokens", results["matched"])
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)

    import torch

    ratio = results[16]["requests_per_s"] / results[1]["requests_per_s"]
    report = {
        "benchmark": "bench_serve",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count(),
                    "cpu_flags": cpu_flags(), "torch": torch.__version__,
                    "load_average_1m_before": load_before, "load_average_1m_after": os.getloadavg()[0]},
        "settings": {"model": os.path.relpath(args.model, ROOT) if args.model.startswith(str(ROOT)) else args.model, "requests_per_level": len(prompts), "max_tokens": args.max_tokens,
                     "temperature": 1.0, "server_max_batch": args.max_batch, "engine": "torch",
                     "server_torch_threads": args.torch_threads,
                     "endpoint": "/v1/completions", "client": "httpx asyncio, same machine, separate process"},
        "concurrency_1": results[1],
        "concurrency_16": results[16],
        "mixed_16": results["mixed"],
        "identical_16_matched_length": results["matched"],
    }
    report["command"] = "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:])
    shape = args.shape or ("tiny-" + args.preset if args.model_given is None else Path(args.model).name)
    record(Path(args.out), shape, report, summary_of(results, ratio, args))
    print(json.dumps({"throughput_16_over_1": round(ratio, 2), **{f"c{c}": {k: round(results[c][k], 4) for k in (
        "requests_per_s", "p50_latency_s", "p99_latency_s")} for c in (1, 16)}}))


if __name__ == "__main__":
    main()
