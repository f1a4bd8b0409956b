"""Load chat logs as prediction samples: one sample per assistant response, with its context.

Files: JSONL / JSON / CSV (optionally ``.gz``), Parquet, and Hugging Face ``datasets`` folders.
Row shapes (detected per row):

- ``{prompt, response}`` (``completion`` / ``output`` are accepted for the response);
- OpenAI chat ``{messages: [{role, content}, ...]}``: the response is the last assistant message,
  or a separate response field;
- ShareGPT ``{conversations: [{from, value}, ...]}``: one sample per assistant turn, with its history;
- request logs with only a token count of the output (``output_tokens``, ``completion_tokens``,
  ``usage.completion_tokens``, ``rl_tokens``) instead of the text. A given count wins over
  re-tokenizing the response.

Every bad row raises :class:`DataError` naming the file, line and field; with ``on_error="skip"``
it is counted in the :class:`LoadReport` instead, never dropped silently.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import gzip
import hashlib
import io
import json
import reprlib
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rlpredict.rl_tokenizers import count_tokens
from rlpredict.untrusted_text import is_valid_unicode, json_problem

OnError = Literal["fail", "skip"]

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
                "assistant": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                "system": "system", "tool": "tool", "function": "tool"}
RESPONSE_FIELDS = ("response", "completion", "output")
COUNT_FIELDS = ("rl_tokens", "output_tokens", "completion_tokens", "response_tokens",
                "usage.completion_tokens", "usage.output_tokens")
GROUP_FIELDS = ("conversation_id", "prompt_id")
GENERATOR_FIELDS = ("generator", "model")


class DataError(ValueError):
    """A bad input row: ``location`` is ``file:line`` (or ``file: row N``)."""

    def __init__(self, location: str, message: str, field: str | None = None):
        self.location, self.field, self.reason = location, field, message
        where = f"{location}: field {field!r}: " if field else f"{location}: "
        super().__init__(where + message)


@dataclass(slots=True)
class Sample:
    id: str
    group: str
    """Split key: samples of one group (conversation or prompt) never straddle train and test."""
    messages: list[dict[str, str]]
    """The context before the response, ending with the user message being answered."""
    response: str | None
    rl_tokens: int | None
    source: str
    generator: str | None
    location: str


@dataclass
class LoadReport:
    rows: int = 0
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    """reason -> count"""
    examples: list[str] = field(default_factory=list)
    """The first few skipped rows' full messages (file, line, field)."""

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        s = f"{self.rows} rows -> {self.samples} samples"
        if self.n_skipped:
            s += f"; skipped {self.n_skipped} rows: " + ", ".join(f"{n} x {r}" for r, n in self.skipped.most_common())
        return s


# ---- reading rows ------------------------------------------------------------------------------
def source_name(path: str | Path) -> str:
    name = Path(path).name
    for ext in (".gz", ".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet"):
        name = name.removesuffix(ext)
    return name


def _open_text(path: Path, errors: str = "strict") -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115
    return io.TextIOWrapper(raw, encoding="utf-8", errors=errors, newline="")


def iter_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, row)`` for every row of a supported file or ``datasets`` folder."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    if p.is_dir():
        yield from _iter_datasets_dir(p)
        return
    kind = p.name.removesuffix(".gz").rsplit(".", 1)[-1].lower()
    readers: dict[str, Callable[[Path], Iterator[tuple[str, Any]]]] = {
        "jsonl": _iter_jsonl, "ndjson": _iter_jsonl, "json": _iter_json_array,
        "csv": _iter_csv, "tsv": functools.partial(_iter_csv, delimiter="\t"), "parquet": _iter_parquet}
    if kind not in readers:
        raise DataError(str(p), f"unsupported file type {kind!r} (use .jsonl, .json, .csv, .tsv, .parquet, optionally .gz, or a datasets folder)")
    try:
        yield from readers[kind](p)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(str(p), f"truncated or corrupt compressed file ({e})") from None


