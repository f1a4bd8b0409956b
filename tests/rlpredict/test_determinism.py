"""A prompt's prediction depends only on the prompt: not on the batch size, its neighbours, their
order, annotate's chunking, predict_one vs predict, or the thread count. Checked bit for bit on
the shipped int8 bundle, whose dynamic quantization (activation scales per input tensor) made
them differ when prompts ran in padded batches. Also: long texts are cut before tokenizing with
the same ids as tokenizing them whole, and ``threads`` is validated and capped.
"""

from __future__ import annotations

import functools
import gzip
import itertools
import json
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from rlpredict.inputs import InputSpec, build_text
from rlpredict.samples import SAMPLE_FILES
from rlpredict.serve.annotate import annotate_file
from rlpredict.serve.bundle import default_bundle_path
from rlpredict.serve.runtime import (
    Prediction,
    PredictionArrays,
    Predictor,
    TextEncoder,
    usable_cores,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = default_bundle_path()
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


def _sample_rows(n_per_file: int = 30) -> list[dict]:
    rows = []
    for path in SAMPLE_FILES.values():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows += [json.loads(line) for line in itertools.islice(f, n_per_file)]
    return rows


ROWS = _sample_rows()
LONG = "Explain, step by step, how a compiler turns source code into machine code. " * 400
EDGE = ["", "hi", "   \n\t  ", LONG, "word " * 2000 + "end", "x" * 5000, "你好" * 3000]
REQUESTS: list = [r["prompt"] for r in ROWS] + EDGE + [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"},
     {"role": "user", "content": "now write me a long story about dragons"}]]
GENERATORS = [r.get("generator") for r in ROWS] + [None] * (len(REQUESTS) - len(ROWS))


def _key(p: Prediction) -> tuple:
    return p.bucket, p.probs.tobytes(), p.pred_tokens, p.reserve_tokens


def _keys(a: PredictionArrays) -> list[tuple]:
    return [(int(b), p.tobytes(), int(t), int(r))
            for b, p, t, r in zip(a.bucket, a.probs, a.pred_tokens, a.reserve_tokens, strict=True)]


@pytest.fixture(scope="module")
def shipped() -> Predictor:
    return Predictor.load(SHIPPED, threads=2)


@pytest.fixture(scope="module")
def alone(shipped) -> list[tuple]:
    """Each request predicted on its own (``predict_one``): the reference."""
    return [_key(shipped.predict_one(r, g)) for r, g in zip(REQUESTS, GENERATORS, strict=True)]


# ---- batching --------------------------------------------------------------------------------
def test_the_shipped_bundle_is_batch_sensitive_when_padded(shipped):
    """Why the runtime runs prompts alone: in one padded batch, int8 logits move."""
    ids = shipped.encode(shipped.texts(REQUESTS[:40]))
    width = max(map(len, ids))
    batch = np.full((len(ids), width), shipped.bundle.pad_token_id, dtype=np.int64)
    mask = np.zeros_like(batch)
    for i, e in enumerate(ids):
        batch[i, :len(e)], mask[i, :len(e)] = e, 1
    padded = shipped._session.run(None, {"input_ids": batch, "attention_mask": mask})[0]
    assert not np.array_equal(padded, shipped.logits_of_ids(ids))


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_batch_size_does_not_change_a_prediction(alone, batch_size):
    p = Predictor.load(SHIPPED, threads=2, batch_size=batch_size)
    assert [_key(x) for x in p.predict(REQUESTS, GENERATORS)] == alone
    assert _keys(p.predict_arrays(REQUESTS, GENERATORS)) == alone


def test_neighbours_and_order_do_not_change_a_prediction(shipped, alone):
    n = len(REQUESTS)
    perm = list(range(n))
    random.Random(0).shuffle(perm)
    shuffled = shipped.predict([REQUESTS[i] for i in perm], [GENERATORS[i] for i in perm])
    assert [_key(shuffled[perm.index(i)]) for i in range(n)] == alone
    for size in (2, 3, 7):  # each chunk is a different set of neighbours
        got = []
        for s in range(0, n, size):
            got += shipped.predict(REQUESTS[s:s + size], GENERATORS[s:s + size])
        assert [_key(x) for x in got] == alone, size
    with_long = [shipped.predict([r, LONG, "hi"], [g, None, "other-model"])[0]
                 for r, g in zip(REQUESTS[:12], GENERATORS[:12], strict=True)]
    assert [_key(x) for x in with_long] == alone[:12]
    doubled = shipped.predict(REQUESTS + REQUESTS, GENERATORS + GENERATORS)
    assert [_key(x) for x in doubled] == alone + alone


