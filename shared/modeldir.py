"""Facts read from a Hugging Face model directory's small JSON files, without loading a tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in ``path``, or {} when the file is missing or not valid JSON."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def token_str(tok: Any) -> str | None:
    """A special-token entry of tokenizer_config.json as a string (it may be a dict with ``content``)."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def eos_token(model_dir: str | os.PathLike[str]) -> str | None:
    """The eos token string of a model dir's tokenizer_config.json, or None when it is not readable here."""
    return token_str(read_json(Path(model_dir) / "tokenizer_config.json").get("eos_token"))
