"""Reading chat logs and request traces: the one reader behind training data (``rlpredict.data``)
and trace annotation (``rlpredict.serve.annotate``, which streams).

- file types: :func:`detect_format` (``.jsonl``/``.ndjson``/``.json``/``.csv``/``.tsv``, each
  optionally ``.gz``; ``.parquet``/``.pq``);
- rows with their places: :func:`iter_rows` (every format and ``datasets`` folders, as
  ``(location, row)``), built from the streaming pieces annotate uses on its own file handles:
  :func:`decode_line` and :func:`parse_json` (one JSONL line), :func:`csv_records` (CSV records
  with their line numbers), :func:`open_parquet` and :func:`parquet_batches`;
- :class:`Fields`: which fields of a row hold what;
- :func:`parse_messages`: the message-list validator, with the rules of each path
  (:data:`LOG_MESSAGES`, :data:`TRACE_MESSAGES`).

Problems are :class:`RecordError`: ``location`` (``file``, ``file:line`` or ``file: row N``;
empty when the caller adds its own), ``field`` and the bare ``reason``. A bad row is yielded in
its place (the caller stops or counts it); an unreadable file raises. Text is UTF-8; a BOM at
the start of a file is dropped.
"""

from __future__ import annotations

import codecs
import csv
import functools
import gzip
import io
import json
import math
import numbers
import operator
import re
import reprlib
import sys
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from rlpredict.untrusted_text import bad_utf8_at, is_valid_unicode, json_problem

ROLE_ALIASES = {"human": "user", "user": "user", "prompter": "user", "gpt": "assistant", "chatgpt": "assistant",
                "assistant": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                "system": "system", "developer": "system", "tool": "tool", "function": "tool"}
RESPONSE_FIELDS = ("response", "completion", "output")
COUNT_FIELDS = ("rl_tokens", "output_tokens", "completion_tokens", "response_tokens",
                "usage.completion_tokens", "usage.output_tokens")
GROUP_FIELDS = ("conversation_id", "prompt_id")
GENERATOR_FIELDS = ("generator", "model")
#: The largest token count any reader accepts (logs, traces): beyond 2^53 a float, and so a
#: JSON number in most writers, no longer holds every integer.
MAX_TOKEN_COUNT = 2**53
PART_SEPARATOR = "\n"  # between the text parts of one message's content
#: A number as a log or trace cell may spell it: ASCII digits, optional sign, fraction and
#: exponent (``int`` and ``float`` would also take ``1_000`` and other scripts' digits,
#: ``float`` ``inf`` and ``nan``).
_PLAIN_NUMBER = re.compile(r"[ \t\r\n\f\v]*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[ \t\r\n\f\v]*")
_PLAIN_INT = re.compile(r"[ \t\r\n\f\v]*[+-]?[0-9]+[ \t\r\n\f\v]*")
#: The longest string read as a number (a float's exact decimal, 1e-5 written out, is 71): the
#: pattern is linear, this bounds it (a 64,000-digit cell took a reviewer's run 105 s with an
#: earlier, ambiguous pattern).
MAX_NUMBER_CHARS = 1024
#: Content-part types that carry text, each with the key that holds it, as vLLM (0.33) reads a
#: chat request: Chat Completions' "text", the Responses API's "input_text" and "output_text",
#: an assistant's "refusal" and "thinking". (A part with no ``type`` and a ``text`` is text here
#: too, as logs write it; vLLM refuses it.)
TEXT_PART_KEYS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
                  "thinking": "thinking"}
#: The keys of vLLM's (0.33) content parts that come without a ``type`` and are not text; a
#: ``uuid`` alone refers to media the server has cached.
UNTYPED_MEDIA_KEYS = ("image_url", "audio_url", "video_url", "input_audio", "image_embeds", "audio_embeds",
                      "video_embeds", "prompt_embeds", "image_pil", "tool_reference", "uuid")
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
            ".parquet": "parquet", ".pq": "parquet"}
OnError = Literal["fail", "skip"]
#: Compressions other than gzip: a data file in one of them (``logs.jsonl.zst``) is not read.
OTHER_COMPRESSIONS = frozenset({".bz2", ".xz", ".lzma", ".zst", ".zstd", ".lz4", ".br", ".zip", ".7z", ".z"})
#: What reading a truncated or corrupt ``.gz`` raises.
COMPRESSION_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def no_generator_note(rows: str, field: str = "", what: str = "this bundle") -> str:
    """Every tool's words for requests without a generator predicted by a bundle (``what``) that
    takes one (``rows``: "3 row(s)"; ``field``: where it was looked for, in brackets)."""
    return (f"{rows} have no generator{f' ({field})' if field else ''}: {what} takes the served "
            "model's name, and predicted them as 'model: unknown'")


def is_plain_number(v: object) -> bool:
    """Not a string, or a number written in plain ASCII digits (see ``_PLAIN_NUMBER``), at most
    ``MAX_NUMBER_CHARS`` long."""
    return not isinstance(v, str) or (len(v) <= MAX_NUMBER_CHARS and _PLAIN_NUMBER.fullmatch(v) is not None)


def whole_count(v: object, lo: int = 0) -> int | None:
    """``v`` as a token count in [lo, 2^53], or None: an integer (never a bool), a float with
    a whole value, or a string spelling one in plain ASCII digits (``"50"``, ``"50.0"``,
    ``"5e1"``; not ``"1_000"``). The one rule of a count in training logs and in traces."""
    if isinstance(v, str):
        if not is_plain_number(v):
            return None
        try:  # digits alone exactly (2^53 + 1 is no float); int() refuses over 4300 digits
            v = int(v) if _PLAIN_INT.fullmatch(v) else float(v)
        except (ValueError, OverflowError):
            return None
    elif isinstance(v, bool) or not isinstance(v, numbers.Number):  # bytes, numpy's bool_, lists
        return None
    try:
        n = operator.index(v)  # int and numpy integers, exactly
    except TypeError:
        try:
            x = float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            return None
        if not (math.isfinite(x) and x.is_integer()):
            return None
        n = int(x)
    return n if lo <= n <= MAX_TOKEN_COUNT else None


#: A row's value quoted in an error message: at most about 60 characters.
SHORT = reprlib.Repr()
SHORT.maxstring = SHORT.maxlong = SHORT.maxother = 60


def json_kind(v: Any) -> str:
    """What a value is, in JSON's words (was: Python's, "got NoneType" for a ``null`` line)."""
    names = {type(None): "null", bool: "true or false", str: "a string", int: "a number", float: "a number",
             list: "an array", dict: "an object"}
    return names.get(type(v), type(v).__name__)


class RecordError(ValueError):
    """A bad file, row or field: ``location`` is ``file``, ``file:line`` or ``file: row N``.
    ``kind``: the reason without what is particular to the row (its value, a byte or column
    number), by which readers that skip bad rows count them (a bounded tally); default: the
    reason."""

    def __init__(self, location: str, message: str, field: str | None = None, *, kind: str | None = None):
        self.location, self.field, self.reason = location, field, message
        self.kind = kind or message
        #: what readers that skip bad rows count it under: its field and kind, never its value
        self.tally_key = f"{field}: {self.kind}" if field else self.kind
        where = f"field {field!r}: " if field else ""
        super().__init__(f"{location}: {where}{message}" if location else where + message)