def test_thread_count_does_not_change_a_prediction(alone):
    one = Predictor.load(SHIPPED, threads=1)
    assert one.threads == 1
    assert [_key(x) for x in one.predict(REQUESTS, GENERATORS)] == alone
    assert _key(one.predict_one(REQUESTS[0], GENERATORS[0])) == alone[0]


def test_callers_on_several_threads_get_what_one_caller_gets(shipped, alone):
    """One Predictor shared by a server's worker threads: predict_one, predict of one and bulk
    chunks, all at once, give each prompt its lone prediction."""
    from concurrent.futures import ThreadPoolExecutor

    n, chunks = len(REQUESTS), [(s, s + 7) for s in range(0, len(REQUESTS), 7)]
    with ThreadPoolExecutor(6) as pool:
        ones = pool.map(lambda i: _key(shipped.predict_one(REQUESTS[i], GENERATORS[i])), range(n))
        lists = pool.map(lambda i: _key(shipped.predict([REQUESTS[i]], [GENERATORS[i]])[0]), range(n))
        bulk = pool.map(lambda c: [_key(x) for x in shipped.predict(REQUESTS[c[0]:c[1]], GENERATORS[c[0]:c[1]])],
                        chunks)
        assert list(ones) == alone and list(lists) == alone
        assert [k for part in bulk for k in part] == alone


def test_logits_do_not_depend_on_the_batch(shipped):
    """Were: the stacked bundle's logits of a batch of 64 differed from each prompt's alone in
    the last bits (a matrix product's kernel depends on the row count)."""
    whole = shipped.logits(REQUESTS, GENERATORS)
    each = np.vstack([shipped.logits([r], [g]) for r, g in zip(REQUESTS, GENERATORS, strict=True)])
    assert whole.tobytes() == each.tobytes()


def test_annotate_chunking_does_not_change_a_row(shipped, alone, tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"id": i, "prompt": r, **({"generator": g} if g else {})}
            for i, (r, g) in enumerate(zip(REQUESTS[:-1], GENERATORS[:-1], strict=True))]
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    outs = []
    for chunk in (1, 7, 2048):
        dst = tmp_path / f"out-{chunk}.jsonl"
        annotate_file(shipped, src, dst, chunk_rows=chunk)
        outs.append(dst.read_bytes())
    assert outs[0] == outs[1] == outs[2]
    got = [json.loads(line) for line in outs[0].decode().splitlines()]
    assert [(g["rl_bucket"], g["rl_pred_tokens"], g["rl_reserve_tokens"]) for g in got] == \
           [(b, t, r) for b, _, t, r in alone[:-1]]


# ---- cutting long texts before tokenizing ----------------------------------------------------
def _bert() -> str:
    return Tokenizer.from_file(str(SHIPPED / "tokenizer.json")).to_str()


