"""The files a checkpoint folder describes itself with (config.json, params.json), read and checked
for both folder formats, and the tokenizer that may sit beside the weights."""

import json
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or replace it") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; fix or replace it")
    return value


def positive_number(config: dict, key: str, where: Path, default=None, kind=int):
    """config[key] (or `default`) as a positive `kind` (int or float), or a CheckpointError naming it."""
    value = config.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if not ok or (kind is int and value != int(value)):
        raise CheckpointError(f"{where}: {key} = {value!r} is not a positive {'integer' if kind is int else 'number'}")
    return kind(value)


def tokenizer_beside(folder: Path) -> Optional[Path]:
    for name in ("tokenizer.json", "tokenizer.model"):
        if (folder / name).is_file():
            return folder / name
    return None