# ---- which fields hold what ----------------------------------------------------------------------
@dataclass(frozen=True)
class Fields:
    """Which fields of a row hold what; of each tuple the first name present is used (a single
    string is one name). The defaults cover the common log shapes (training data);
    :meth:`trace` gives annotate's (one name each, as its CLI flags set them)."""

    prompt: str = "prompt"
    messages: tuple[str, ...] = ("messages", "conversation", "conversations")
    response: tuple[str, ...] = RESPONSE_FIELDS
    count: tuple[str, ...] = COUNT_FIELDS
    group: tuple[str, ...] = GROUP_FIELDS
    generator: tuple[str, ...] = GENERATOR_FIELDS
    id: str = "id"
    drop_final_assistant: bool = False
    """annotate: drop a trailing assistant message (logs that store the response as the
    conversation's last message)."""

    def __post_init__(self) -> None:
        for name in ("messages", "response", "count", "group", "generator"):
            v = getattr(self, name)
            if isinstance(v, str) or v is None:
                object.__setattr__(self, name, (v,) if v else ())

    @classmethod
    def trace(cls, prompt: str = "prompt", messages: str = "messages",
              generator: str | tuple[str, ...] | None = GENERATOR_FIELDS,
              drop_final_assistant: bool = False) -> Fields:
        """annotate's fields: a request trace keeps its request in ``prompt`` or ``messages``,
        and its generator where training reads it (``generator``, else ``model``: was
        ``generator`` alone, so a log naming its model in ``model`` was trained with it and
        annotated as "model: unknown"), unless one field is named."""
        gen = (generator,) if isinstance(generator, str) and generator else generator or ()
        return cls(prompt=prompt, messages=(messages,), generator=tuple(gen),
                   drop_final_assistant=drop_final_assistant)

    def request_columns(self) -> tuple[str, ...]:
        """The columns annotate reads: prompt, messages, generator."""
        return (self.prompt, *self.messages, *self.generator)

    def read_columns(self) -> frozenset[str]:
        """Every column a log reader reads (a JSON row that gives one twice is refused)."""
        return frozenset((self.prompt, *self.messages, *self.response, *self.count, *self.group,
                          *self.generator, self.id))


LOG_FIELDS = Fields()
#: How a row without the request's field begins (annotate then names its field options).
NO_REQUEST_FIELD = "neither field"
TRACE_FIELDS = Fields.trace()


# ---- the message validator -----------------------------------------------------------------------
@dataclass(frozen=True)
class MessageRules:
    """What a message list may hold on each path (the paths differ; see the two instances)."""

    roles: Mapping[str, str]
    """Known roles (lower-cased) -> the role kept (ShareGPT's ``human``/``gpt`` become
    ``user``/``assistant``)."""
    other_roles: bool
    """True: any other string role is kept as given; False: it is an error."""
    role_keys: tuple[str, ...]
    content_keys: tuple[str, ...]
    content_required: bool
    """False: a missing or null content is empty text."""
    all_parts_text: bool
    """Content parts (``part_texts``): True, every part must be a text part
    (``is_text_part``); False, parts of other types (images) are skipped. Text parts are joined
    by ``PART_SEPARATOR`` on every path (the vLLM middleware joins them the same way)."""


#: Training logs: OpenAI ``{role, content}`` and ShareGPT ``{from, value}``, roles mapped by
#: ``ROLE_ALIASES``.
LOG_MESSAGES = MessageRules(ROLE_ALIASES, False, ("role", "from"), ("content", "value"), content_required=True,
                            all_parts_text=True)
#: Request traces (annotate): the same keys, role names and text as training sees (a prompt
#: must give the model the text it was trained on), but more permissive: other roles are kept, a missing
#: content is empty, and non-text content parts (images) are skipped.
TRACE_MESSAGES = MessageRules(ROLE_ALIASES, True, ("role", "from"), ("content", "value"), content_required=False,
                              all_parts_text=False)
#: The keys a message's role and text are read from (a message that gives one twice is refused)
MESSAGE_KEYS = frozenset(LOG_MESSAGES.role_keys + LOG_MESSAGES.content_keys
                         + TRACE_MESSAGES.role_keys + TRACE_MESSAGES.content_keys)


def parse_messages(value: Any, name: str, rules: MessageRules, *,
                   drop_final_assistant: bool = False) -> list[dict[str, str]]:
    """``value`` (field ``name``) as ``[{role, content}, ...]``; raises :class:`RecordError`
    (no location) naming the field and the message at fault."""
    if not isinstance(value, list):
        raise RecordError("", f"expected a list of messages, got {type(value).__name__}", name)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise RecordError("", f"message {i} is not an object", name, kind="a message is not an object")
        # a key set to null counts as absent: Parquet gives every message of a column every key
        # any message has (a ShareGPT `from` beside an OpenAI `role` came back as `role: None`)
        role = next((m[k] for k in rules.role_keys if m.get(k) is not None), None)
        known = rules.roles.get(role.lower()) if isinstance(role, str) else None
        if known is not None:
            role = known
        elif not isinstance(role, str) or not rules.other_roles:
            # the role cut to 60 characters (was: whole: a 2 MB role made a 2 MB error message)
            raise RecordError("", f"message {i} has unknown role {SHORT.repr(role)}", name,
                              kind="a message has an unknown role")
        elif not is_valid_unicode(role):
            raise RecordError("", f"message {i} role is not valid Unicode (a lone surrogate)", name,
                              kind="a message role is not valid Unicode")
        content = next((m[k] for k in rules.content_keys if m.get(k) is not None), None)
        if content is None and rules.content_required:
            keys = rules.content_keys
            alt = "".join(f" (or {k!r})" for k in keys[1:])
            raise RecordError("", f"message {i} has no {keys[0]!r}{alt}", name, kind=f"a message has no {keys[0]!r}{alt}")
        out.append({"role": role, "content": _content(content, i, name, rules)})
    if drop_final_assistant and out and out[-1]["role"] == "assistant":
        out.pop()
    if not out:
        raise RecordError("", "has no messages", name)
    return out


