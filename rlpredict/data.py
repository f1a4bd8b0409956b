"""Load chat logs as prediction samples: one sample per assistant response, with its context.

Files: JSONL / JSON / CSV (optionally ``.gz``), Parquet, and Hugging Face ``datasets`` folders,
read by :mod:`rlpredict.records` (shared with ``annotate``). Row shapes (detected per row):

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

import hashlib
import json
import numbers
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlpredict.buckets import MAX_TOKENS
from rlpredict.records import (
    LOG_FIELDS,
    LOG_MESSAGES,
    PART_SEPARATOR,
    SHORT,
    Fields,
    OnError,
    RecordError,
    iter_rows,
    json_kind,
    names_nothing,
    parse_messages,
    part_texts,
    source_name,
    whole_count,
)
from rlpredict.rl_tokenizers import count_tokens
from rlpredict.untrusted_text import holds_no_text, is_valid_unicode

#: A bad input row (``location`` is ``file:line`` or ``file: row N``); raised by the reader too.
DataError = RecordError


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


#: Kinds of skipped rows a ``LoadReport`` tells apart; the rows of any further kind are counted
#: together (``OTHER_KINDS``), so the tally stays bounded whatever the input.
MAX_KINDS = 50
OTHER_KINDS = "other reasons"


@dataclass
class LoadReport:
    rows: int = 0
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    """kind of reason (``RecordError.kind``, with its field: not the row's value) -> count"""
    first: dict[str, str] = field(default_factory=dict)
    """kind -> where its first skipped row is (``file:line``); ``examples`` has the full messages."""
    examples: list[str] = field(default_factory=list)
    """The first few skipped rows' full messages (file, line, field)."""
    unanswered_turns: int = 0
    """Assistant turns of ShareGPT conversations that answer no user message (a conversation
    cut into chunks): not samples, counted here."""
    disagreeing: Counter = field(default_factory=Counter)
    """``"read over other"`` -> rows where two fields that hold the same thing (a response's
    text, or its token count) both hold a value and disagree: the first listed is read (was:
    without a word, whatever the other said)."""
    first_disagreeing: dict[str, str] = field(default_factory=dict)
    """``disagreeing``'s key -> where it first happened (``file:line``)."""
    long_responses: int = 0
    """Training samples whose response is over ``buckets.MAX_TOKENS`` tokens (set by training):
    kept, in the last bucket, and counted as ``MAX_TOKENS`` in the scheme's reservations and
    quantiles, the most a scheme names (``BucketScheme.fit``; was: training failed, naming no row)."""
    first_long_response: str = ""
    shared_sources: dict[str, list[str]] = field(default_factory=dict)
    """Source names that several files share (sources are named by file name: ``a/logs.jsonl``
    and ``b/logs.jsonl`` are one source, ``logs``, for the per-source cap and tables)."""

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        s = f"{self.rows} rows -> {self.samples} samples"
        if self.unanswered_turns:
            s += f" ({self.unanswered_turns} assistant turns answering no user message left out)"
        if self.n_skipped:
            s += f"; skipped {self.n_skipped} rows: " + ", ".join(
                f"{n} x {r}" + (f" (first: {self.first[r]})" if r in self.first else "")
                for r, n in self.skipped.most_common())
        for pair, n in self.disagreeing.most_common():
            read, other = pair.split(" over ")
            s += (f"; {n} row{'s hold' if n != 1 else ' holds'} both {read!r} and {other!r}, which disagree: {read!r} was read "
                  f"(first: {self.first_disagreeing[pair]})")
        if self.long_responses:
            s += (f"; {self.long_responses} training response{'s' if self.long_responses != 1 else ''} over "
                  f"{MAX_TOKENS} tokens count as {MAX_TOKENS} in the buckets' reservations and quantiles "
                  f"(first: {self.first_long_response})")
        for src, files in self.shared_sources.items():  # was: merged without a word
            s += f"; {len(files)} files are one source, {src!r} (sources are named by file name): {', '.join(files)}"
        return s

    def skip(self, e: RecordError) -> None:
        """Count a skipped row by its kind of reason (was: by its full reason, the row's value
        in it: a tally, and a summary line, as long as the input), keeping the first few rows'
        full messages and where each kind was first met."""
        key = e.tally_key
        if key not in self.skipped and len(self.skipped) >= MAX_KINDS:
            key = OTHER_KINDS
        self.skipped[key] += 1
        self.first.setdefault(key, e.location)
        if len(self.examples) < 5:
            self.examples.append(str(e))

    def lines(self) -> list[str]:
        """What a command says about its read: the summary, then each example in full (file:line
        and field), so a user can find the rows that were skipped."""
        return [f"read {self.summary()}", *map(skipped_line, self.examples)]


def skipped_line(example: str) -> str:
    """How a skipped row is reported, wherever it is: its error in full (file:line, field)."""
    return f"skipped {example}"


# ---- rows -> samples ---------------------------------------------------------------------------
def _get(row: Mapping, dotted: str) -> Any:
    cur: Any = row
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _first(row: Mapping, names: Iterable[str], unset: Callable[[Any], bool] = lambda v: v is None or v == ""
           ) -> tuple[str | None, Any]:
    """The first of ``names`` (dotted paths) whose value is not ``unset``, with it."""
    for n in names:
        v = _get(row, n)
        if not unset(v):
            return n, v
    return None, None


def _disagreeing(row: Mapping, names: Sequence[str], used: str, same: Callable[[Any], bool]) -> str | None:
    """The first of ``names`` after ``used`` (the one read) that holds a value for which ``same``
    is False, or None."""
    for n in names[names.index(used) + 1:]:
        v = _get(row, n)
        if v is not None and v != "" and not same(v):
            return n
    return None


def _note_disagreeing(report: LoadReport | None, loc: str, row: Mapping, names: Sequence[str],
                      used: str, same: Callable[[Any], bool]) -> None:
    if report is not None and len(names) > 1 and (other := _disagreeing(row, names, used, same)):
        pair = f"{used} over {other}"
        report.disagreeing[pair] += 1
        report.first_disagreeing.setdefault(pair, loc)


def _text_or_none(v: Any) -> str | None:
    """``_text``'s reading of ``v``, or None where it would refuse it."""
    try:
        return _text(v, "", "")
    except DataError:
        return None


def _text(v: Any, loc: str, name: str) -> str:
    if isinstance(v, list):  # OpenAI content parts
        parts = part_texts(v, all_text=True)
        if parts is None:
            raise DataError(loc, "content parts must be text parts: objects with a 'text' string (or a 'refusal' or 'thinking' one)", name)
        v = PART_SEPARATOR.join(parts)
    if not isinstance(v, str):
        raise DataError(loc, f"expected a string, got {type(v).__name__}", name)
    if not is_valid_unicode(v):  # a JSON escape of a lone surrogate: no tokenizer takes it
        raise DataError(loc, "not valid Unicode (a lone surrogate)", name)
    return v


def _count(v: Any, loc: str, name: str) -> int:
    """A token count by ``records.whole_count``, the rule of traces' counts too (was: ``int()``,
    which took ``1_000`` and other scripts' digits, and refused ``50.0``, which traces take)."""
    n = whole_count(v)
    if n is None:
        raise DataError(loc, f"expected an integer token count in [0, 2^53], got {SHORT.repr(v)}", name,
                        kind="expected an integer token count in [0, 2^53]")
    return n


def _key(v: Any, loc: str, name: str) -> str | None:
    """An id or group: a string, or an integer (as its decimal string); None if absent."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    raise DataError(loc, f"expected a string or an integer, got {SHORT.repr(v)}", name,
                    kind="expected a string or an integer")


def samples_from_row(row: Any, loc: str, source: str, fields: Fields = LOG_FIELDS,
                     report: LoadReport | None = None) -> list[Sample]:
    """The samples a row holds (several for a ShareGPT conversation; ``report`` counts its
    assistant turns that answer nothing). Raises :class:`DataError`."""
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, Mapping):
        raise DataError(loc, f"expected a JSON object per row, got {json_kind(row)}")
    raw_id = row.get(fields.id)
    rid = (_key(raw_id, loc, fields.id) if raw_id is not None and raw_id != ""  # an id of 0 is an id
           else hashlib.sha1(loc.encode()).hexdigest()[:12])
    gen_name, generator = _first(row, fields.generator, names_nothing)  # ``records.generator_of``'s rule
    if generator is not None and not isinstance(generator, str):
        raise DataError(loc, f"expected a string, got {SHORT.repr(generator)}", gen_name, kind="expected a string")
    if generator is not None and not is_valid_unicode(generator):  # as ``records.generator_of``
        # (was: `drift --on-error skip` stopped on it naming no file, training failed in the tokenizer)
        raise DataError(loc, "not valid Unicode (a lone surrogate)", gen_name)
    group_name, group = _first(row, fields.group)
    if group is not None:
        _key(group, loc, group_name or "")  # a string or an integer
    count_name, count = _first(row, fields.count)
    rl = _count(count, loc, count_name) if count_name else None
    if count_name is not None:
        _note_disagreeing(report, loc, row, fields.count, count_name, lambda v: whole_count(v) == rl)
    resp_name, response = _first(row, fields.response)
    # "" is an empty response (RL 0), as an empty final assistant message is, when no field or
    # message holds text; an empty CSV cell is a missing value (``records``). Was: "" refused.
    empty = resp_name is None and any(_get(row, n) == "" for n in fields.response)
    if resp_name is not None:
        response = _text(response, loc, resp_name)
        _note_disagreeing(report, loc, row, fields.response, resp_name, lambda v: _text_or_none(v) == response)

    msg_name, msgs = _first(row, fields.messages)
    if msg_name is not None:
        try:
            messages = parse_messages(msgs, msg_name, LOG_MESSAGES)
        except RecordError as e:
            raise DataError(loc, e.reason, e.field, kind=e.kind) from None
        if msg_name == "conversations" and response is None and rl is None:  # ShareGPT: every turn
            if group is None:  # its id, else its content: a group from its location (was) moved
                # with the path as typed and with rows added above it, and so did the split
                group = rid if raw_id is not None and raw_id != "" else _content_key(messages)
            return _sharegpt_samples(messages, rid, str(group), source, generator, loc, msg_name, report)
        if messages[-1]["role"] == "assistant":
            if response is None:
                response = messages[-1]["content"]
            messages = messages[:-1]
    elif fields.prompt in row and row[fields.prompt] is not None:
        messages = [{"role": "user", "content": _text(row[fields.prompt], loc, fields.prompt)}]
    else:
        raise DataError(loc, f"no prompt: expected a {fields.prompt!r} string or a list in one of "
                             f"{', '.join(map(repr, fields.messages))}")
    if not messages or not any(m["role"] == "user" and not holds_no_text(m["content"]) for m in messages):
        # (blank to the encoder: was ``str.strip``, so a prompt of zero-width spaces trained as text)
        raise DataError(loc, "empty prompt: no non-empty user message", msg_name or fields.prompt)
    if response is None and empty:
        response = ""
    if rl is None and response is None:
        raise DataError(loc, "no response: expected a response text ("
                             f"{', '.join(fields.response)}), a final assistant message, or a token count "
                             f"({', '.join(fields.count)})")
    if group is None:  # identical contexts share a group, so they never straddle a split
        group = _content_key(messages)
    return [Sample(rid, str(group), messages, response, rl, source, generator, loc)]


def _content_key(messages: list[dict[str, str]]) -> str:
    """A group key from content alone (where a row names no group): the same wherever the row
    sits and however its file is named."""
    return hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:12]


def _sharegpt_samples(messages: list[dict[str, str]], rid: str, group: str, source: str,
                      generator: str | None, loc: str, name: str, report: LoadReport | None) -> list[Sample]:
    out, unanswered = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0 or messages[i - 1]["role"] != "user" or holds_no_text(messages[i - 1]["content"]):
            unanswered += 1  # an assistant message that answers nothing here (chunked conversations)
            continue
        out.append(Sample(f"{rid}:{i}", group, messages[:i], m["content"], None, source, generator, loc))
    if not out:
        raise DataError(loc, "no assistant turn answering a user message", name)
    if report is not None:
        report.unanswered_turns += unanswered
    return out


def load_samples(paths: Sequence[str | Path], *, fields: Fields = LOG_FIELDS, on_error: OnError = "fail",
                 max_rows: int | None = None) -> tuple[list[Sample], LoadReport]:
    """Read every file; a bad row raises (``fail``) or is counted in the report (``skip``)."""
    report = LoadReport()
    samples = list(iter_samples(paths, report, fields=fields, on_error=on_error, max_rows=max_rows))
    return samples, report


def iter_samples(paths: Sequence[str | Path], report: LoadReport, *, fields: Fields = LOG_FIELDS,
                 on_error: OnError = "fail", max_rows: int | None = None) -> Iterator[Sample]:
    """``load_samples`` one sample at a time (``report`` is complete once it is exhausted): for
    readers that keep only what they compute per sample (``drift``)."""
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if isinstance(paths, str | Path):  # (was: a string read as its characters: "/" walked the disk)
        raise TypeError(f"paths must be a list of files or folders, got one {type(paths).__name__}: pass [{str(paths)!r}]")
    if max_rows is not None and not (isinstance(max_rows, numbers.Integral) and not isinstance(max_rows, bool)
                                     and max_rows >= 1):
        raise ValueError(f"max_rows must be a whole number >= 1 or None, got {max_rows!r}")  # (was: -1 read none)
    samples = 0
    files: dict[str, list[str]] = {}
    for path in paths:
        source, n = source_name(path), 0
        files.setdefault(source, []).append(str(path))
        for loc, row in iter_rows(path):
            if max_rows is not None and n >= max_rows:
                break
            n += 1
            report.rows += 1
            try:
                got = samples_from_row(row, loc, source, fields, report)
            except DataError as e:
                if on_error == "fail":
                    raise
                report.skip(e)
                continue
            samples += len(got)
            yield from got
    report.samples = samples
    report.shared_sources = {src: f for src, f in files.items() if len(f) > 1}


def attach_rl(samples: Sequence[Sample], rl_tokenizer: str) -> None:
    """Count response tokens where no count was given (a given count wins)."""
    todo = [s for s in samples if s.rl_tokens is None]
    for s, n in zip(todo, count_tokens([s.response or "" for s in todo], rl_tokenizer), strict=True):
        s.rl_tokens = n