def _byte_level_bpe() -> str:
    """A RoBERTa-style tokenizer (byte-level BPE, <s> ... </s>), trained here on a few lines."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["hello world, this is a test of 12345 numbers and words!", "你好世界 ok\n\tyes",
              "the quick brown fox jumps over the lazy dog"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.RobertaProcessing(("</s>", 1), ("<s>", 0))
    return tok.to_str()


def _added(base: Callable[[], str], tokens: list[str]) -> Callable[[], str]:
    """``base`` with ``tokens`` added, as ``tokenizer.add_tokens`` adds a local encoder's own:
    words (``xyz``), ones whose end can start another (``aa``, runs of spaces: a window cut on
    the left then shifts the matches), ones with a word character at an edge (``ab]``)."""
    from tokenizers import AddedToken

    def make() -> str:  # matched in the raw text (a normalized one turns off windows on BERT)
        tok = Tokenizer.from_str(base())
        tok.add_tokens([AddedToken(t, normalized=False) for t in tokens])
        return tok.to_str()
    return make


TOKENIZERS = {"bert": _bert, "byte-level-bpe": _byte_level_bpe,
              "bert-added": _added(_bert, ["xyz", "aa", "ab]", "[q"]),
              "byte-level-bpe-added": _added(_byte_level_bpe, ["  ", "    ", "aa", "xyz"])}


@functools.cache
def _encoders(kind: str, max_length: int, window: int | None, side: str) -> tuple[TextEncoder, Tokenizer]:
    spec = _tokenizer_json(kind)
    whole = Tokenizer.from_str(spec)
    whole.no_padding()
    whole.enable_truncation(max_length, direction=side)
    return TextEncoder(Tokenizer.from_str(spec), max_length, side, window=window), whole


@functools.cache
def _tokenizer_json(kind: str) -> str:
    return TOKENIZERS[kind]()


ATOMS = st.one_of(
    st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789"), min_size=1, max_size=12),
    st.integers(95, 130).map(lambda n: "w" * n),  # BERT: a word over 100 characters is one [UNK]
    st.integers(95, 400).map(lambda n: ("a1Z\U0001F600" * n)[:n]),  # runs the encoder shortens
    st.integers(95, 400).map(lambda n: ("éกิน\u0301ñ\u200bß" * n)[:n]),  # non-ASCII ones, marks it deletes
    st.text(st.sampled_from(" \t\n\r\u3000\xa0\x0b\x1c\x85\u2028"), min_size=1, max_size=30),
    st.sampled_from(list(",.!?;:-_()[]{}'\"/\\@#")),
    st.text(st.sampled_from("你好世界日本語한국어"), min_size=1, max_size=5),
    st.sampled_from(["e\u0301", "\u0301", "ñ", "Å", "ﬁ", "①", "😀", "\x00", "\ufffd", "\u200b"]),
    st.sampled_from(["[SEP]", "[MASK]", "[CLS]", "[UNK]", "[SE", "P]", "<s>", "</s>", "<mask>"]),
    st.integers(0, 10**12).map(str),
    st.integers(1, 300).map(lambda n: "a" * n),  # added tokens: aa (chained), xyz, ab], [q
    st.integers(1, 60).map(lambda n: "xyz" * n),
    st.integers(95, 130).map(lambda n: "q" * n + "xyz"),
    st.sampled_from(["ab]", "[q", "[qqq", "aab]"]),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=5),
)
LONG_TEXT = st.lists(st.tuples(ATOMS, st.sampled_from(["", " ", " ", "\n"])), max_size=150).map(
    lambda parts: "".join(a + sep for a, sep in parts))


@PROPERTY
@given(text=LONG_TEXT, kind=st.sampled_from(sorted(TOKENIZERS)), max_length=st.sampled_from([8, 13, 24]),
       window=st.sampled_from([4, 9, 16, 50, 120]), side=st.sampled_from(["left", "right"]))
def test_cut_text_gives_the_ids_of_the_whole_text(text, kind, max_length, window, side):
    enc, whole = _encoders(kind, max_length, window, side)
    want = whole.encode(text).ids
    assert enc.encode(text) == want
    assert enc.encode_batch(["hi", text]) == [whole.encode("hi").ids, want]


def _with(base: str, add: Callable[[Tokenizer], None], **normalizer: object) -> Tokenizer:
    config = json.loads(base)
    config["normalizer"] = {**config["normalizer"], **normalizer} if normalizer else config["normalizer"]
    tok = Tokenizer.from_str(json.dumps(config))
    add(tok)
    return tok


def _cases() -> list[tuple[str, Callable[[], Tokenizer], str, int, str, int | None]]:
    """A reviewer's mismatches (December 7, 2026), each fixed: (name, tokenizer, text,
    max_length, side, window)."""
    from tokenizers import AddedToken

    from rlpredict.rl_tokenizers import tokenizer_path

    def bert(add: Callable[[Tokenizer], None], **normalizer: object) -> Callable[[], Tokenizer]:
        return lambda: _with(_bert(), add, **normalizer)

    single = bert(lambda t: t.add_special_tokens([AddedToken("[X]", single_word=True)]))
    dotted = bert(lambda t: t.add_tokens(["x.y"]))
    llama = tokenizer_path("llama3").read_text(encoding="utf-8")
    return [
        ("whole-word token beside a run of symbols", single, "[X]" + "€" * 300, 8, "right", None),
        ("whole-word token after an emoji run", single, "b " + "😀" * 300 + "[X]", 8, "left", None),
        ("whole-word token, a deleted character between", single, "[X]\u200b" + "a" * 300, 8, "right", None),
        ("normalized whole-word token", bert(lambda t: t.add_tokens([AddedToken("<y>", single_word=True)])),
         "©" * 300 + "<y>", 8, "left", None),
        ("normalized token over zero-width spaces", dotted, "b " * 5 + "x." + "\u200b" * 80 + "y" + " q" * 50, 8,
         "right", None),
        ("normalized token over combining marks", dotted, "b " * 5 + "x." + "\u0301" * 80 + "y" + " q" * 50, 8,
         "right", None),
        ("normalized token over zero-width spaces, left", dotted, "q " * 40 + "x" + "\u200b" * 80 + ".y" + " b" * 5,
         8, "left", None),
        ("a token that chains once lowercased", bert(lambda t: t.add_tokens(["aA"])), "a" * 201 + " b", 8, "left",
         None),
        ("a token that strips a run of spaces", lambda: _with(llama, lambda t: t.add_special_tokens(
            [AddedToken("<tool>", rstrip=True)])), "w " * 50 + "<tool>" + " " * 60 + "hello" + " b" * 6, 8, "left", None),
        ("a token whose normalized text is a word character",
         bert(lambda t: t.add_tokens(["\U0002F800"]), handle_chinese_chars=False),
         "a" * 50 + "\u4e3d" * 300 + "a" * 50, 8, "right", 16),
        ("max_length below the special tokens, left", bert(lambda t: None), "hello world " * 50, 2, "left", 16),
        ("max_length below the special tokens, right", bert(lambda t: None), "hello world " * 50, 1, "right", 16),
    ]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_added_tokens_and_short_lengths_keep_the_whole_texts_ids(case):
    _, make, text, max_length, side, window = case
    tok = make()
    whole = Tokenizer.from_str(tok.to_str())
    whole.no_padding()
    whole.enable_truncation(max_length, direction=side)
    assert TextEncoder(tok, max_length, side, window=window).encode(text) == whole.encode(text).ids


@PROPERTY
@given(messages=st.lists(st.tuples(st.sampled_from(["user", "assistant", "system"]), LONG_TEXT),
                         min_size=1, max_size=4),
       generator=st.one_of(st.none(), st.sampled_from(["gpt-4", "llama-3-70b", "claude 3 opus"])),
       mode=st.sampled_from(["last_user", "history"]), window=st.sampled_from([16, 64, None]))
def test_cut_model_input_gives_the_ids_of_the_whole_text(messages, generator, mode, window):
    spec = InputSpec(mode=mode, max_length=16, include_generator=True)
    text = build_text([{"role": r, "content": c} for r, c in messages], spec, generator)
    enc, whole = _encoders("bert", spec.max_length, window, spec.truncation_side)
    assert enc.encode(text) == whole.encode(text).ids


class _Recorder:
    """A tokenizer that records the length of every text it is given."""

    def __init__(self, tok: Tokenizer, seen: list[int]):
        self._tok, self._seen = tok, seen

    def encode(self, text: str, *args, **kwargs):
        self._seen.append(len(text))
        return self._tok.encode(text, *args, **kwargs)

    def encode_batch(self, texts, *args, **kwargs):
        self._seen.extend(map(len, texts))
        return self._tok.encode_batch(texts, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._tok, name)


@pytest.mark.parametrize("mode", ["last_user", "history"])
def test_long_prompts_are_cut_before_tokenizing(shipped, mode):
    spec = InputSpec(mode=mode, max_length=shipped.input_spec.max_length, include_generator=True)
    enc = TextEncoder(Tokenizer.from_file(str(SHIPPED / "tokenizer.json")), spec.max_length,
                      spec.truncation_side)
    seen: list[int] = []
    enc.tokenizer, enc._whole = _Recorder(enc.tokenizer, seen), _Recorder(enc._whole, seen)
    words = LONG.split()
    text = build_text([{"role": "user", "content": " ".join(words[i % len(words)] for i in range(40_000))}],
                      spec, "gpt-4")
    _, whole = _encoders("bert", spec.max_length, None, spec.truncation_side)
    assert enc.encode(text) == whole.encode(text).ids
    assert len(text) > 200_000 and max(seen) <= enc.window
    seen.clear()  # a text with few tokens per character: the window grows, up to the whole text
    sparse = "x " + " " * 50_000 + "y" if mode == "last_user" else "x" + " " * 50_000 + " y"
    assert enc.encode(sparse) == whole.encode(sparse).ids
    assert sum(seen) <= len(sparse) * 4 / 3 + enc.window


def _recorded(shipped) -> tuple[TextEncoder, Tokenizer, list[int]]:
    """The shipped bundle's text encoder, recording the length of every text it tokenizes; the
    whole-text tokenizer to compare with; the recorded lengths."""
    spec = shipped.input_spec
    enc = TextEncoder(Tokenizer.from_file(str(SHIPPED / "tokenizer.json")), spec.max_length,
                      spec.truncation_side)
    seen: list[int] = []
    enc.tokenizer, enc._whole = _Recorder(enc.tokenizer, seen), _Recorder(enc._whole, seen)
    return enc, _encoders("bert", spec.max_length, None, spec.truncation_side)[1], seen


def test_a_giant_word_is_not_tokenized_whole(shipped):
    """A 60 MB prompt with no space took 5 GB: its windows never filled max_length (the word is
    one [UNK]), so the whole text was tokenized. Such runs are now one character over
    WordPiece's limit before tokenizing, the same ids."""
    enc, whole, seen = _recorded(shipped)
    for text in ("a" * 5_000_000 + " hello world", "\U0001F600" * 2_000_000, "x é" + "Z9" * 2_000_000 + "é. ok"):
        want = whole.encode(text[:2000] + text[-2000:] if text.startswith("x") else text).ids
        assert enc.encode(text) == enc.encode_batch([text])[0] == want
    assert max(seen) <= 4 * enc.window