def request_of(row: Mapping[str, Any], fields: Fields) -> str | list[dict[str, str]]:
    """The request in a row, as a predictor takes it: the messages (the first of
    ``fields.messages`` that is present and not empty; a string holding JSON is parsed, as CSV
    cells do) win over the ``fields.prompt`` string. The one rule of ``rlpredict annotate``,
    ``rlpredict predict --jsonl`` and ``ecoserve``'s traces. Raises :class:`RecordError` (no
    location) saying what is wrong."""
    for name in fields.messages:
        msgs = row.get(name)
        if msgs is None or msgs == "":
            continue
        if isinstance(msgs, str):  # CSV cells, or JSON that stores the list as a string
            try:
                msgs = _loads_messages(msgs, name)  # (was: a key given twice kept its last value in a
            except json.JSONDecodeError as e:  # CSV or Parquet cell, where JSON Lines refused it)
                raise RecordError("", f"field {name!r} is not valid JSON ({e.msg})") from None
            except RecordError:
                raise
            except (ValueError, RecursionError) as e:  # a number over 4300 digits, deep nesting
                raise RecordError("", f"field {name!r} is not valid JSON ({json_problem(e)})") from None
        if isinstance(msgs, list) and not msgs:
            continue  # empty: the next field, or the prompt (`[]` hid a prompt beside it)
        return parse_messages(msgs, name, TRACE_MESSAGES, drop_final_assistant=fields.drop_final_assistant)
    prompt = row.get(fields.prompt)
    if prompt is None:
        messages = " or ".join(map(repr, fields.messages))
        if fields.prompt not in row and not any(n in row for n in fields.messages):
            names = [repr(k[:40]) for k in list(row)[:8] if isinstance(k, str)]
            has = f"the row has {', '.join(names)}{' and more' if len(row) > 8 else ''}" if names else "the row is empty"
            raise RecordError("", f"{NO_REQUEST_FIELD} {fields.prompt!r} nor {messages} is present ({has})",
                              kind=f"{NO_REQUEST_FIELD} {fields.prompt!r} nor {messages} is present")
        raise RecordError("", f"field {fields.prompt!r} is missing or null and {messages} is missing or empty")
    if not isinstance(prompt, str):
        raise RecordError("", f"field {fields.prompt!r}: expected a string, got {type(prompt).__name__}")
    return _unicode(prompt, f"field {fields.prompt!r}")


def generator_of(row: Mapping[str, Any], fields: Fields) -> str | None:
    """The row's generator (the served model: the first of ``fields.generator`` that names one,
    ``names_nothing``), or None; raises :class:`RecordError` if it is not a valid string."""
    name, g = _first_set(row, fields.generator)
    if g is not None and not isinstance(g, str):
        raise RecordError("", f"field {name!r}: expected a string, got {type(g).__name__}")
    return g if g is None else _unicode(g, f"field {name!r}")


def names_nothing(v: Any) -> bool:
    """A generator value that names no model: null, or a string of blank space ("" is also a
    blank CSV cell). Such a request is predicted, counted and said as one without a generator
    (training reads it so too; was: "   " taken as a model's name, without a word)."""
    return v is None or (isinstance(v, str) and not v.strip())


def _first_set(row: Mapping[str, Any], names: tuple[str, ...]) -> tuple[str | None, Any]:
    """The first of ``names`` whose value does not ``names_nothing``, with it (None, None if
    none). A loop, not a generator: this runs for every row of a trace."""
    for n in names:
        v = row.get(n)
        if not names_nothing(v):
            return n, v
    return None, None


def _unicode(text: str, what: str) -> str:
    """``text`` if it is valid Unicode; JSON escapes can make lone surrogates ("\\ud800"), which
    no tokenizer (and no UTF-8 file) accepts."""
    if not is_valid_unicode(text):
        raise RecordError("", f"{what} is not valid Unicode (a lone surrogate)")
    return text


def is_text_part(part: Any) -> bool:
    """An OpenAI content part that carries text: an object whose ``type`` is one of
    ``TEXT_PART_KEYS``, or with no ``type`` and a ``text`` (null as absent: Parquet gives every
    part every key of the column). The one rule of every path (training, traces, the vLLM
    middleware); ``part_texts`` says what the other parts are."""
    if not isinstance(part, Mapping):
        return False
    kind = part.get("type")
    if kind is None:
        return part.get("text") is not None
    return isinstance(kind, str) and kind in TEXT_PART_KEYS  # (a list or an object is no key)


def _media_part(part: Mapping) -> bool:
    """A part that is not text: typed (an image, audio, a file), or one of vLLM's media parts
    without a ``type`` (``{"image_url": URL}``, ``audio_url``, ``video_url``, ``image_embeds``...)."""
    kind = part.get("type")
    if kind is not None:
        return not is_text_part(part)
    return any(part.get(k) is not None for k in UNTYPED_MEDIA_KEYS)


def part_texts(parts: list, all_text: bool) -> list[str] | None:
    """The non-empty texts of a content-part list's text parts, in order (vLLM drops empty ones);
    ``all_text``: every part must be a text part. Else, as vLLM reads a request, media parts are
    skipped, a string is a text part, and a text part whose text is null is skipped. None if a
    part is neither (``{}``, a number), a text part's text is not a string, or (``all_text``) a
    part is not a text part with a string."""
    return _part_texts(parts, all_text)[0]


def _part_texts(parts: list, all_text: bool) -> tuple[list[str] | None, int]:
    """``part_texts``, and the index of the part at fault (-1 if none)."""
    texts = []
    for j, p in enumerate(parts):
        if isinstance(p, str) and not all_text:  # vLLM takes a string as a text part
            if p:
                texts.append(p)
        elif not isinstance(p, Mapping):
            return None, j
        elif is_text_part(p):
            t = p.get(TEXT_PART_KEYS.get(p.get("type"), "text"))  # (no type: "text")
            if isinstance(t, str):
                if t:
                    texts.append(t)
            elif t is not None or all_text:
                return None, j  # (a typed text part with a null text is skipped, as vLLM skips it)
        elif all_text or not _media_part(p):  # an object that is neither text nor media ({})
            return None, j
    return texts, -1


def _content(content: Any, i: int, name: str, rules: MessageRules) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # OpenAI content parts
        texts, j = _part_texts(content, rules.all_parts_text)
        if texts is None and rules.all_parts_text:
            raise RecordError("", f"message {i}: content parts must be text parts: objects with a 'text' string (or a 'refusal' or 'thinking' one)", name,
                              kind="a message's content parts are not all text parts")
        if texts is None:
            raise RecordError("", f"message {i} part {j}: neither text (a string, or an object with a 'text' "
                              f"string) nor a media part (a 'type', or vLLM's image_url, audio_url, ...), got "
                              f"{SHORT.repr(content[j])}", name,
                              kind="a message's content part is neither text nor a media part")
        content = PART_SEPARATOR.join(texts)
    if not isinstance(content, str):
        raise RecordError("", f"message {i} content: expected a string, got {type(content).__name__}", name,
                          kind="a message's content is not a string")
    if not is_valid_unicode(content):  # a JSON escape of a lone surrogate: no tokenizer takes it
        raise RecordError("", f"message {i} content is not valid Unicode (a lone surrogate)", name,
                          kind="a message's content is not valid Unicode")
    return content


# ---- file types and streaming pieces -------------------------------------------------------------
def detect_format(path: str | Path) -> tuple[str | None, bool]:
    """``(format, gzipped)`` from a file name; the format is ``None`` for an unknown suffix."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    if gz:
        suffixes = suffixes[:-1]
    return (SUFFIXES.get(suffixes[-1]) if suffixes else None), gz


def other_compression(path: str | Path) -> bool:
    """A data file's name in a compression other than gzip (``logs.jsonl.zst``)."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    return len(suffixes) >= 2 and suffixes[-1] in OTHER_COMPRESSIONS and suffixes[-2] in SUFFIXES


