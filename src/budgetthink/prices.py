"""The price table: what a device-hour and an API token cost, with the date and source of every price.

`prices.yaml` beside this file holds the defaults; a user file (`--prices FILE` or $BUDGETTHINK_PRICES) is
merged over it entry by entry. The ledger prices each line as it writes it, the bill reprices every line with
one table, and the estimator reads each GPU's peak throughput from here. A device or API model without a price
makes a line *unpriced* (cost None), never zero.
"""

import os
import re
from pathlib import Path

import yaml

from budgetthink.errors import UserError

DEFAULT_PRICES = Path(__file__).with_name("prices.yaml")


def read_yaml_mapping(path: Path, not_found: str, not_a_mapping: str) -> dict:
    """The mapping in YAML file `path` (empty file: {}); UserError `not_found`, or naming the file when it is not
    valid YAML or not a mapping."""
    if not path.is_file():
        raise UserError(not_found)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {not_a_mapping}")
    return data


def load_prices(path: str | Path | None = None) -> dict:
    """The default table merged with a user file (`path`, else $BUDGETTHINK_PRICES), entry by entry.

    Returns {"cpu_device", "devices", "api", "pretraining", "files"}; devices keep the user's entries first,
    so that the user's `match` patterns are tried before the defaults'."""
    table = yaml.safe_load(DEFAULT_PRICES.read_text())
    files = [str(DEFAULT_PRICES)]
    path = path or os.environ.get("BUDGETTHINK_PRICES") or None
    if path:
        p = Path(path)
        user = read_yaml_mapping(p, f"price file {p} not found; pass an existing YAML file shaped like {DEFAULT_PRICES}",
                             "expected a mapping with devices:, api:, pretraining: or cpu_device:")
        unknown = set(user) - {"cpu_device", "devices", "api", "pretraining"}
        if unknown:
            raise UserError(f"{p}: unknown top-level key(s) {', '.join(sorted(unknown))}; "
                            "valid: cpu_device, devices, api, pretraining")
        for section in ("devices", "api", "pretraining"):
            entries = user.get(section) or {}
            if not isinstance(entries, dict):
                raise UserError(f"{p}: {section}: expected a mapping of name -> entry")
            merged = {}
            for key, entry in entries.items():
                if not isinstance(entry, dict):
                    raise UserError(f"{p}: {section}.{key}: expected a mapping (e.g. usd_per_hour: 2.0)")
                merged[key] = {**table[section].get(key, {}), "source": f"your price file {p}", "date": None,
                               **entry}
                need = {"devices": ["usd_per_hour"], "api": ["usd_per_million_input", "usd_per_million_output"]}
                for field in need.get(section, []):
                    value = merged[key].get(field)
                    if value is not None and not isinstance(value, int | float):
                        raise UserError(f"{p}: {section}.{key}.{field}: expected a number, got {value!r}")
                    if field not in merged[key]:
                        raise UserError(f"{p}: {section}.{key}: missing {field} (a number, or null for unknown)")
            table[section] = {**merged, **{k: v for k, v in table[section].items() if k not in merged}}
        if user.get("cpu_device"):
            table["cpu_device"] = user["cpu_device"]
        files.append(str(p))
    table["files"] = files
    return table


def device_key(name: str, prices: dict) -> str | None:
    """The price key of a device name as the ledger records it ("cpu", or torch's CUDA name); None if unknown."""
    if name == "cpu":
        return prices["cpu_device"]
    for key, entry in prices["devices"].items():
        if any(re.search(pat, name, re.IGNORECASE) for pat in entry.get("match") or []):
            return key
    return None


def api_entry(model: str, prices: dict) -> dict | None:
    """The price entry of an API model: its exact name or one of its listed aliases (no guessing)."""
    for key, entry in prices["api"].items():
        if model == key or model in (entry.get("aliases") or []):
            return {"key": key, **entry}
    return None


def price_line(line: dict, prices: dict) -> dict:
    """Cost of one ledger line: {cost_device, cost_api, cost, priced, unpriced (reasons), device_key}."""
    reasons = []
    key = line.get("device_key") if line.get("device_key_forced") else device_key(line["device"], prices)
    entry = prices["devices"].get(key) if key else None
    rate = entry.get("usd_per_hour") if entry else None
    if line.get("device_hours", 0) == 0:
        cost_device = 0.0  # nothing ran: no device price is needed
    elif rate is None:
        cost_device = None
        reasons.append(f"device {line['device']!r} has no price (add it under devices: in a price file)"
                       if key is None else f"device key {key!r} has no price in the table")
    else:
        cost_device = line["device_hours"] * float(rate)
    cost_api, api_priced = 0.0, True
    for model, use in (line.get("api") or {}).items():
        api = api_entry(model, prices)
        if use.get("reported_cost") is not None:  # the API said what it charged
            cost_api += float(use["reported_cost"])
        elif api is None:
            reasons.append(f"API model {model!r} has no price")
            api_priced = False
        else:
            cost_api += (use.get("input_tokens", 0) * float(api["usd_per_million_input"])
                         + use.get("output_tokens", 0) * float(api["usd_per_million_output"])) / 1e6
    cost_api = cost_api if api_priced else None
    priced = cost_device is not None and cost_api is not None
    return {"device_key": key, "cost_device": cost_device, "cost_api": cost_api,
            "cost": cost_device + cost_api if priced else None, "priced": priced, "unpriced": reasons}

