"""Configuration: one pydantic model per stage, loaded from YAML with `key=value` overrides.

    cfg = load_config(RLConfig, "recipes/tiny-countdown-grpo.yaml", ["max_steps=2", "budget.max_thinking_tokens=64"])

Overrides use dotted keys for nesting; values are parsed as YAML scalars (`lr=1e-5`, `lora=true`,
`budgets=[16,32]`). An unknown key is an error that names it and suggests the closest valid keys; a wrong
type names the key and the expected type. Both are `UserError`s: one line, exit code 2.
"""

import difflib
import re
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from budgetthink.errors import UserError

C = TypeVar("C", bound=BaseModel)
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")
BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
          "less_than": ("<", "lt")}  # pydantic's bound errors: (sign, key of the bound in the error's ctx)


class Config(BaseModel):
    """Base of every stage's configuration: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"override {key}=...: {p!r} is not a block of settings")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"bad override {item!r}; write key=value, e.g. max_steps=2 or budget.max_thinking_tokens=64")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and NUMBER.fullmatch(value):  # YAML 1.1 reads `1e-5` as a string
            value = float(value)
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    """The valid keys of the (nested) model at `loc`."""
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None) if field else None
        ann = next((a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), ann)  # X | None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        else:
            break
    return list(cls.model_fields)


def explain(cls: type[BaseModel], err: ValidationError, source: str) -> UserError:
    """One line naming the first problem in a validation error."""
    errors = err.errors()
    e = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])  # a typo explains the rest
    loc = tuple(e["loc"])
    key = ".".join(str(p) for p in loc)
    if e["type"] == "extra_forbidden":
        valid = _fields_at(cls, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(valid)}"
        return UserError(f"{source}: unknown key {key!r}; {hint}")
    if e["type"] == "missing":
        return UserError(f"{source}: missing required key {key!r}")
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] in BOUNDS:  # pydantic's "Input should be greater than or equal to 0", said shortly
        sign, name = BOUNDS[e["type"]]
        msg = f"must be {sign} {e['ctx'][name]}"
    got = e.get("input")
    shown = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
    return UserError(f"{source}: {key + ': ' if key else ''}{msg}{shown}")


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None,
                defaults: dict | None = None) -> C:
    """Validate YAML file + `defaults` (e.g. CLI flags) + `key=value` overrides into `cls`."""
    data: dict = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.exists():
            raise UserError(f"config file {path} not found; pass an existing YAML file (see recipes/)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise UserError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping of key: value at the top level")
    data = _merge(data, defaults or {})
    data = _merge(data, parse_overrides(overrides or []))
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise explain(cls, err, source) from None


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved configuration next to a run's outputs."""
    from budgetthink.jsonl import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