def corrupt_compressed(path: str | Path, e: BaseException) -> RecordError:
    return RecordError(str(path), f"truncated or corrupt compressed file ({e})")


def text_stream(raw: IO[bytes], gz: bool, errors: str = "surrogateescape") -> IO[str]:
    """Text over an open binary file (``raw.tell()`` still says how far it has been read).
    With ``surrogateescape``, bytes that are not UTF-8 become surrogates, rejected row by row."""
    return io.TextIOWrapper(gzip.GzipFile(fileobj=raw) if gz else raw, encoding="utf-8-sig",
                            errors=errors, newline="")


#: The largest JSONL row read whole (64 MiB): a longer line is a bad row, read past in pieces,
#: so memory stays bounded whatever one row holds.
MAX_ROW_BYTES = 64 << 20
#: What ``bounded_lines`` puts in place of a longer line (a NUL byte starts no JSON text). A
#: line of the input that starts with a NUL byte is escaped with one more (``_ESCAPE``), so no
#: line can pass for the marker (was: a line that began as it did was read as one).
_OVERSIZE = b"\x00rlpredict: oversize row of "
_ESCAPE = b"\x00"


def bounded_lines(f: IO[bytes], limit: int = MAX_ROW_BYTES) -> Iterator[bytes]:
    """The lines of a binary stream, each at most ``limit`` bytes; a longer line is read past in
    ``limit``-byte pieces and yielded as a short marker that :func:`decode_line` rejects. A line
    that starts with a NUL byte gets one more (:func:`line_bytes` and :func:`decode_line` take it
    off)."""
    while data := f.readline(limit):
        if len(data) < limit or data.endswith(b"\n"):
            yield _ESCAPE + data if data.startswith(_ESCAPE) else data
            continue
        n = len(data)
        while True:
            more = f.readline(limit)
            n += len(more)
            if not more or more.endswith(b"\n"):
                break
        yield _OVERSIZE + str(n).encode() + b"\n"


def line_bytes(data: bytes) -> bytes | None:
    """A line of :func:`bounded_lines` as the input holds it (None: the marker of a line over the
    limit, which was never held)."""
    if data.startswith(_OVERSIZE):
        return None
    return data[1:] if data.startswith(_ESCAPE) else data


def decode_line(data: bytes, lineno: int) -> str:
    """One raw JSONL line as text (a BOM on line 1 is dropped); :class:`RecordError` if it is
    not UTF-8. Lines are split on ``b"\\n"`` only: a bare ``"\\r"`` is JSON whitespace."""
    if (given := line_bytes(data)) is None:
        n = int(data[len(_OVERSIZE):])
        raise RecordError("", f"a row of {n:,} bytes, over the {MAX_ROW_BYTES >> 20} MiB limit",
                          kind=f"a row over the {MAX_ROW_BYTES >> 20} MiB limit")
    try:
        return given.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        byte = bad_utf8_at(given, e, sig=lineno == 1)[1]
        raise RecordError("", f"not valid UTF-8 (byte {byte})", kind="not valid UTF-8") from None


def decode_problem(e: json.JSONDecodeError) -> str:
    """``Expecting value at column 7``, ``Invalid control character at column 23`` (was: "...
    character at, column 23")."""
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def parse_json(text: str, refuse_twice: frozenset[str] = frozenset(), *, dotted: bool = False) -> Any:
    """The JSON value of one line; :class:`RecordError` saying why not (also for an object that
    gives one of ``refuse_twice`` twice: the fields a reader reads, where ``json`` keeps the last
    silently; ``annotate`` keeps every other byte of a row, so a key it does not read may
    repeat). ``dotted``: the reader reads a name such as ``usage.completion_tokens`` as a path
    into nested objects (the log reader), each level checked; else as one top-level key
    (``annotate``'s fields, a trace's ``--columns``)."""
    twice: list[tuple[dict[str, Any], set[str]]] = []  # objects that give a key twice, and those keys
    try:
        value = json.loads(text, object_pairs_hook=_noting_twice(twice)) if refuse_twice else json.loads(text)
    except json.JSONDecodeError as e:
        first = len(text) - len(text.lstrip())  # a row of comma-separated words: a CSV named .jsonl?
        hint = "; it reads like a CSV row: name a CSV file .csv" if e.pos == first and "," in text else ""
        raise RecordError("", f"not valid JSON ({decode_problem(e)}){hint}",
                          kind=f"not valid JSON ({e.msg.removesuffix(' at')})") from None
    except (ValueError, RecursionError) as e:  # a number over 4300 digits, deep nesting
        raise RecordError("", f"not valid JSON ({json_problem(e)})", kind="not valid JSON") from None
    if twice and isinstance(value, dict) and (bad := _given_twice(value, twice, refuse_twice, dotted)):
        raise _twice_error(bad)
    return value


def _twice_error(key: str) -> RecordError:
    return RecordError("", f"key {key!r} is given twice in one JSON object (which value is meant is not known)")


def _loads_messages(text: str, name: str) -> Any:
    """``text`` (a cell holding JSON) decoded; a message list in it that gives a key a reader takes
    twice is refused by the JSON Lines rule (``_message_twice``), as ``name``'s. JSON errors are
    the caller's."""
    twice: list[tuple[dict[str, Any], set[str]]] = []
    value = json.loads(text, object_pairs_hook=_noting_twice(twice))
    if twice and isinstance(value, list) and (where := _message_twice(value, twice)):
        raise _twice_error(name + where)
    return value


def _given_twice(row: dict[str, Any], twice: list[tuple[dict[str, Any], set[str]]],
                 fields: frozenset[str], dotted: bool) -> str | None:
    """The first of ``fields`` given twice (``dotted``: the path to the first key given twice on
    its path into nested objects), or in a message of a field holding a list, its role or text
    (``messages[0].content``); ``twice`` pairs each object that repeats a key with the keys it
    repeats."""
    repeated = {id(d): keys for d, keys in twice}
    for name in sorted(fields):
        cur: Any = row
        parts = name.split(".") if dotted else [name]
        for i, part in enumerate(parts):
            if not isinstance(cur, dict):
                break
            if part in repeated.get(id(cur), ()):
                return ".".join(parts[:i + 1])
            cur = cur.get(part)
        if isinstance(cur, list) and (where := _message_twice(cur, twice)):  # (was: the last value
            return name + where  # kept without a word, as ``json`` keeps it)
    return None


