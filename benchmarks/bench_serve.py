"""Serving throughput: requests per second and p50/p99 latency at concurrency 1 and 16 against one server.

    python benchmarks/bench_serve.py [--model DIR | --preset test|small] [--requests 96] [--max-tokens 32]

The server (`budgetthink.serve.run`, torch engine) runs in a subprocess on 127.0.0.1; this process is the
client (httpx, asyncio). Every request is the same kind of /v1/completions call (temperature 1, no seed, so
the server may batch them); each concurrency level sends the same prompts after a short warm-up. The target
is >= 5x the throughput at 16 as at 1 (dynamic batching). Writes benchmarks/results/bench_serve.json: the
machine, the settings, each level's raw latencies and figures, and the ratio.
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

ROOT = Path(__file__).resolve().parent.parent


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile: the ceil(q/100 * N)-th smallest."""
    s = sorted(xs)
    return s[min(len(s), max(1, math.ceil(q / 100 * len(s)))) - 1]


async def level(url: str, model: str, concurrency: int, prompts: list[str], max_tokens: int) -> dict:
    """Send every prompt once with `concurrency` requests in flight; latencies and throughput."""
    sem = asyncio.Semaphore(concurrency)
    latencies, tokens, failures = [], [], 0
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(prompt):
            nonlocal failures
            async with sem:
                t0 = time.perf_counter()
                r = await client.post("/v1/completions", json={"model": model, "prompt": prompt,
                                                               "max_tokens": max_tokens, "temperature": 1.0})
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    failures += 1
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


def metrics_subset(text: str) -> dict:
    keep = ("budgetthink_batches_total", "budgetthink_batch_rows_total", "budgetthink_engine_seconds_total")
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.split(" ")[0] in keep}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: the tiny model of --preset, built if needed)")
    ap.add_argument("--preset", default="test", help="tiny preset when --model is not given: test or small")
    ap.add_argument("--requests", type=int, default=96, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    ap.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="the server's intra-op threads (OMP_NUM_THREADS); a tiny model gains nothing from more, "
                         "and on a busy machine more threads spin against other work")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_serve.json"))
    args = ap.parse_args()

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
        for c in (1, 16):
            results[c] = asyncio.run(level(url, args.model, c, prompts, args.max_tokens))
            r = results[c]
            print(f"concurrency {c:>2}: {r['requests_per_s']:.2f} req/s, p50 {r['p50_latency_s']:.3f} s, "
                  f"p99 {r['p99_latency_s']:.3f} s, {r['failures']} failures", file=sys.stderr)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)

    import torch

    ratio = results[16]["requests_per_s"] / results[1]["requests_per_s"]
    report = {
        "benchmark": "bench_serve",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count(),
                    "torch": torch.__version__,
                    "load_average_1m_before": load_before, "load_average_1m_after": os.getloadavg()[0]},
        "settings": {"model": args.model, "requests_per_level": len(prompts), "max_tokens": args.max_tokens,
                     "temperature": 1.0, "server_max_batch": args.max_batch, "engine": "torch",
                     "server_torch_threads": args.torch_threads,
                     "endpoint": "/v1/completions", "client": "httpx asyncio, same machine, separate process"},
        "concurrency_1": results[1],
        "concurrency_16": results[16],
        "ratio": {"throughput_16_over_1": ratio, "target": 5.0, "met": ratio >= 5.0},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"throughput_16_over_1": round(ratio, 2), **{f"c{c}": {k: round(results[c][k], 4) for k in (
        "requests_per_s", "p50_latency_s", "p99_latency_s")} for c in (1, 16)}}))


if __name__ == "__main__":
    main()