def _iter_jsonl(p: Path) -> Iterator[tuple[str, Any]]:
    with gzip.open(p, "rb") if p.suffix == ".gz" else open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            loc = f"{p}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield loc, DataError(loc, f"not valid UTF-8 (byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                yield loc, json.loads(line)
            except json.JSONDecodeError as e:
                yield loc, DataError(loc, f"malformed JSON ({e.msg} at column {e.colno})")
            except (ValueError, RecursionError) as e:  # a number over 4300 digits, deep nesting
                yield loc, DataError(loc, f"malformed JSON ({json_problem(e)})")


def _iter_json_array(p: Path) -> Iterator[tuple[str, Any]]:
    try:
        with _open_text(p) as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(str(p), f"not valid UTF-8 (byte {e.start})") from None
    dec = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if text[pos:pos + 1] != "[":  # one object, or {"data": [...]}
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}", f"malformed JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:
            raise DataError(str(p), f"malformed JSON ({json_problem(e)})") from None
        rows = obj.get("data") if isinstance(obj, dict) and isinstance(obj.get("data"), list) else [obj]
        for i, r in enumerate(rows):
            yield f"{p}: item {i}", r
        return
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        loc = f"{p}:{text.count(chr(10), 0, pos) + 1}"
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}", f"malformed JSON ({e.msg} at column {e.colno})") from None
        except (ValueError, RecursionError) as e:
            raise DataError(loc, f"malformed JSON ({json_problem(e)})") from None
        yield loc, obj


