"""Counters, gauges and a latency histogram for GET /metrics (Prometheus' text format, written here without
prometheus_client)."""


LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics")


class Metrics:
    """Counters, gauges and a latency histogram, rendered in Prometheus' text exposition format."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}  # (route, status) -> count
        self.tokens = {"prompt": 0, "completion": 0, "reasoning": 0}
        self.batches = self.batch_rows = 0
        self.engine_seconds = 0.0
        self.buckets = [0] * len(LATENCY_BUCKETS)
        self.latency_sum, self.latency_count = 0.0, 0

    def observe(self, path: str, status: int, seconds: float):
        route = path if path in ROUTES else "other"
        self.requests[route, status] = self.requests.get((route, status), 0) + 1
        if route.startswith("/v1/") and route != "/v1/models":
            for i, le in enumerate(LATENCY_BUCKETS):
                self.buckets[i] += seconds <= le
            self.latency_sum += seconds
            self.latency_count += 1

    def render(self, queue_depth: int, running: int, rows: int) -> str:
        lines = ["# HELP budgetthink_requests_total HTTP requests by route and status code.",
                 "# TYPE budgetthink_requests_total counter"]
        lines += [f'budgetthink_requests_total{{route="{r}",status="{s}"}} {c}' for (r, s), c in sorted(self.requests.items())]
        for kind, v in self.tokens.items():
            lines += [f"# HELP budgetthink_{kind}_tokens_total {kind.capitalize()} tokens served.",
                      f"# TYPE budgetthink_{kind}_tokens_total counter", f"budgetthink_{kind}_tokens_total {v}"]
        lines += ["# HELP budgetthink_queue_depth Requests waiting for the engine.", "# TYPE budgetthink_queue_depth gauge",
                  f"budgetthink_queue_depth {queue_depth}",
                  "# HELP budgetthink_running_requests Requests in the engine's current batch.",
                  "# TYPE budgetthink_running_requests gauge", f"budgetthink_running_requests {running}",
                  "# HELP budgetthink_running_rows Rows (prompts x n) in the engine's current batch.",
                  "# TYPE budgetthink_running_rows gauge", f"budgetthink_running_rows {rows}",
                  "# HELP budgetthink_batches_total Engine calls (decoding steps of the continuous batch).", "# TYPE budgetthink_batches_total counter",
                  f"budgetthink_batches_total {self.batches}",
                  "# HELP budgetthink_batch_rows_total Rows (prompts x n) over all engine calls (steps).",
                  "# TYPE budgetthink_batch_rows_total counter", f"budgetthink_batch_rows_total {self.batch_rows}",
                  "# HELP budgetthink_engine_seconds_total Wall time spent in the engine.",
                  "# TYPE budgetthink_engine_seconds_total counter", f"budgetthink_engine_seconds_total {self.engine_seconds:.6f}",
                  "# HELP budgetthink_request_latency_seconds Completion request latency (to the last byte).",
                  "# TYPE budgetthink_request_latency_seconds histogram"]
        lines += [f'budgetthink_request_latency_seconds_bucket{{le="{le}"}} {c}' for le, c in zip(LATENCY_BUCKETS, self.buckets)]
        lines += [f'budgetthink_request_latency_seconds_bucket{{le="+Inf"}} {self.latency_count}',
                  f"budgetthink_request_latency_seconds_sum {self.latency_sum:.6f}",
                  f"budgetthink_request_latency_seconds_count {self.latency_count}"]
        return "\n".join(lines) + "\n"


