"""Reading a whole JSON file, with errors that name the file and line (writes: ``atomic.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: str | Path) -> Any:
    """The parsed content of ``path``; ``ValueError("FILE: line N: not valid JSON (...)")`` if malformed."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: line {e.lineno}: not valid JSON ({e.msg})") from None