def test_only_a_text_whose_first_window_does_not_settle_is_scanned_whole(shipped):
    """``_shorten`` (a regex over the whole text) runs on the slow path alone. Was: on every text
    longer than a window: 297 ms of a 10 MB prose prompt, holding the GIL, for the same ids."""
    enc, whole, _ = _recorded(shipped)
    scanned: list[int] = []
    shorten = enc._shorten
    enc._shorten = lambda text: scanned.append(len(text)) or shorten(text)  # type: ignore[method-assign]
    prose, giant = LONG * 10, "a" * 200_000 + " hello world"
    assert enc.encode(prose) == whole.encode(prose).ids and scanned == []
    got = enc.encode_batch([prose, "hi", giant])
    assert got == [whole.encode(prose).ids, whole.encode("hi").ids, whole.encode(giant).ids]
    assert scanned == [len(giant)]


@PROPERTY
@given(text=LONG_TEXT, side=st.sampled_from(["left", "right"]))
def test_squeezed_text_gives_the_ids_of_the_whole_text(text, side):
    enc, whole = _encoders("bert", 24, None, side)
    assert whole.encode(enc._squeeze(text)).ids == whole.encode(text).ids


def test_no_squeeze_where_an_added_token_could_change():
    """An added token that matches whole words only, or holds a character the squeeze removes,
    could be made or unmade by it: such tokenizers are not squeezed (a reviewer's mismatch)."""
    from tokenizers import AddedToken

    tok = Tokenizer.from_str(_tokenizer_json("bert"))
    tok.add_tokens([AddedToken("foo", single_word=True, normalized=False)])
    enc = TextEncoder(tok, 24, "right")
    whole = Tokenizer.from_str(tok.to_str())
    whole.enable_truncation(24)
    text = "x\u0345" + "\u200b" * 20_000 + "foo"
    assert enc.encode(text) == whole.encode(text).ids and not enc._squeezable