def _iter_csv(p: Path, delimiter: str = ",") -> Iterator[tuple[str, Any]]:
    """Rows as dicts (header -> cell; missing cells absent, extra cells dropped). Bytes that are
    not UTF-8 and unparsable records are bad rows at their line, like bad JSONL lines."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long conversations in one cell
    with _open_text(p, errors="surrogateescape") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
        except csv.Error as e:
            raise DataError(f"{p}:1", f"malformed CSV header ({e})") from None
        if header is None:
            return
        if not is_valid_unicode(header):
            raise DataError(f"{p}:1", "header is not valid UTF-8")
        start = reader.line_num + 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # the record is dropped; the reader goes on at the next line
                loc, start = f"{p}:{start}", reader.line_num + 1
                yield loc, DataError(loc, f"malformed CSV ({e})")
                continue
            loc, start = f"{p}:{reader.line_num}", reader.line_num + 1
            if not cells:
                continue  # a blank line is not a row
            if not is_valid_unicode(cells):
                yield loc, DataError(loc, "not valid UTF-8")
                continue
            yield loc, {k: _maybe_json(v) for k, v in zip(header, cells, strict=False)}


def _maybe_json(v: str | None) -> Any:
    """CSV cells holding JSON lists/objects (``messages``, ``usage``) are decoded."""
    if v and v[:1] in "[{":
        try:
            return json.loads(v)
        except (ValueError, RecursionError):
            return v
    return v


def _iter_parquet(p: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset("parquet", data_files=str(p), split="train")
    except Exception as e:  # pyarrow / datasets errors of many types: one line naming the file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(str(p), f"not a readable Parquet file ({reason})") from None
    for i, row in enumerate(ds):
        yield f"{p}: row {i + 1}", row


def _iter_datasets_dir(p: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError:
        ds = datasets.load_dataset(str(p))
    splits = ds.items() if isinstance(ds, datasets.DatasetDict) else [("", ds)]
    for split, d in splits:
        tag = f"[{split}]" if split else ""
        for i, row in enumerate(d):
            yield f"{p}{tag}: row {i + 1}", row


# ---- rows -> samples ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Fields:
    """Which fields hold what; the defaults cover the common log shapes."""

    prompt: str = "prompt"
    messages: tuple[str, ...] = ("messages", "conversation", "conversations")
    response: tuple[str, ...] = RESPONSE_FIELDS
    count: tuple[str, ...] = COUNT_FIELDS
    group: tuple[str, ...] = GROUP_FIELDS
    generator: tuple[str, ...] = GENERATOR_FIELDS
    id: str = "id"


def _get(row: Mapping, dotted: str) -> Any:
    cur: Any = row
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _first(row: Mapping, names: Iterable[str]) -> tuple[str | None, Any]:
    for n in names:
        v = _get(row, n)
        if v is not None and v != "":
            return n, v
    return None, None


def _text(v: Any, loc: str, name: str) -> str:
    if isinstance(v, list):  # OpenAI content parts
        parts = [p.get("text", "") for p in v if isinstance(p, Mapping) and p.get("type", "text") == "text"]
        if len(parts) != len(v) or not all(isinstance(t, str) for t in parts):
            raise DataError(loc, "content parts must be objects with a 'text' string", name)
        v = "".join(parts)
    if not isinstance(v, str):
        raise DataError(loc, f"expected a string, got {type(v).__name__}", name)
    if not is_valid_unicode(v):  # a JSON escape of a lone surrogate: no tokenizer takes it
        raise DataError(loc, "not valid Unicode (a lone surrogate)", name)
    return v


def _count(v: Any, loc: str, name: str) -> int:
    if isinstance(v, str):
        with contextlib.suppress(ValueError):  # not an integer ("5.0", "--5", "²"), or over 4300 digits
            v = int(v)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise DataError(loc, f"expected a non-negative integer token count, got {_REPR.repr(v)}", name)
    return v


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxlong = 60


def _messages(v: Any, loc: str, name: str) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise DataError(loc, "expected a non-empty list of messages", name)
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, Mapping):
            raise DataError(loc, f"message {i} is not an object", name)
        role = m.get("role", m.get("from"))
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise DataError(loc, f"message {i} has unknown role {role!r}", name)
        content = m["content"] if "content" in m else m.get("value")
        if content is None:
            raise DataError(loc, f"message {i} has no 'content' (or 'value')", name)
        out.append({"role": ROLE_ALIASES[role.lower()], "content": _text(content, loc, f"{name}[{i}].content")})
    return out


def samples_from_row(row: Any, loc: str, source: str, fields: Fields = Fields()) -> list[Sample]:
    """The samples a row holds (several for a ShareGPT conversation). Raises :class:`DataError`."""
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, Mapping):
        raise DataError(loc, f"expected a JSON object per row, got {type(row).__name__}")
    rid = str(row.get(fields.id) or hashlib.sha1(loc.encode()).hexdigest()[:12])
    _, generator = _first(row, fields.generator)
    generator = str(generator) if generator is not None else None
    _, group = _first(row, fields.group)
    count_name, count = _first(row, fields.count)
    rl = _count(count, loc, count_name) if count_name else None
    resp_name, response = _first(row, fields.response)
    if resp_name is not None:
        response = _text(response, loc, resp_name)

    msg_name, msgs = _first(row, fields.messages)
    if msg_name is not None:
        messages = _messages(msgs, loc, msg_name)
        if msg_name == "conversations" and response is None and rl is None:  # ShareGPT: every turn
            return _sharegpt_samples(messages, rid, str(group or rid), source, generator, loc, msg_name)
        if messages[-1]["role"] == "assistant":
            if response is None:
                response = messages[-1]["content"]
            messages = messages[:-1]
    elif fields.prompt in row and row[fields.prompt] is not None:
        messages = [{"role": "user", "content": _text(row[fields.prompt], loc, fields.prompt)}]
    else:
        raise DataError(loc, f"no prompt: expected a {fields.prompt!r} string or a list in one of "
                             f"{', '.join(map(repr, fields.messages))}")
    if not messages or not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise DataError(loc, "empty prompt: no non-empty user message", msg_name or fields.prompt)
    if rl is None and response is None:
        raise DataError(loc, "no response: expected a response text ("
                             f"{', '.join(fields.response)}), a final assistant message, or a token count "
                             f"({', '.join(fields.count)})")
    if group is None:  # identical contexts share a group, so they never straddle a split
        group = hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:12]
    return [Sample(rid, str(group), messages, response, rl, source, generator, loc)]


def _sharegpt_samples(messages: list[dict[str, str]], rid: str, group: str, source: str,
                      generator: str | None, loc: str, name: str) -> list[Sample]:
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i == 0:
            continue
        ctx = messages[:i]
        if ctx[-1]["role"] != "user" or not ctx[-1]["content"].strip():
            continue  # an assistant message that answers nothing here (chunked conversations)
        out.append(Sample(f"{rid}:{i}", group, ctx, m["content"], None, source, generator, loc))
    if not out:
        raise DataError(loc, "no assistant turn answering a user message", name)
    return out


def load_samples(paths: Sequence[str | Path], *, fields: Fields = Fields(), on_error: OnError = "fail",
                 max_rows: int | None = None) -> tuple[list[Sample], LoadReport]:
    """Read every file; a bad row raises (``fail``) or is counted in the report (``skip``)."""
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    samples: list[Sample] = []
    report = LoadReport()
    for path in paths:
        source, n = source_name(path), 0
        for loc, row in iter_rows(path):
            if max_rows is not None and n >= max_rows:
                break
            n += 1
            report.rows += 1
            try:
                got = samples_from_row(row, loc, source, fields)
            except DataError as e:
                if on_error == "fail":
                    raise
                report.skipped[e.reason if not e.field else f"{e.field}: {e.reason}"] += 1
                if len(report.examples) < 5:
                    report.examples.append(str(e))
                continue
            samples.extend(got)
    report.samples = len(samples)
    return samples, report


def attach_rl(samples: Sequence[Sample], rl_tokenizer: str) -> None:
    """Count response tokens where no count was given (a given count wins)."""
    todo = [s for s in samples if s.rl_tokens is None]
    for s, n in zip(todo, count_tokens([s.response or "" for s in todo], rl_tokenizer), strict=True):
        s.rl_tokens = n
