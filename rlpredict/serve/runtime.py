"""The torch-free predictor runtime: ONNX Runtime + ``tokenizers`` over a bundle.

>>> from rlpredict import Predictor
>>> p = Predictor.load()                          # the default bundle
>>> p.predict("Write a haiku about the sea")[0]   # Prediction(bucket=..., pred_tokens=..., ...)

A request is a prompt string or an OpenAI-style message list; the model sees the text that
``rlpredict.inputs.build_text`` makes of it, exactly as in training, tokenized with the bundle's
``tokenizer.json`` and truncated to the input spec (``TextEncoder``: long texts are cut before
tokenizing, with the same ids as tokenizing them whole).

**A prompt's prediction depends only on the prompt.** Every prompt runs alone: batch 1, at its own
token length, no padding. Dynamic int8 quantization picks activation scales per input tensor, so
in a padded batch a prompt's scales (and its padding width) would depend on its neighbours; alone,
they are its own. Bulk calls (``predict``, ``predict_arrays``, ``logits``) spread the prompts over
``threads`` workers, each running its prompts one at a time with one ONNX Runtime thread (ORT
releases the GIL); a lone prompt (``predict_one``, or a bulk call of one) runs with ``threads``
intra-op threads for latency. ORT's thread count changes how one input's work is split, and has
changed no result in any measurement (``benchmarks/predictor_speed.py``: 1,000 ShareGPT prompts;
``tests/rlpredict/test_determinism.py``); ``load`` also compares the two sessions on probe inputs
and, should they ever differ, runs lone prompts single-threaded too.

A bundle with a lexical head (``rlpredict stack``; ``rlpredict.serve.lexical``) also scores
each prompt with TF-IDF + logistic regression and stacks the two models' probabilities into the
logits that everything below uses; the head is per prompt too, so the above holds unchanged.

``pred_tokens`` is the median of the predicted length distribution (the MAE-optimal point);
``reserve_tokens`` is the predicted bucket's reservation, or, with ``reserve_quantile``, that
quantile of the predicted distribution (wider when the model is unsure); both reservations are
then padded by ``margin`` (x (1 + margin), rounded up).

A ``Predictor`` may be shared between threads: ``session.run`` is thread-safe, and bulk calls
share one pool of ``threads - 1`` helper threads (each call's own thread is one more worker).
``threads`` bounds ONNX Runtime, not the tokenizer: a batch of two or more prompts is tokenized
by the ``tokenizers`` library's own pool, one thread per core unless ``RAYON_NUM_THREADS`` says
otherwise; a lone prompt (the serving path) is tokenized on the calling thread, and a long one
(past the first window) through that pool's call, which releases the GIL (the event loop of an
API server keeps running), so the pool starts the first time one comes.

An empty or blank prompt, or a request with no non-empty user message (only a system turn, an
unknown role, an image alone), is predicted as an empty prompt, which training never saw:
``lacks_user_text`` tells; ``annotate`` and ``predict --jsonl`` count such rows and say so, and
the CLI refuses a blank prompt argument.
"""

from __future__ import annotations

import json
import numbers
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from rlpredict.buckets import BucketScheme, tokens_up
from rlpredict.inputs import InputSpec, build_text, last_user_message, messages_from_prompt
from rlpredict.records import TRACE_MESSAGES, RecordError, parse_messages
from rlpredict.serve.bundle import Bundle, BundleError, load_bundle
from rlpredict.untrusted_text import holds_no_text, is_valid_unicode, library_error

Request = str | Sequence[Mapping[str, Any]]
"""A prompt string, or the conversation before the response as ``[{role, content}, ...]``."""

#: The largest reservation margin (reserve x (1 + margin)): 100 is 101x the reservation, far past
#: any use, and far from the int64 overflow that larger ones reach.
MAX_MARGIN = 100.0
#: Texts longer than this many characters per kept token are cut before tokenizing.
CUT_CHARS_PER_TOKEN = 8
#: Texts tokenized per batch call: each Encoding keeps the tokens truncation cut off, so a bulk
#: call of 100k prompts peaked at 1.8 GiB; in chunks of 1,024, 0.7 GiB, as fast (a reviewer's
#: measurement, December 2026: docs/reliability.md).
ENCODE_CHUNK = 1024
#: ... or as many as hold this many characters (``TextEncoder.encode_iter``): the texts of a
#: chunk are held whole while it is tokenized.
ENCODE_CHUNK_CHARS = 16 << 20