def test_runs_of_blank_and_deleted_characters_are_not_tokenized_whole(shipped):
    """8 MB of zero-width spaces took 7 s and 1 GB (windows of them hold no token, so the whole
    text was tokenized); runs of characters BERT's normalizer deletes or makes a space are cut
    to one first, the same ids."""
    enc, whole, seen = _recorded(shipped)
    for text in ("\u200b" * 400_000 + " hello", "hi" + " \n\t\u3000" * 300_000 + "there", "\u0301\x00" * 300_000):
        assert enc.encode(text) == whole.encode(text).ids
    assert max(seen) < 400_000  # never the whole text


def test_predict_one_on_a_megabyte_prompt_tokenizes_a_window(shipped):
    text = LONG * 100  # 3 MB
    assert len(text) >= 3_000_000
    assert _key(shipped.predict_one(text)) == _key(shipped.predict([text, "hi"])[0])
    assert shipped.encode([text]) == shipped.encode([text[:shipped.encoder.window * 2]])


# ---- threads ---------------------------------------------------------------------------------
def test_lone_prompts_fall_back_to_one_thread_if_thread_counts_ever_differ(monkeypatch):
    monkeypatch.setattr(Predictor, "_same_bits", lambda self, a, b: False)
    p = Predictor.load(SHIPPED, threads=2)
    assert p._lone is p._session