def _noting_twice(twice: list[tuple[dict[str, Any], set[str]]]) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A ``json`` object hook that appends each object giving a key twice, with those keys, to
    ``twice`` (``json`` itself keeps the last value without a word)."""
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        d = dict(pairs)
        if len(d) != len(pairs):
            seen: set[str] = set()
            twice.append((d, {k for k, _ in pairs if k in seen or seen.add(k)}))  # type: ignore[func-returns-value]
        return d

    return hook


#: The keys of a content part a reader takes: its type and the key holding its text
#: (``TEXT_PART_KEYS``: "text", "refusal", "thinking").
PART_KEYS = frozenset(("type", *TEXT_PART_KEYS.values()))


def _message_twice(messages: list[Any], twice: list[tuple[dict[str, Any], set[str]]]) -> str | None:
    """Where a message list gives a key it reads twice: a message's role or content
    (``[0].content``), or a content part's type or text (``[0].content[1].text``: was not
    checked, the last kept; a reviewer's find); None if nowhere."""
    repeated = {id(d): keys for d, keys in twice}
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            continue
        if keys := repeated.get(id(m), set()) & MESSAGE_KEYS:
            return f"[{i}].{min(keys)}"
        for key in sorted(MESSAGE_KEYS & m.keys()):
            for j, part in enumerate(m[key] if isinstance(m[key], list) else ()):
                if isinstance(part, dict) and (keys := repeated.get(id(part), set()) & PART_KEYS):
                    return f"[{i}].{key}[{j}].{min(keys)}"
    return None


