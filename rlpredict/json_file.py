"""Reading a whole JSON file with errors that name the file and line; strict JSON output.

(Atomic writes: ``outputs.py``.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rlpredict.untrusted_text import bad_utf8_at, json_problem


class _GivenTwice(ValueError):
    """A JSON object gives one key twice (``json`` would keep the last value without a word)."""


def _once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        raise _GivenTwice(next(k for k, _ in pairs if k in seen or seen.add(k)))  # type: ignore[func-returns-value]
    return d


#: The largest JSON file read whole (a manifest, a profile, a confusion matrix are kilobytes; a
#: tokenizer a few megabytes): a larger one is refused before it is read (was: any size, held
#: whole: a 1 GB file given as ``--profile`` took 2 GB of memory before its error).
MAX_JSON_BYTES = 64 << 20


def read_json(path: str | Path) -> Any:
    """The parsed content of a file a user may edit (a manifest, a profile, bucket edges);
    ``ValueError("FILE: line N: not valid JSON (...)")`` if malformed, over ``MAX_JSON_BYTES``,
    and for an object that gives one key twice (which value is meant is not known). A leading
    UTF-8 byte-order mark is read past, as the CSV and TOML readers do."""
    p = Path(path)
    with p.open("rb") as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise ValueError(f"{p}: over {MAX_JSON_BYTES >> 20} MiB, the limit of a JSON file read whole; "
                         "is it the file you meant?")
    try:
        return json.loads(raw.decode("utf-8-sig"), object_pairs_hook=_once)
    except _GivenTwice as e:
        raise ValueError(f"{p}: key {e.args[0]!r} is given twice in one JSON object (which value is meant "
                         "is not known)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: line {e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        line, byte = bad_utf8_at(raw, e)  # (was: the byte counted from after a BOM, no line)
        raise ValueError(f"{p}: line {line}: not valid UTF-8 (byte {byte})") from None
    except (ValueError, RecursionError) as e:  # a number over 4300 digits, deep nesting
        raise ValueError(f"{p}: not valid JSON ({json_problem(e)})") from None


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalars
        return strict(obj.item())
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON (RFC 8259): NaN and infinities become null, never bare ``NaN``."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)