@pytest.mark.parametrize("threads", [0, -1])
def test_threads_must_be_positive(threads):
    with pytest.raises(ValueError, match="threads must be a whole number >= 1"):
        Predictor.load(SHIPPED, threads=threads)
    with pytest.raises(ValueError, match="batch_size"):
        Predictor.load(SHIPPED, batch_size=0)


def test_threads_are_capped_at_the_usable_cores():
    cores = usable_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    assert Predictor.load(SHIPPED, threads=10**6).threads == cores
    assert Predictor.load(SHIPPED).threads == cores
    assert Predictor.load(SHIPPED, threads=1).threads == 1


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
@pytest.mark.parametrize("threads", [1, 10**6])
def test_no_more_threads_than_cores(threads):
    """Bulk calls compute on the caller + ``threads - 1`` helpers (one ORT thread each); a lone
    prompt on ``threads`` ORT threads (the caller + ``threads - 1``). With 1 thread, none start."""
    code = f"""
        import os
        from rlpredict.serve.runtime import Predictor
        count = lambda: len(os.listdir("/proc/self/task"))
        before = count()
        p = Predictor.load({str(SHIPPED)!r}, threads={threads})
        p.predict(["hello there"] * 50)
        p.predict_one("hello")
        print(p.threads, count() - before)
    """
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    used, started = map(int, res.stdout.split())
    assert used == min(threads, usable_cores())
    assert started <= 2 * (used - 1)


def test_a_long_text_is_tokenized_with_the_gil_released(shipped):
    """A long word of a non-ASCII letter is tokenized whole (no window settles, no squeeze): the
    single-text call held the GIL all along, and a reviewer's 3.8 MB one stopped the API
    server's event loop for 4 s around the middleware. Another thread now runs meanwhile."""
    import threading
    import time

    enc = TextEncoder(Tokenizer.from_file(str(SHIPPED / "tokenizer.json")), shipped.input_spec.max_length,
                      shipped.input_spec.truncation_side)
    text = "\u00e9" * 1_000_000
    stamps: list[float] = []
    done = threading.Event()

    def tick() -> None:
        while not done.is_set():
            time.sleep(0.001)
            stamps.append(time.perf_counter())

    t = threading.Thread(target=tick)
    t.start()
    time.sleep(0.01)
    t0 = time.perf_counter()
    ids = enc.encode(text)
    t1 = time.perf_counter()
    done.set()
    t.join()
    inside = [t0, *(s for s in stamps if t0 < s < t1), t1]
    longest = max(b - a for a, b in itertools.pairwise(inside))
    whole = Tokenizer.from_file(str(SHIPPED / "tokenizer.json"))
    whole.enable_truncation(shipped.input_spec.max_length)
    assert ids == whole.encode(text).ids
    assert longest < max(0.5 * (t1 - t0), 0.05), (longest, t1 - t0)  # held: one gap, the whole call