def csv_records(f: IO[str], delimiter: str = ",") -> Iterator[tuple[int, list[str] | None, str | None, str | None]]:
    """``(line, cells, problem, text)`` for each record of a CSV text stream, the header first
    (line 1, or after the blank lines before it); blank lines are skipped; ``line`` is where a record starts (a quoted cell may span
    lines). ``problem`` is why a record is bad: unparsable (``cells`` is ``None`` and ``text`` is
    the record as read, so that a caller that skips it can keep it; the reader goes on after
    it), a number of cells other than the header's (a cell without a column, or a column
    without a cell), or not UTF-8. ``text`` is ``None`` for a record that parsed. A bad header
    raises :class:`RecordError` whose location is the header's line number; an empty stream yields nothing. A record over
    ``MAX_ROW_BYTES`` characters (a quote left open holds the rest of the file) raises
    :class:`RecordError` naming its first line: the records after it cannot be told apart."""
    csv.field_size_limit(max(csv.field_size_limit(), min(sys.maxsize, 2**31 - 1)))  # long cells
    read: list[str] = []  # the lines of the record being parsed (one record's worth at most)
    held = 0  # their characters
    ended = 0  # the lines read to their end: a "\n" ends one, and a bare "\r" in a file with no
    # "\n" before it (old Mac text); not one in a quoted cell of a "\n" file (was: csv's line_num,
    # which counted each, so every line named after such a cell was off; a reviewer's find)
    lf = False

    def tap() -> Iterator[str]:
        nonlocal held, ended, lf
        while text := f.readline(MAX_ROW_BYTES + 1):  # was: a line of any size, held whole
            held = (held if read else 0) + len(text)
            if held > MAX_ROW_BYTES:  # was: the rest of the file held as one record (9x its size)
                raise RecordError("", f"a record of over {MAX_ROW_BYTES >> 20} Mi characters from line "
                                      f"{start} (a quote left open?); the records after it cannot be read")
            read.append(text)
            lf = lf or text.endswith("\n")
            ended += text.endswith("\n") or (not lf and text.endswith("\r"))
            yield text

    reader = csv.reader(tap(), delimiter=delimiter, strict=True)  # a quote left open at the end is an error
    start = 1
    try:
        header = next(reader, None)
        while header == []:  # blank lines before the header (was: an empty header, then the real one
            start = ended + 1  # rejected as a row of the wrong width)
            header = next(reader, None)
    except csv.Error as e:  # (the header's errors carry its line as their location: was, line 1
        raise RecordError(str(start), f"malformed CSV header ({e})") from None  # after blank lines)
    if header is None:
        return
    if not is_valid_unicode(header):
        raise RecordError(str(start), "the header is not valid UTF-8")
    if twice := _twice(header):  # which cell a name means would be a guess
        raise RecordError(str(start), f"column(s) {twice} appear more than once in the header")
    read.clear()
    yield start, header, None, None
    width = len(header)
    start = ended + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # the record is dropped; the reader goes on at the next line
            line, start = start, ended + 1
            span = f"; the record runs to line {start - 1}" if start - 1 > line else ""
            text = "".join(read)
            read.clear()
            yield line, None, f"malformed CSV ({e}{span})", text
            continue
        read.clear()
        line, start = start, ended + 1
        if not cells:
            continue  # a blank line is not a row
        if len(cells) != width:
            yield line, cells, f"has {len(cells)} field{'s' * (len(cells) != 1)}, the header has {width}", None
        else:
            yield line, cells, None if is_valid_unicode(cells) else "not valid UTF-8", None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def open_parquet(path: str | Path, whole_rows: bool = False) -> Any:
    """A ``pyarrow.parquet.ParquetFile``; :class:`RecordError` naming the file if unreadable, or
    with ``whole_rows`` (a reader that turns every column of a row into Python) if a struct in a
    column names a field twice, which pyarrow cannot turn into a dict."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise RecordError(str(path), f"not a readable Parquet file ({_first_line(e)})") from None
    if twice := _twice(pf.schema_arrow.names):
        raise RecordError(str(path), f"column(s) {twice} appear more than once")
    for f in pf.schema_arrow if whole_rows else ():  # (was: pyarrow's "duplicate field names" at
        if where := _nested_twice(f.type, f.name):  # the first row read, naming no file)
            raise RecordError(str(path), f"a struct in column {where} names a field more than once")
    return pf


def _nested_twice(t: Any, path: str) -> str | None:
    """Where a struct inside a column of Arrow type ``t`` repeats a field name (``messages[].content``:
    the path and the names), else None."""
    import pyarrow as pa

    if pa.types.is_struct(t):
        fields = [t.field(i) for i in range(t.num_fields)]
        if twice := _twice([f.name for f in fields]):
            return f"{path} ({twice})"
        return next((w for f in fields if (w := _nested_twice(f.type, f"{path}.{f.name}"))), None)
    if any(is_list(t) for is_list in (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list,
                                       pa.types.is_list_view, pa.types.is_large_list_view)):
        return _nested_twice(t.value_type, f"{path}[]")
    if pa.types.is_map(t):
        return _nested_twice(t.key_type, f"{path}{{key}}") or _nested_twice(t.item_type, f"{path}{{}}")
    return None


def _twice(names: list[str]) -> str:
    """The names that appear more than once, comma-separated ("" if none)."""
    return ", ".join(sorted({n for n in names if names.count(n) > 1}))


def parquet_batches(pf: Any, path: str | Path, rows: int) -> Iterator[Any]:
    """``pf.iter_batches``; a corrupt page is one :class:`RecordError` naming the file."""
    import pyarrow as pa

    try:
        yield from pf.iter_batches(batch_size=rows)
    except (pa.ArrowException, OSError) as e:
        raise RecordError(str(path), f"corrupt Parquet data ({_first_line(e)})") from None


# ---- every format: (location, row) --------------------------------------------------------------
def source_name(path: str | Path) -> str:
    """A file's name without its format suffixes: ``.gz``, then one of ``SUFFIXES``
    (``logs.2024.01.jsonl.gz`` -> ``logs.2024.01``)."""
    name = Path(path).name
    if name.lower().endswith(".gz"):
        name = name[:-3]
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix.lower() in SUFFIXES else name


def iter_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, row)`` for every row of a supported file or ``datasets`` folder; a bad
    row is a :class:`RecordError` in its place. Raises for a missing or unreadable file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: " + ("a link to nothing (broken, or a loop)" if p.is_symlink()
                                           else "no such file or folder"))
    if p.is_dir():
        yield from _iter_datasets_dir(p)
        return
    fmt, gz = detect_format(p)
    readers: dict[str, Callable[[Path, bool], Iterator[tuple[str, Any]]]] = {
        "jsonl": _iter_jsonl, "json": _iter_json_array, "csv": _iter_csv,
        "tsv": functools.partial(_iter_csv, delimiter="\t"), "parquet": _iter_parquet}
    if fmt is None:
        kind = p.name.removesuffix(".gz").rsplit(".", 1)[-1].lower()
        raise RecordError(str(p), f"unsupported file type {kind!r} (use .jsonl, .json, .csv, .tsv, .parquet, optionally .gz, or a datasets folder)")
    try:
        yield from readers[fmt](p, gz)
    except COMPRESSION_ERRORS as e:
        raise corrupt_compressed(p, e) from None


#: ``rows_with``'s words for the types a field must have.
_WANTED = {str: "a string", int: "an integer", float: "a number", list: "an array", dict: "an object",
           bool: "true or false"}


def rows_with(path: str | Path, fields: Sequence[str] | Mapping[str, type | tuple[type, ...]],
              check: Callable[[dict], tuple[str, str] | None] | None = None) -> Iterator[dict]:
    """The rows of ``path`` (``iter_rows``), each an object holding every one of ``fields`` (a
    mapping: each of the Python type(s) given; a number is never a bool), and passing ``check``
    (``(field, what is wrong)`` or None); the first bad row, missing field or field of another
    type stops with a :class:`RecordError` naming file, line and field."""
    types = fields if isinstance(fields, Mapping) else {}
    for loc, row in iter_rows(path):
        if isinstance(row, RecordError):
            raise row
        if not isinstance(row, dict):
            raise RecordError(loc, "not a JSON object")
        if missing := [f for f in fields if f not in row]:
            raise RecordError(loc, "missing", missing[0])
        for f, t in types.items():
            v, kinds = row[f], (t if isinstance(t, tuple) else (t,))
            if float in kinds and int not in kinds and isinstance(v, int) and not isinstance(v, bool):
                continue  # a JSON number written without a fraction is a number
            if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
                want = " or ".join(_WANTED.get(k, k.__name__) for k in kinds)
                got = "a number with a fraction" if isinstance(v, float) and int in kinds else json_kind(v)
                raise RecordError(loc, f"must be {want}, got {got}", f)
        if check is not None and (problem := check(row)) is not None:
            raise RecordError(loc, problem[1], problem[0])
        yield row


def _at(e: RecordError, loc: str) -> RecordError:
    return RecordError(loc, e.reason, e.field, kind=e.kind)


def _iter_jsonl(p: Path, gz: bool) -> Iterator[tuple[str, Any]]:
    with open(p, "rb") as raw, gzip.GzipFile(fileobj=raw) if gz else nullcontext(raw) as f:
        for lineno, data in enumerate(bounded_lines(f), 1):  # was: a line of any size held whole
            loc = f"{p}:{lineno}"
            try:
                line = decode_line(data, lineno)
                if not line.strip():
                    continue
                yield loc, parse_json(line, LOG_FIELDS.read_columns(), dotted=True)  # a repeated field: which is meant?
            except RecordError as e:
                yield loc, _at(e, loc)


#: Characters of a JSON file read at a time: its rows are read one by one, so memory is bounded by
#: the largest row (``MAX_ROW_BYTES``), as for JSON Lines.
ARRAY_CHUNK = 1 << 20


def _iter_json_array(p: Path, gz: bool) -> Iterator[tuple[str, Any]]:
    """A JSON array of rows or ``{"data": [rows]}``, read row by row, or one value (one row);
    each row named by its line."""
    try:
        with _JsonReader(p, gz) as reader:
            first = reader.token("a JSON value")
            if first == "[":  # was: read whole (631 MiB for a 316 MB file)
                yield from reader.array_rows()
                reader.finish("the array's closing ']'")
                return
            if first != "{":  # a single value other than an object: the one row, read once
                row = reader.row()
                reader.finish("the value")
                yield row
                return
            # An object: one walk checks the whole file and finds the member json.loads keeps
            # (the last named "data"), then a second read yields its rows, or the object as the
            # one row (was: the file read whole and decoded, then walked: memory several times
            # its size)
            data = reader.data_member()
            reader.finish("the value")
        with _JsonReader(p, gz) as reader:
            reader.token("a JSON value")
            yield from (reader.object_rows(data) if data is not None else [reader.row()])
    except UnicodeDecodeError:
        line, byte = first_bad_utf8(p, gz)  # (was: the byte within one read of the file, no line)
        raise RecordError(f"{p}:{line}", f"not valid UTF-8 (byte {byte})") from None


def first_bad_utf8(p: Path, gz: bool) -> tuple[int, int]:
    """Where a file stops being UTF-8: its line and the byte within that line (as a JSON Lines
    row's is named), read again in bounded memory. (0, 0) if it is UTF-8 after all."""
    dec = codecs.getincrementaldecoder("utf-8")()
    line, line_start, at = 1, 0, 0  # ``at``: the file's bytes before ``chunk``
    with open(p, "rb") as raw, (gzip.GzipFile(fileobj=raw) if gz else nullcontext(raw)) as f:
        while True:
            chunk = f.read(ARRAY_CHUNK)
            pending = dec.getstate()[0]  # the start of a character cut by the last read: no newline
            try:
                dec.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                bad = at - len(pending) + e.start
                before = chunk[:max(0, bad - at)]
                if (nl := before.rfind(b"\n")) >= 0:
                    line, line_start = line + before.count(b"\n"), at + nl + 1
                return line, bad - line_start
            if not chunk:
                return 0, 0
            if (nl := chunk.rfind(b"\n")) >= 0:
                line, line_start = line + chunk.count(b"\n"), at + nl + 1
            at += len(chunk)


#: Characters that may go on a JSON number (``json`` also reads ``Infinity``, ``NaN``).
_NUMBER_CHARS = frozenset("0123456789.eE+-InfityNa")


class _JsonReader:
    """A JSON file read in chunks as its values need them, the text behind each dropped: memory
    is bounded by the largest row or member (``MAX_ROW_BYTES``), whatever the file's size. As
    strict as ``json.loads``: a missing comma or bracket (a file cut short), a trailing comma and
    text after the value are the file's faults, named by their line (were: the rows after the
    first ``]`` ignored, a file cut short read without a word); a row that gives a field twice
    is a bad row, as in JSON Lines."""

    def __init__(self, p: Path, gz: bool) -> None:
        self.p, self.gz = p, gz
        self.text, self.pos = "", 0
        self.line, self.counted = 1, 0  # ``line`` is the line of ``text[counted]``; each stretch counted once
        self.eof, self.want = False, ARRAY_CHUNK
        self._twice = False  # some object of the row being read gives a key twice
        self._rows = json.JSONDecoder(object_pairs_hook=self._pairs)

    def __enter__(self) -> _JsonReader:
        self._raw = open(self.p, "rb")  # closed by __exit__
        try:
            self._f = text_stream(self._raw, self.gz, errors="strict")
        except BaseException:
            self._raw.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()
        self._raw.close()

    def _pairs(self, items: list[tuple[str, Any]]) -> dict[str, Any]:
        d = dict(items)
        if len(d) != len(items):
            self._twice = True
        return d

    def where(self, at: int) -> str:
        return f"{self.p}:{self.line + self.text.count(chr(10), self.counted, at)}"

    def fault(self, at: int, why: str) -> RecordError:
        return RecordError(self.where(at), f"not valid JSON ({why})")

    def more(self, what: str = "a row") -> bool:
        """Drop what is behind ``pos`` and read on (reads grow while one value needs more);
        False at the end of the file."""
        if self.eof:
            return False
        if len(self.text) - self.pos > MAX_ROW_BYTES:
            raise RecordError(self.where(self.pos), f"{what} of over {MAX_ROW_BYTES >> 20} MiB, the limit")
        chunk = self._f.read(self.want)
        self.line += self.text.count("\n", self.counted, self.pos)
        self.text, self.pos, self.counted = self.text[self.pos:] + chunk, 0, 0
        self.eof, self.want = not chunk, min(2 * self.want, MAX_ROW_BYTES)
        return not self.eof

    def token(self, expected: str) -> str:
        """The next character that is not blank space, ``pos`` at it."""
        while True:
            self.pos = _skip_space(self.text, self.pos)
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                raise self.fault(self.pos, f"the file ends where {expected} should be: cut short?")

    def value(self, what: str = "a row") -> tuple[Any, int, int]:
        """The JSON value at ``pos`` (blank space skipped): (value, its start, its end), read
        on as far as it needs; ``pos`` is left at its start."""
        self.token(what)
        while True:
            try:
                obj, end = self._rows.raw_decode(self.text, self.pos)
                if self.eof or not (isinstance(obj, (int, float)) and not isinstance(obj, bool)):
                    return obj, self.pos, end
                j = end  # a number may go on in the next read: "-2." decodes as -2 (was: then
                while j < len(self.text) and self.text[j] in _NUMBER_CHARS:  # "." refused)
                    j += 1
                if j < len(self.text):
                    return obj, self.pos, end
            except json.JSONDecodeError as e:
                if self.eof:
                    raise self.fault(e.pos, e.msg.removesuffix(" starting at").removesuffix(" at")) from None
            except (ValueError, RecursionError) as e:
                raise self.fault(self.pos, json_problem(e)) from None
            self.more(what)

    def row(self, what: str = "a row") -> tuple[str, Any]:
        """The value at ``pos`` as a row named by its line; ``pos`` past it."""
        self._twice = False
        obj, start, end = self.value(what)
        loc = self.where(start)
        if self._twice:  # the rule of a JSON Lines row (a field it reads given twice is a bad row)
            try:
                obj = parse_json(self.text[start:end], LOG_FIELDS.read_columns(), dotted=True)
            except RecordError as e:
                obj = _at(e, loc)
        self.line += self.text.count("\n", self.counted, end)
        self.pos, self.counted, self.want = end, end, ARRAY_CHUNK  # reads grow only while one value needs more
        return loc, obj

    def array_rows(self) -> Iterator[tuple[str, Any]]:
        """The items of the array at ``pos``; ``pos`` past its ``]``."""
        self.pos += 1
        if self.token("a row or ']'") == "]":
            self.pos += 1
            return
        while True:
            yield self.row()
            if not self._another("]", "the row", "a row"):
                return

    def _another(self, close: str, after: str, what: str) -> bool:
        """After an item of an array or object: past its ``,`` (True: ``what`` follows) or the
        closing ``close`` (False)."""
        sep = self.token(f"',' or '{close}'")
        if sep != "," and sep != close:
            raise self.fault(self.pos, f"expected ',' or '{close}' after {after}, found {sep!r}")
        self.pos += 1
        if sep == close:
            return False
        if self.token(what) == close:
            raise self.fault(self.pos, f"a ',' before '{close}'")
        return True

    def _members(self) -> Iterator[tuple[int, str]]:
        """Walk the object at ``pos``: (ordinal, key) of each member, ``pos`` at its value, which
        the caller reads; ``pos`` past the closing ``}`` at the end."""
        self.pos += 1
        if self.token("a key or '}'") == "}":
            self.pos += 1
            return
        k = 0
        while True:
            if self.token("a key") != '"':
                raise self.fault(self.pos, "expected a key in double quotes")
            key, _, end = self.value("a key")
            self.line += self.text.count("\n", self.counted, end)
            self.pos, self.counted = end, end
            if self.token("':'") != ":":
                raise self.fault(self.pos, "expected ':' after the key")
            self.pos += 1
            self.token("a value")
            yield k, key
            k += 1
            if not self._another("}", "the value", "a key"):
                return

    def skip(self, depth: int = 2) -> None:
        """Read past the value at ``pos`` in bounded memory: an array's items and an object's
        members one at a time, to ``depth`` levels (a list of ids beside the rows is not one
        value held whole); deeper values whole, each within the row limit."""
        c = self.token("a value")
        if depth and c == "[":
            self.pos += 1
            if self.token("a value or ']'") == "]":
                self.pos += 1
                return
            while True:
                self.skip(depth - 1)
                if not self._another("]", "the value", "a value"):
                    return
        elif depth and c == "{":
            for _ in self._members():
                self.skip(depth - 1)
        else:
            self.row("a value")

    def data_member(self) -> int | None:
        """Check the whole object at ``pos``; the ordinal of its ``data`` member when that is an
        array, else None. ``data`` given twice is refused (was: the last read, as ``json.loads``
        keeps it, and the rows of the other left out without a word)."""
        last: int | None = None
        seen = False
        for k, key in self._members():
            if key == "data" and seen:
                raise RecordError(self.where(self.pos), "the key 'data' is given twice: the rows of one would "
                                  "be left out; give one 'data'")
            seen = seen or key == "data"
            if key == "data" and self.text[self.pos] == "[":
                last = k
                for _ in self.array_rows():
                    pass
            else:
                last = None if key == "data" else last
                self.skip()
        return last

    def object_rows(self, member: int) -> Iterator[tuple[str, Any]]:
        """The rows of the object's ``member``-th member, an array."""
        for k, _ in self._members():
            if k == member:
                yield from self.array_rows()
                return
            self.skip()

    def finish(self, what: str) -> None:
        """Nothing but blank space may follow the file's value (``what``: its closing)."""
        while True:
            self.pos = _skip_space(self.text, self.pos)
            if self.pos < len(self.text):
                raise self.fault(self.pos, f"text after {what}: {self.text[self.pos:self.pos + 20]!r}")
            if not self.more():
                return


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _iter_csv(p: Path, gz: bool, delimiter: str = ",") -> Iterator[tuple[str, Any]]:
    """Rows as dicts (header -> cell); cells holding JSON lists/objects (``messages``,
    ``usage``) are decoded, except in the text columns (``_TEXT_CELLS``)."""
    with open(p, "rb") as raw, text_stream(raw, gz) as f:
        records = csv_records(f, delimiter)
        try:
            _, header, _, _ = next(records, (1, None, None, None))
        except RecordError as e:
            raise _at(e, f"{p}:{e.location or 1}") from None
        if header is None:
            return
        try:
            for line, cells, problem, _ in records:
                loc = f"{p}:{line}"
                if problem is not None or cells is None:
                    kind = "malformed CSV" if cells is None else "a number of cells other than the header's" \
                        if len(cells) != len(header) else None  # (the counts and the parser's words: the row's)
                    yield loc, RecordError(loc, problem or "malformed CSV", kind=kind)
                    continue
                # an empty cell is a missing value, as annotate and the trace reader read it
                try:
                    yield loc, {k: None if v == "" else v if k in _TEXT_CELLS else _maybe_json(v, k)
                                for k, v in zip(header, cells, strict=True)}
                except RecordError as e:  # a message list's key given twice: a bad row, as in JSON Lines
                    yield loc, _at(e, loc)
        except RecordError as e:  # a record too large to read (a quote left open)
            raise _at(e, str(p)) from None


#: CSV columns read as text whatever they hold: a prompt or a response that is JSON text is
#: text, as ``annotate`` reads it (was: decoded, so a prompt ``{"a": 1}`` was refused and a
#: response of content parts counted as their text).
_TEXT_CELLS = frozenset({LOG_FIELDS.prompt, *RESPONSE_FIELDS, *GROUP_FIELDS, *GENERATOR_FIELDS, LOG_FIELDS.id})


def _maybe_json(v: str | None, name: str = "") -> Any:
    """A cell holding a JSON list or object, decoded (else the text). A key the log reader reads
    given twice in column ``name``'s value (``usage.completion_tokens``), or a message's role or
    text in a list in any column, raises :class:`RecordError`, by the JSON Lines rule
    (``_given_twice``; was: an object's keys not checked: the last value kept; a reviewer's find)."""
    if v and v[:1] in "[{":
        twice: list[tuple[dict[str, Any], set[str]]] = []
        try:
            value = json.loads(v, object_pairs_hook=_noting_twice(twice))
        except (ValueError, RecursionError):
            return v
        if twice:  # a message list in any column: the reader may have been told to read it (``Fields``)
            read = LOG_FIELDS.read_columns() | ({name} if isinstance(value, list) else set())
            if bad := _given_twice({name: value}, twice, read, True):
                raise _twice_error(bad)
        return value
    return v


def _iter_parquet(p: Path, gz: bool) -> Iterator[tuple[str, Any]]:
    n = 0
    for rb in parquet_batches(open_parquet(p, whole_rows=True), p, 4096):
        for row in rb.to_pylist():
            n += 1
            yield f"{p}: row {n}", row


#: Files ``datasets.Dataset.save_to_disk`` (and ``DatasetDict``'s) write at a folder's top.
SAVED_DATASET_FILES = ("state.json", "dataset_info.json", "dataset_dict.json")


def data_files(folder: Path) -> list[tuple[Path, RecordError | None]]:
    """The data files a folder given as logs is read from, in name order (hidden files left
    out), each with None, or the ``RecordError`` that makes it a bad "row": a data file in a
    compression other than gzip or named with a suffix after its format (``logs.jsonl.1``), a
    link to a folder (not followed) or a broken link named like a data file or not, and a second name of a file already listed (a hard or symbolic link:
    its rows would count twice). Was: links to folders and broken links were left out, and a
    linked file read twice, without a word."""
    out: list[tuple[Path, RecordError | None]] = []
    first: dict[tuple[int, int], Path] = {}
    for f in sorted(folder.rglob("*")):
        if f.name.startswith("."):
            continue
        if f.is_symlink() and (f.is_dir() or not f.exists()):
            what = "a link to a folder, which is not followed" if f.is_dir() else "a broken link, or a loop"
            out.append((f, RecordError(str(f), f"{what}: give its target as another input", kind=what)))
            continue
        if not f.is_file():
            continue
        if other_compression(f):
            kind = f"a data file compressed as {f.suffix}"
            out.append((f, RecordError(str(f), f"{kind}, which is not read: decompress it, or gzip it", kind=kind)))
            continue
        if detect_format(f)[0] is None:
            if any(x.lower() in SUFFIXES for x in f.suffixes[:-1]):  # a rotated or renamed log: logs.jsonl.1
                kind = "a data file named with a suffix after its format, which is not read: rename it"
                out.append((f, RecordError(str(f), kind, kind=kind)))  # (was: left out without a word)
            continue
        try:
            st = f.stat()
        except OSError:
            out.append((f, None))  # the reader names the error
            continue
        if (same := first.setdefault((st.st_dev, st.st_ino), f)) != f:
            out.append((f, RecordError(str(f), f"the same file as {same} (a link): its rows would count twice",
                                       kind="the same file as another (a link): its rows would count twice")))
            continue
        out.append((f, None))
    return out


def _iter_datasets_dir(p: Path) -> Iterator[tuple[str, Any]]:
    """A ``save_to_disk`` folder through ``datasets``; any other folder file by file with the
    readers above (every data file below it, in name order: the same ``file:line`` locations
    and bad-row handling as a file given alone)."""
    if not any((p / name).is_file() for name in SAVED_DATASET_FILES):
        files = data_files(p)
        if not files:
            raise RecordError(str(p), "a folder with no data files (.jsonl, .json, .csv, .tsv, .parquet, "
                                      "optionally .gz) and not a saved datasets folder")
        for f, problem in files:
            if problem is not None:  # a bad "row" naming the file (was: left out without a word)
                yield str(f), problem
                continue
            yield from iter_rows(f)
        return
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError, OSError, KeyError, TypeError) as e:  # KeyError: a state.json
        # without the fields datasets writes
        raise RecordError(str(p), f"not a readable saved datasets folder ({_first_line(e) or type(e).__name__})") from None
    splits = ds.items() if isinstance(ds, datasets.DatasetDict) else [("", ds)]
    for split, d in splits:
        tag = f"[{split}]" if split else ""
        for i, row in enumerate(d):
            yield f"{p}{tag}: row {i + 1}", row
