"""JSONL and file I/O that loses nothing: line-atomic appends, crash-safe reads, atomic writes.

- `append_jsonl` writes each record as one `write()` of a whole line, then flushes and fsyncs, so a crash
  leaves at most one half-written last line.
- `read_jsonl` names file and line of a malformed record (or skips it with `skip_bad=True`), and always
  ignores a half-written *last* line with no newline (the mark of a crash), which `repair_jsonl` removes.
- `atomic_write_text` / `atomic_write_json` write to a temporary name and rename; files get the usual
  permissions (0644 under the common umask), not the temporary file's 0600.
- `fresh_output` refuses, before any work, to overwrite an existing output without `force`, or an input ever.
"""

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from budgetthink.errors import UserError

_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give a new file


def fresh_output(out: str | Path, force: bool = False, inputs=()) -> Path:
    """`out` as a Path, once it is safe to write: not one of `inputs`, not a directory, and not an existing file
    unless `force` (a UserError before anything is written otherwise)."""
    out = Path(out)
    if any(Path(i).resolve() == out.resolve() for i in inputs):
        raise UserError(f"--out {out} is also the input; write to another file (nothing was written)")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; name a file in it")
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to overwrite it, or choose another --out (nothing was written)")
    return out


def iter_jsonl(path: str | Path, skip_bad: bool = False, stats: dict | None = None) -> Iterator[dict]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file; check the path")
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    complete = data.endswith(b"\n")
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        last = i == len(lines)
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")  # noqa: TRY004 -- handled below like bad JSON
        except ValueError as e:
            if last and not complete:  # half-written by a crash: ignore, a rerun redoes it
                continue
            if skip_bad:
                if stats is not None:
                    stats["bad"] = stats.get("bad", 0) + 1
                continue
            raise UserError(f"{path}:{i}: malformed JSONL line ({e}); fix it or pass --skip-bad") from None
        yield record


def read_jsonl(path: str | Path, skip_bad: bool = False, stats: dict | None = None) -> list[dict]:
    return list(iter_jsonl(path, skip_bad=skip_bad, stats=stats))


def repair_jsonl(path: str | Path) -> int:
    """Drop a half-written last line (no trailing newline). Returns the number of bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
    return len(data) - keep


def append_jsonl(path: str | Path, records: dict | Iterable[dict]) -> None:
    """Append records, one whole line per write, flushed and fsynced."""
    if isinstance(records, dict):
        records = [records]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_jsonl(path)
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Write a whole JSONL file atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