@dataclass(frozen=True, slots=True, eq=False)
class Prediction:
    """One request's prediction: bucket index into the bundle's scheme, the bucket
    probabilities, the point prediction and the KV-cache reservation (both in RL tokens).

    A value: ``probs`` is read-only for good and ``quantile_tokens`` a tuple, and two predictions are equal (and hash alike) when every
    field is (was: ``==`` raised numpy's "truth value of an array is ambiguous", and ``hash``
    failed on the array)."""

    bucket: int
    probs: np.ndarray
    pred_tokens: int
    reserve_tokens: int
    quantile_tokens: tuple[int, ...] = ()  # calibrated quantiles, in the order asked for

    @property
    def confidence(self) -> float:
        return float(self.probs[self.bucket])

    def __post_init__(self) -> None:
        a = np.asarray(self.probs)  # its own read-only copy (a few floats), over bytes: no caller can
        probs = np.frombuffer(a.tobytes(), a.dtype).reshape(a.shape)  # make it writeable again (was: could)
        object.__setattr__(self, "probs", probs)
        object.__setattr__(self, "quantile_tokens", tuple(self.quantile_tokens))  # (was: a list stayed one)

    def __reduce__(self) -> tuple:  # pickle and copy rebuild it, read-only again
        return (Prediction, (self.bucket, self.probs, self.pred_tokens, self.reserve_tokens, self.quantile_tokens))

    def _key(self) -> tuple:
        p = self.probs
        return (self.bucket, self.pred_tokens, self.reserve_tokens, tuple(self.quantile_tokens),
                p.dtype.str, p.shape, (p + 0.0).tobytes())  # (+ 0.0: -0.0 as 0.0)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Prediction):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


