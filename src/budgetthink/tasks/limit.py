"""A hard time limit on a verifier, from any thread or process: the call runs in a worker process.

    check = TimeLimited("budgetthink.tasks.math:equivalent_now", warmup=("1", "1"))
    check(5.0, gold, pred)        # the function's result, or raises Timeout once 5 s have passed

Why a process: math-verify bounds its work with `signal.alarm`, which only works in a process's main thread
(RL scores in threads, veRL in worker processes), and sympy can spend minutes inside a single C call
(`9^{9^{9^{9}}}` asks for a power with hundreds of millions of digits), which no signal interrupts.

The worker is a plain subprocess (`python -m budgetthink.tasks.limit TARGET WARMUP_JSON`), so it also starts
from daemonic processes, which may not fork children. It imports the target, runs it once on `warmup` (sympy
loads lazily) and says it is ready; then it reads one JSON request per line and answers one JSON line. In the
worker an interval timer interrupts Python-level work at the limit, and the worker lives on; a worker that
has still not answered shortly after (`GRACE`) is killed and replaced by a spare that has been starting
since the worker did (two processes, ~100 MB each with sympy), so the next call need not wait for an import. Starting a worker never counts against a call's limit. Arguments and
results must be JSON values.
"""

import atexit
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

GRACE = (0.02, 0.05)  # a worker silent past limit * (1 + 0.05) + 0.02 s is killed (the timer fires first)
STARTUP_TIMEOUT = 300.0  # seconds a new worker may take to import its target (a busy machine is slow)


class Timeout(Exception):
    """The call did not finish within its time limit."""


class _Interrupt(BaseException):
    """The worker's timer fired. A BaseException, so a verifier's `except Exception` cannot swallow it."""


class _Worker:
    def __init__(self, target: str, warmup: tuple):
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])  # the directory holding the budgetthink package
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "budgetthink.tasks.limit", target, json.dumps(warmup)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.buf, self.ready = b"", False

    def readline(self, deadline: float) -> bytes | None:
        """The worker's next line, or None if it did not come by `deadline` (or the worker died)."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def wait_ready(self) -> None:
        if not self.ready:
            line = self.readline(time.monotonic() + STARTUP_TIMEOUT)
            if line is None or json.loads(line) != {"ready": True}:
                self.kill()
                raise RuntimeError(f"the verifier worker did not start within {STARTUP_TIMEOUT:g} s "
                                   f"(its error, if any, is on stderr above)")
            self.ready = True

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


class TimeLimited:
    """Calls `module:function` in a worker process under a per-call wall-clock limit. Thread-safe (calls take
    turns; each gets its whole limit once its turn comes); a forked child starts its own worker."""

    def __init__(self, target: str, warmup: tuple = ()):
        self.target, self.warmup = target, tuple(warmup)
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.worker: _Worker | None = None
        self.spare: _Worker | None = None  # started with the worker, so that a killed one is replaced at once
        self.dead: list[_Worker] = []  # killed, not yet reaped
        self.kills = 0  # workers killed for running past a limit
        atexit.register(self.close)  # a worker stuck in a C call would outlive us otherwise

    def __call__(self, seconds: float, *args):
        with self.lock:
            if self.pid != os.getpid():  # forked: the pipes belong to the parent
                self.pid, self.worker, self.spare, self.dead = os.getpid(), None, None, []
            self.dead = [w for w in self.dead if w.proc.poll() is None]  # reap the killed
            if self.worker is None:  # the spare has been importing since the last one started
                self.worker, self.spare = self.spare or _Worker(self.target, self.warmup), None
            if self.spare is None:
                self.spare = _Worker(self.target, self.warmup)
            worker = self.worker
            worker.wait_ready()
            worker.proc.stdin.write((json.dumps({"seconds": seconds, "args": args}) + "\n").encode())
            worker.proc.stdin.flush()
            line = worker.readline(time.monotonic() + seconds * (1 + GRACE[1]) + GRACE[0])
            if line is None:  # stuck where the timer cannot reach (a C call), or dead: the spare takes over
                worker.proc.kill()
                self.dead.append(worker)
                self.worker, self.kills = None, self.kills + 1
                raise Timeout(f"{self.target} ran past {seconds:g} s")
            reply = json.loads(line)
            if "timeout" in reply:
                raise Timeout(f"{self.target} ran past {seconds:g} s")
            if "error" in reply:
                raise RuntimeError(f"{self.target} failed in its worker: {reply['error']}")
            return reply["result"]

    def close(self) -> None:
        with self.lock:
            for w in [self.worker, self.spare, *self.dead]:
                if w is not None:
                    w.kill()
            self.worker, self.spare, self.dead = None, None, []


def _serve(target: str, warmup: list) -> None:
    out = os.fdopen(os.dup(1), "w")  # the protocol's own channel: a stray print from the target goes to stderr
    os.dup2(2, 1)
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    fn(*warmup)

    def interrupt(signum, frame):
        raise _Interrupt

    signal.signal(signal.SIGALRM, interrupt)
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, max(float(request["seconds"]), 1e-3))
                reply = {"result": fn(*request["args"])}
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _Interrupt:
            reply = {"timeout": True}
        except Exception as e:  # noqa: BLE001 - reported to the caller, which raises it there
            reply = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    _serve(sys.argv[1], json.loads(sys.argv[2]))