class PredictionArrays(NamedTuple):
    """Predictions for n requests as arrays (the bulk path used by ``annotate``)."""

    bucket: np.ndarray  # (n,) int64
    probs: np.ndarray  # (n, n_buckets) float32
    pred_tokens: np.ndarray  # (n,) int64
    reserve_tokens: np.ndarray  # (n,) int64
    quantile_tokens: np.ndarray | None = None  # (n, len(quantiles)) int64, when asked for


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class TextEncoder:
    """Token ids of texts truncated to ``max_length`` on ``side``, tokenizing long texts in part.

    A text longer than ``window`` characters (default ``CUT_CHARS_PER_TOKEN * max_length``) is cut
    to a window on the kept side (the head for ``right`` truncation, the tail for ``left``), at a
    space when the window's outer half has one, and the window is tokenized without truncation.
    The tokens of the word at the cut, and of the characters within the longest added token's
    length of it, may differ from those of the whole text, so they do not count; if the other
    tokens fill ``max_length``, the window's truncated ids are those of the whole text. Otherwise
    the window grows 4x while it is at most a quarter of the text, then the whole text is
    tokenized: texts with few tokens per character (long whitespace runs, giant ``[UNK]`` words)
    cost at worst one window plus 4/3 of tokenizing them whole. Cuts at other characters than
    spaces are made only for tokenizers whose words are tokenized independently (BERT's
    normalizer and pre-tokenizer); for others a window without a space grows.
    """

    def __init__(self, tokenizer: Tokenizer, max_length: int, side: Literal["left", "right"],
                 window: int | None = None):
        spec = tokenizer.to_str()
        self.max_length = int(max_length)
        self.keep_head = side == "right"
        self.window = int(window or CUT_CHARS_PER_TOKEN * self.max_length)
        self.tokenizer = Tokenizer.from_str(spec)  # truncating: what the model sees
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length, direction=side)
        self._whole = Tokenizer.from_str(spec)  # untruncated, for windows
        self._whole.no_padding()
        self._whole.no_truncation()
        self._n_content = self.max_length - self.tokenizer.num_special_tokens_to_add(False)
        added = tokenizer.get_added_tokens_decoder().values()
        self._guard = max((len(t.content) for t in added), default=0)
        # Added tokens are matched leftmost-longest. Where one's end can be another's start
        # ("aa"; runs of spaces in code models' tokenizers), where matching starts decides the
        # matches arbitrarily far on: a window that drops the head (left truncation) may then
        # tokenize its tail otherwise than the whole text does, so such texts are tokenized
        # whole (was: "a" * 3001 + " b" with "aa" added gave ... aa aa b for ... aa a b).
        config = json.loads(spec)
        # The guard counts raw characters, so a window is cut only where every added token's
        # match spans its own characters alone. Not so for a normalized token where there is a
        # normalizer (its match may span characters the normalizer deletes: "x." + zero-width
        # spaces + "y" matches "x.y"), nor where ``max_length`` leaves no room for content: no
        # window then. A token that strips the spaces beside it (``lstrip``/``rstrip``) may span
        # a run of them: a text that holds one is tokenized whole (``_piece``).
        self._cuts = self._n_content > 0 and not (config.get("normalizer") and any(t.normalized for t in added)) \
            and (self.keep_head or not _chained([t.content for t in added]))
        self._stripping = [t.content for t in added if (t.lstrip or t.rstrip) and t.content]
        self._cut_anywhere = ((config.get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer"
                              and (config.get("normalizer") or {}).get("type") in (None, "BertNormalizer"))
        # WordPiece makes a word of more than max_input_chars_per_word characters one [UNK]: a
        # longer run of characters that its normalizer and pre-tokenizer keep in one word is
        # shortened to one character over that limit, the same ids (``_shorten``). Was: one 60
        # MB word was tokenized whole (5 GB); then, until December 7, 2026, only runs of ASCII
        # letters, digits and emoji were (a 30 MB Thai or "é" prompt took 2 GB).
        model = config.get("model") or {}
        limit = model.get("max_input_chars_per_word") if model.get("type") == "WordPiece" else None
        self._unk_limit = limit if self._cut_anywhere and isinstance(limit, int) and limit >= 0 else None
        self._unk_run: re.Pattern[str] | None = None  # built on the first text that needs it
        self._unk_gone: re.Pattern[str] | None = None
        self._unk_word = "a" * ((limit or 0) + 1)
        # BERT's normalizer deletes some characters (controls, zero-width, combining marks) and
        # makes others a space its pre-tokenizer splits at: a run of two or more of them has the
        # ids of one (a space if the run holds whitespace); squeezed before a text is tokenized
        # whole. Was: 8 MB of zero-width spaces took 7 s and 1 GB.
        self._squeezable = self._cut_anywhere and (config.get("normalizer") or {}).get("type") == "BertNormalizer"
        self._added = list(added)  # checked against the squeezed characters in ``_squeeze``
        self._squeeze_re: re.Pattern[str] | None = None
        self._kinds: _CharKinds | None = None
        self._blank: frozenset[str] = frozenset()

    def encode(self, text: str) -> list[int]:
        if len(text) <= self.window:
            return self.tokenizer.encode(text).ids
        piece = self._piece(text, self.window)  # the first window settles on most texts
        if piece is not None:
            enc = _released(self._whole, piece, add_special_tokens=False)
            if self._settles(enc, len(piece)):
                return self.tokenizer.post_process(enc).ids
        return self._slow(text)

    def _slow(self, text: str) -> list[int]:
        """A long text whose first window did not settle: ``_encode_long`` on it shortened
        (``_shorten``: a regex over the whole text, so only here; was: on every long text, 297 ms
        of a 10 MB prompt, holding the GIL, for the same ids)."""
        short = self._shorten(text)
        return self._encode_long(short, first=4 * self.window if len(short) == len(text) else None)

    def _shorten(self, text: str) -> str:
        """``text`` with its runs that are one [UNK] each at their limit's length (same ids)."""
        if self._unk_limit is None:
            return text
        if self._unk_run is None:
            self._word_runs()
            if self._unk_run is None:
                return text
        assert self._unk_gone is not None
        need, gone = self._unk_limit + 2, self._unk_gone

        def cut(m: re.Match[str]) -> str:
            """One [UNK] if the run holds ``need`` word characters (those the normalizer deletes
            count for none), counted up to there, without a copy of the run."""
            start, end = m.span()
            words, at = 0, start
            for g in gone.finditer(text, start, end):
                words += g.start() - at
                if words >= need:
                    return self._unk_word
                at = g.end()
            return self._unk_word if words + end - at >= need else m.group()
        return self._unk_run.sub(cut, text)

    def _word_runs(self) -> None:
        """Build ``_shorten``'s patterns, once (0.4 s): a run of at least ``limit + 2``
        characters of which each becomes one or more word characters under the normalizer (none
        its pre-tokenizer splits at) or is deleted by it; such a run with ``limit + 2`` word
        characters is one word of over ``limit`` characters, one [UNK], whatever its neighbours.
        No shortening where an added token could match at a run's edge or in it: one whose text
        (or normalized text) begins or ends with such a character or holds such a run ("xyz"
        added: a run of q then xyz's lost them), or one that matches whole words only (it
        matched beside a run that began with "€")."""
        assert self._unk_limit is not None
        norm = self._whole.normalizer
        kinds = self._char_kinds()
        word, gone = kinds.word, kinds.gone

        def bmp_and_longest(points: list[int]) -> list[tuple[int, int]]:
            ranges = _ranges(points)
            astral = sorted((r for r in ranges if r[0] > 0xFFFF), key=lambda r: r[0] - r[1])[:ASTRAL_RANGES]
            return [r for r in ranges if r[0] <= 0xFFFF] + sorted(astral)
        word_ranges, gone_ranges = bmp_and_longest(word), bmp_and_longest(gone)
        chars = re.compile(_char_class(sorted(word_ranges + gone_ranges)))
        run = re.compile(f"{chars.pattern}{{{self._unk_limit + 2},}}")
        texts = [x for t in self._added for x in (t.content, norm.normalize_str(t.content) if norm else "") if x]
        if any(t.single_word for t in self._added) or any(
                chars.fullmatch(x[:1]) or chars.fullmatch(x[-1:]) or run.search(x) for x in texts):
            self._unk_limit = None
            return
        self._unk_run, self._unk_gone = run, re.compile(f"{_char_class(gone_ranges)}+")

    def _char_kinds(self) -> _CharKinds:
        """What the normalizer and pre-tokenizer make of each character, once (0.4 s, on the
        first text that needs it): in the BMP, the supplementary multilingual plane (emoji,
        flags, mathematical letters) and plane 14's tags and variation selectors; characters of
        other planes are none of the three kinds."""
        if self._kinds is None:
            norm, pre = self._whole.normalizer, self._whole.pre_tokenizer
            kinds = _CharKinds([], [], [])
            for cp in (*range(0xD800), *range(0xE000, 0x20000), *range(0xE0000, 0xE1000)):
                out = norm.normalize_str(chr(cp)) if norm is not None else chr(cp)
                if not out:
                    kinds.gone.append(cp)
                elif out == " ":
                    kinds.blank.append(cp)
                elif pre is None or len(pre.pre_tokenize_str(f"a{out}a")) == 1:
                    kinds.word.append(cp)
            self._kinds = kinds
        return self._kinds

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if len(texts) == 1:  # the per-request path: tokenizers' batch call starts a thread per core
            return [self.encode(texts[0])]
        if len(texts) > ENCODE_CHUNK:  # each Encoding holds its cut-off tokens too: a few at a time
            return [ids for i in range(0, len(texts), ENCODE_CHUNK)
                    for ids in self.encode_batch(texts[i:i + ENCODE_CHUNK])]
        out: list[list[int]] = [[] for _ in texts]
        short = [i for i, t in enumerate(texts) if len(t) <= self.window]
        for i, e in zip(short, self.tokenizer.encode_batch([texts[i] for i in short]), strict=True):
            out[i] = e.ids
        if len(short) == len(texts):
            return out
        long = [i for i, t in enumerate(texts) if len(t) > self.window]
        pieces = [self._piece(texts[i], self.window) for i in long]
        ready = [(i, p) for i, p in zip(long, pieces, strict=True) if p is not None]
        encs = self._whole.encode_batch([p for _, p in ready], add_special_tokens=False)
        for (i, piece), enc in zip(ready, encs, strict=True):
            if self._settles(enc, len(piece)):
                out[i] = self.tokenizer.post_process(enc).ids
        for i in long:
            if not out[i]:  # the first window did not settle: the slow path
                out[i] = self._slow(texts[i])
        return out

    def encode_iter(self, texts: Iterable[str]) -> Iterator[list[int]]:
        """``encode_batch`` over ``texts`` as they come, ``ENCODE_CHUNK`` texts or
        ``ENCODE_CHUNK_CHARS`` characters at a time: memory is one chunk's texts, whatever their
        number (training's history mode makes a text of each turn's whole conversation)."""
        chunk: list[str] = []
        held = 0
        for text in texts:
            chunk.append(text)
            held += len(text)
            if len(chunk) >= ENCODE_CHUNK or held >= ENCODE_CHUNK_CHARS:
                yield from self.encode_batch(chunk)
                chunk, held = [], 0
        if chunk:
            yield from self.encode_batch(chunk)

    def _encode_long(self, text: str, first: int | None = None) -> list[int]:
        w = first or self.window
        while 4 * w <= len(text) or w == self.window:  # windows of up to a quarter of the text
            piece = self._piece(text, w)
            if piece is not None:
                enc = _released(self._whole, piece, add_special_tokens=False)
                if self._settles(enc, len(piece)):
                    return self.tokenizer.post_process(enc).ids  # truncation + special tokens
            w *= 4
        if self._squeezable and len(short := self._squeeze(text)) < len(text):
            return self._encode_long(short)  # the same ids (see __init__), windows on a shorter text
        return _released(self.tokenizer, text).ids

    def _squeeze(self, text: str) -> str:
        """``text`` with each run of characters BERT's normalizer deletes or makes a space cut
        to one (a space if the run holds whitespace): the same ids."""
        if not self._squeezable:
            return text
        if self._squeeze_re is None:  # once, on the first text that needs it
            kinds = self._char_kinds()
            gone = [chr(cp) for cp in kinds.gone if cp <= 0xFFFF]
            blank = [chr(cp) for cp in kinds.blank if cp <= 0xFFFF]
            # a squeeze must not make or unmake an added token: none may hold a squeezed
            # character or match whole words only (the character beside it may change)
            squeezed = frozenset(blank) | frozenset(gone)
            if any(t.single_word or not squeezed.isdisjoint(t.content) for t in self._added):
                self._squeezable = False
                return text
            self._blank = frozenset(blank)
            self._squeeze_re = re.compile("[" + "".join(re.escape(c) for c in gone + blank) + "]{2,}")
        blank = self._blank
        return self._squeeze_re.sub(lambda m: m.group()[0] if blank.isdisjoint(m.group()) else " ", text)

    def _piece(self, text: str, w: int) -> str | None:
        """About ``w`` characters of ``text`` on the kept side, cut at a space if the outer half
        of the window has one (else anywhere, if the tokenizer allows: else ``None``); ``None``
        where the tokenizer or the text forbid a cut (``_cuts``, ``_stripping``)."""
        if not self._cuts or any(t in text for t in self._stripping):
            return None
        if self.keep_head:
            cut = text.rfind(" ", w // 2, w)
            if cut < 0 and not self._cut_anywhere:
                return None
            return text[:cut if cut >= 0 else w]
        start = len(text) - w
        cut = text.find(" ", start, start + w // 2)
        if cut < 0 and not self._cut_anywhere:
            return None
        return text[cut if cut >= 0 else start:]

    def _settles(self, enc: Encoding, chars: int) -> bool:
        """Whether the kept tokens of a piece's untruncated encoding are those of the whole text:
        they fill ``max_length`` without the word at the cut and the guard before it."""
        n, k = len(enc.ids), self._n_content
        if n <= k:
            return False
        words, offsets = enc.word_ids, enc.offsets
        if self.keep_head:  # tokens [0, k) must end before the last word and the guard
            j = n - 1
            while j > 0 and words[j - 1] == words[n - 1]:
                j -= 1
            return offsets[k - 1][1] <= min(offsets[j][0], chars - self._guard)
        j = 0  # tokens [n - k, n) must start after the first word and the guard
        while j < n - 1 and words[j + 1] == words[0]:
            j += 1
        return offsets[n - k][0] >= max(offsets[j][1], self._guard)


class _CharKinds(NamedTuple):
    """Code points by what a tokenizer's normalizer and pre-tokenizer make of them."""

    word: list[int]  # one or more characters its pre-tokenizer keeps in a word
    gone: list[int]  # deleted
    blank: list[int]  # made a space


#: Ranges of characters above the BMP kept in ``TextEncoder``'s giant-word classes, the longest
#: ones: re checks a class's BMP characters in a bitmap, then each range above it in turn, for
#: every character the bitmap lacks (with all 92 ranges a 15 MB run of zero-width spaces took 2.7
#: s). A character left out ends a run, which keeps the ids.
ASTRAL_RANGES = 8


def _ranges(points: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted code points as ranges of consecutive ones, ``(first, last)``."""
    out: list[tuple[int, int]] = []
    for p in points:
        if out and out[-1][1] == p - 1:
            out[-1] = (out[-1][0], p)
        else:
            out.append((p, p))
    return out


def _char_class(ranges: Sequence[tuple[int, int]]) -> str:
    """A regex character class of code point ranges."""
    def one(lo: int, hi: int) -> str:
        return re.escape(chr(lo)) if lo == hi else f"{re.escape(chr(lo))}-{re.escape(chr(hi))}"
    return "[" + "".join(one(lo, hi) for lo, hi in ranges) + "]" if ranges else "(?!)"


def _chained(tokens: Sequence[str]) -> bool:
    """Whether a proper suffix of one of ``tokens`` is a proper prefix of one (itself too)."""
    prefixes = {t[:i] for t in tokens for i in range(1, len(t))}
    return any(t[i:] in prefixes for t in tokens for i in range(1, len(t)))


def _released(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True) -> Encoding:
    """``tokenizer.encode(text)`` with the GIL released (tokenizers' batch call releases it,
    its single call holds it): a long text no longer stops every other Python thread, such as
    the event loop of vLLM's API server around the middleware (a reviewer's 3.8 MB word of
    ``é``: 4 s). Short texts keep the single call, which starts no thread pool."""
    return tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0]


class Predictor:
    """Response-length predictor over a verified bundle. Build it with ``Predictor.load``.

    ``threads``: the most CPU threads inference uses (``None``: every usable core; capped at the
    usable cores). ``batch_size`` is accepted for compatibility and has no effect: every prompt
    runs alone, so results do not depend on batching.
    """

    def __init__(self, bundle: Bundle, *, reserve_quantile: float | None = None, margin: float = 0.0,
                 threads: int | None = None, batch_size: int = 32):
        if reserve_quantile is not None and not (_real(reserve_quantile) and 0.0 < reserve_quantile <= 1.0):
            raise ValueError(f"reserve_quantile must be a number in (0, 1], got {reserve_quantile!r}")
        # NaN, inf and 1e300 made reservations INT64_MIN; the CLIs' --margin has the same bounds
        if not (_real(margin) and 0 <= margin <= MAX_MARGIN):
            raise ValueError(f"margin must be a number in [0, {MAX_MARGIN}], got {margin!r}")
        if not (_whole(batch_size) and batch_size >= 1):
            raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        if threads is not None and not (_whole(threads) and threads >= 1):
            raise ValueError(f"threads must be a whole number >= 1, got {threads!r}")
        self.bundle = bundle
        self.reserve_quantile = reserve_quantile
        self.margin = float(margin)
        self.batch_size = int(batch_size)
        self.threads = min(int(threads), usable_cores()) if threads is not None else usable_cores()
        try:
            tokenizer = Tokenizer.from_file(str(bundle.tokenizer_path))
        except Exception as e:  # tokenizers raises a bare Exception for a bad file
            raise BundleError(f"{bundle.tokenizer_path}: not a tokenizer file ({library_error(e)})") from None
        self.encoder = TextEncoder(tokenizer, bundle.input.max_length, bundle.input.truncation_side)
        self._tokenizer = self.encoder.tokenizer  # the truncating tokenizer (decode)
        self._session = _session(bundle.model_path, 1)  # bulk: one thread per prompt
        self._lone = self._session if self.threads == 1 else _session(bundle.model_path, self.threads)
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._output = self._session.get_outputs()[0].name
        declared = bundle.manifest["model"]
        for key, want in (("inputs", self._inputs), ("output", self._output)):
            if key in declared and declared[key] != want:
                raise BundleError(f"{bundle.path / 'manifest.json'}: model.{key} is {declared[key]!r}, "
                                  f"but {bundle.model_path.name} has {want!r}")
        self._reserve = np.asarray(bundle.buckets.reserve_tokens, dtype=float)
        width = bundle.input.max_length
        self._ones = np.ones((1, width), dtype=np.int64)
        self._zeros = np.zeros((1, width), dtype=np.int64)
        self._check_model()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        if self._lone is not self._session and not self._same_bits(self._lone, self._session):
            self._lone = self._session  # not seen on any CPU so far; lone prompts then run 1-threaded

    def _check_model(self) -> None:
        """The model takes what the bundle feeds it and gives one float per bucket, or a
        BundleError naming the file. Two probe runs: the tokenizer's largest id (its vocabulary
        must fit the model's embedding) and ``input.max_length`` tokens (its positions). These
        used to fail at the first prediction, after the data was read, or not at all: a model
        of another width gave wrong buckets."""
        b, model = self.bundle, self.bundle.model_path
        known = {"input_ids", "attention_mask", "token_type_ids"}
        if not {"input_ids", "attention_mask"} <= set(self._inputs) or not set(self._inputs) <= known:
            raise BundleError(f"{model}: inputs {self._inputs}; a bundle's model takes input_ids and "
                              "attention_mask (and token_type_ids)")
        kind = self._session.get_outputs()[0].type
        if kind not in ("tensor(float)", "tensor(float16)", "tensor(double)"):
            raise BundleError(f"{model}: output {self._output!r} is {kind}, expected float logits")
        top = max(self._tokenizer.get_vocab(with_added_tokens=True).values())
        # the length probe uses that id too: models that number positions past padding
        # (RoBERTa) would never reach their last position on pad ids
        for what, ids in ((f"the largest token id of {b.tokenizer_path.name}, {top}: past its embedding "
                           "(another model's tokenizer, or tokens added without resizing the embeddings?)",
                           [top, top]),
                          (f"input.max_length = {b.input.max_length} tokens", [top] * b.input.max_length)):
            try:
                logits = self._run(self._session, ids)
            except Exception as e:  # onnxruntime's errors derive from Exception
                raise BundleError(f"{model}: the model does not take {what} ({library_error(e)})") from None
            if logits.shape != (b.buckets.n_buckets,):
                raise BundleError(f"{model}: the model gives outputs of shape {logits.shape} per prompt, but "
                                  f"the bundle's scheme has {b.buckets.n_buckets} buckets (expected "
                                  f"({b.buckets.n_buckets},))")
            if not np.isfinite(logits).all():  # (was: loaded, then numpy's warning and "probs: each row
                # must be finite" at the first prompt, naming no file)
                raise BundleError(f"{model}: the model gives non-finite logits on a probe of {len(ids)} tokens "
                                  f"({', '.join(map(str, logits.tolist()[:4]))}, ...): a damaged model")

    @classmethod
    def load(cls, path: str | Path | None = None, *, reserve_quantile: float | None = None,
             margin: float = 0.0, threads: int | None = None, batch_size: int = 32,
             verify: bool = True) -> Predictor:
        """Load a bundle folder (``None``: the default bundle).

        ``threads``: CPU threads for inference, >= 1, capped at the usable cores (``None``: all of
        them; the value used is ``p.threads``). ``batch_size`` (>= 1) has no effect on results or
        speed. ``verify=False`` skips the sha256 check of the bundle's files.
        """
        return cls(load_bundle(path, verify=verify), reserve_quantile=reserve_quantile, margin=margin,
                   threads=threads, batch_size=batch_size)

    # ---- what the model sees -------------------------------------------------------------------
    @property
    def scheme(self) -> BucketScheme:
        return self.bundle.buckets

    @property
    def input_spec(self) -> InputSpec:
        return self.bundle.input

    @property
    def manifest(self) -> dict:
        return self.bundle.manifest

    def texts(self, requests: Request | Sequence[Request],
              generators: str | Sequence[str | None] | None = None) -> list[str]:
        """The model's input text for each request (``build_text`` of its messages)."""
        reqs = as_requests(requests)
        gens = _as_generators(generators, len(reqs))
        out = []
        for i, (r, g) in enumerate(zip(reqs, gens, strict=True)):
            if isinstance(r, str):
                if not is_valid_unicode(r):
                    raise ValueError(f"request {i}: not valid Unicode (a lone surrogate)")
                messages = messages_from_prompt(r)
            elif isinstance(r, Sequence) and all(isinstance(m, Mapping) for m in r):
                try:  # the messages rule of annotate and the traces (roles, content parts, types)
                    messages = parse_messages(list(r), "messages", TRACE_MESSAGES)
                except RecordError as e:
                    raise ValueError(f"request {i}: {e}") from None
            else:
                raise TypeError(f"request {i}: expected a prompt string or a list of "
                                f"{{role, content}} messages, got {type(r).__name__}")
            out.append(build_text(messages, self.bundle.input, g))
        return out

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, truncated per the input spec (no padding)."""
        return self.encoder.encode_batch(texts)

    # ---- inference -----------------------------------------------------------------------------
    def logits_of_ids(self, encoded: Sequence[Sequence[int]]) -> np.ndarray:
        """Logits (n, n_buckets) for token id lists, each run alone (see the module docstring)."""
        n = len(encoded)
        out = np.empty((n, self.scheme.n_buckets), dtype=np.float32)
        if n == 1:
            out[0] = self._run(self._lone, encoded[0])
        elif n > 1:
            order = sorted(range(n), key=lambda i: -len(encoded[i]))  # longest first: even finish

            def job(k: int) -> None:
                out[order[k]] = self._run(self._session, encoded[order[k]])

            self._spread(job, n)
        return out

    def _spread(self, job: Callable[[int], None], n: int) -> None:
        """``job(k)`` for k in range(n) on the calling thread and up to ``threads - 1`` helpers."""
        helpers = min(self.threads, n) - 1
        if helpers == 0:
            for k in range(n):
                job(k)
            return
        todo = iter(range(n))
        lock = threading.Lock()

        def work() -> None:
            try:
                while True:
                    with lock:
                        k = next(todo, -1)
                    if k < 0:
                        return
                    job(k)
            except BaseException:
                with lock:  # stop the other workers
                    for _ in todo:
                        pass
                raise

        pool = self._helpers()
        futures = [pool.submit(work) for _ in range(helpers)]
        try:
            work()
        finally:
            for f in futures:
                if not f.cancel():  # a helper that never started (busy elsewhere) is not waited for
                    f.result()

    def _helpers(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="rlpredict")
            return self._pool

    def _run(self, session: ort.InferenceSession, ids: Sequence[int]) -> np.ndarray:
        """Logits (n_buckets,) of one id list: batch 1, its own length, no padding."""
        a = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        w = a.shape[1]
        ones = self._ones[:, :w] if w <= self._ones.shape[1] else np.ones_like(a)
        feed = {"input_ids": a, "attention_mask": ones}
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = self._zeros[:, :w] if w <= self._zeros.shape[1] else np.zeros_like(a)
        return session.run([self._output], feed)[0][0]

    def _same_bits(self, a: ort.InferenceSession, b: ort.InferenceSession) -> bool:
        """Whether two sessions give identical logits on probe inputs of several lengths."""
        text = "Explain how a compiler turns source code into machine code. " * 40
        ids = self.encoder.encode(text[:self.encoder.window])  # the single-text path: no thread pool
        return all(np.array_equal(self._run(a, ids[:w]), self._run(b, ids[:w]))
                   for w in sorted({2, 9, len(ids) // 2, len(ids)}))

    def logits(self, requests: Request | Sequence[Request],
               generators: str | Sequence[str | None] | None = None) -> np.ndarray:
        """The model's logits (n, n_buckets): the encoder's, or, in a bundle with a lexical head,
        the stacker's over the encoder's and the TF-IDF model's probabilities."""
        texts = self.texts(requests, generators)
        return self.combine(self.logits_of_ids(self.encode(texts)), texts)

    def combine(self, enc_logits: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """The encoder's logits as they are, or stacked with the bundle's lexical head."""
        head = self.bundle.lexical
        return enc_logits if head is None else head.stack(enc_logits, texts)

    def predict_arrays(self, requests: Request | Sequence[Request],
                       generators: str | Sequence[str | None] | None = None, *,
                       quantiles: Sequence[float] | None = None) -> PredictionArrays:
        self.check_quantiles(quantiles)
        return self.from_logits(self.logits(requests, generators), quantiles=quantiles)

    def predict(self, requests: Request | Sequence[Request],
                generators: str | Sequence[str | None] | None = None, *,
                quantiles: Sequence[float] | None = None) -> list[Prediction]:
        """Predictions for a prompt, a message list, or a list of either (always a list).

        ``quantiles`` (e.g. ``[0.5, 0.9]``): also the bundle's calibrated quantiles of the
        response length (``Prediction.quantile_tokens``, in that order; needs a bundle made by
        ``rlpredict calibrate`` with those levels)."""
        a = self.predict_arrays(requests, generators, quantiles=quantiles)
        return [Prediction(int(a.bucket[i]), a.probs[i], int(a.pred_tokens[i]), int(a.reserve_tokens[i]),
                           _row(a.quantile_tokens, i)) for i in range(len(a.bucket))]

    def predict_one(self, request: Request, generator: str | None = None, *,
                    quantiles: Sequence[float] | None = None) -> Prediction:
        """One request with all ``threads`` on it: the same result as ``predict``, lower latency."""
        self.check_quantiles(quantiles)
        as_requests(request)  # one message is not a request, as ``predict`` says (was: predicted)
        texts = self.texts([request], [generator])
        logits = self.combine(self._run(self._lone, self.encoder.encode(texts[0]))[None], texts)
        a = self.from_logits(logits, quantiles=quantiles)
        return Prediction(int(a.bucket[0]), a.probs[0], int(a.pred_tokens[0]), int(a.reserve_tokens[0]),
                          _row(a.quantile_tokens, 0))

    def check_quantiles(self, quantiles: Sequence[float] | None) -> None:
        """Refuse quantiles this bundle has no calibration for before any work is done."""
        if quantiles is None:
            return
        if isinstance(quantiles, (str, bytes)) or not isinstance(quantiles, Sequence):
            raise TypeError(f"quantiles: expected a list of numbers, got {quantiles!r}")
        cal = self.bundle.calibration
        if cal is None:
            raise ValueError(f"bundle {self.bundle.path}: has no calibrated quantiles; add them with "
                             "`rlpredict calibrate --model BUNDLE --data LOGS --out NEW_BUNDLE`")
        for q in quantiles:
            try:
                cal.index(q)
            except ValueError as e:
                raise ValueError(f"bundle {self.bundle.path}: {e}") from None

    def from_logits(self, logits: np.ndarray, *, quantiles: Sequence[float] | None = None) -> PredictionArrays:
        """Bucket, probabilities, point prediction and reservation (and calibrated quantiles)
        from logits."""
        if not np.isfinite(logits).all():  # one prompt's overflow, say, after the load's probes passed
            row = int(np.flatnonzero(~np.isfinite(logits).all(axis=1))[0])
            raise BundleError(f"{self.bundle.model_path}: the model gave non-finite logits for prompt {row + 1} "
                              f"of {len(logits)}: no prediction can be made from them")
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z, dtype=np.float32)
        probs /= probs.sum(axis=1, keepdims=True)
        bucket = probs.argmax(axis=1).astype(np.int64)
        qtok = None
        if quantiles is not None:
            self.check_quantiles(quantiles)
            qtok = self.bundle.calibration.tokens(self.scheme, probs, list(quantiles))  # type: ignore[union-attr]
        if len(probs) == 0:
            empty = np.zeros(0, dtype=np.int64)
            return PredictionArrays(bucket, probs, empty, empty, qtok)
        pred = self.scheme.median_tokens(probs)
        if self.reserve_quantile is None:
            reserve = tokens_up(self._reserve[bucket] * (1.0 + self.margin))
        else:
            reserve = self.scheme.quantile_tokens(probs, self.reserve_quantile, self.margin)
        return PredictionArrays(bucket, probs, pred, reserve, qtok)


def _row(q: np.ndarray | None, i: int) -> tuple[int, ...]:
    return () if q is None else tuple(int(v) for v in q[i])


def _session(model: Path, threads: int) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads (the caller's thread is one of them)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = threads  # > 1: its threads spin between ops (ORT's default), for latency
    opts.log_severity_level = 4  # fatal only: errors reach the user as one line of ours
    try:
        return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) derive from Exception
        raise BundleError(f"{model}: not a loadable ONNX model ({library_error(e)})") from None


def _real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _whole(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def lacks_user_text(request: Request, spec: InputSpec) -> bool:
    """Whether ``request`` gives the model no text where ``spec`` reads it: a blank last user
    message in ``last_user`` mode (a blank prompt, only a system turn, an unknown role, an image
    alone), no text in any message in ``history`` mode. Predicted as an empty prompt, which
    training never saw, so ``annotate`` and ``predict`` count such requests and say so."""
    if isinstance(request, str):
        return holds_no_text(request)
    try:
        messages = parse_messages(list(request), "messages", TRACE_MESSAGES)
    except (RecordError, TypeError):
        return False  # not a request at all: ``texts`` says why
    if spec.mode == "history":
        return all(holds_no_text(m["content"]) for m in messages)
    return holds_no_text(last_user_message(messages))


def as_requests(requests: Request | Sequence[Request]) -> list[Request]:
    """Normalise a prompt, a message list, or a list of either to a list of requests."""
    if isinstance(requests, str):
        return [requests]
    if isinstance(requests, Mapping):  # was: predicted as its keys, "role" and "content"
        raise TypeError("requests: one message is not a request: give a prompt string, a list of messages "
                        "([{'role': 'user', 'content': ...}]) or a list of either")
    if not isinstance(requests, Sequence) or isinstance(requests, (bytes, bytearray)):
        raise TypeError(f"requests: expected a prompt string, a list of messages or a list of either, "
                        f"got {type(requests).__name__}")
    reqs = list(requests)
    if reqs and isinstance(reqs[0], Mapping):
        return [reqs]  # one conversation
    return reqs


def _as_generators(generators: str | Sequence[str | None] | None, n: int) -> list[str | None]:
    if generators is None or isinstance(generators, str):
        gens: list[str | None] = [generators] * n
    elif not isinstance(generators, Sequence) or isinstance(generators, (bytes, bytearray)):
        raise TypeError(f"generators: expected a string or a list of strings, got {type(generators).__name__}")
    else:
        gens = list(generators)
        if len(gens) != n:
            raise ValueError(f"got {len(gens)} generators for {n} requests")
        bad = [g for g in gens if g is not None and not isinstance(g, str)]
        if bad:  # was: stringified into the model's text ("model: 1")
            raise TypeError(f"generators: each must be a string or None, got {bad[0]!r}")
    for i, g in enumerate(gens[:1] if isinstance(generators, str) else gens):
        if g is not None and not is_valid_unicode(g):  # was: a TypeError deep in the tokenizer
            raise ValueError(f"generator {i}: not valid Unicode (a lone surrogate)")
    return gens
