"""The bundle's optional lexical head: TF-IDF + logistic regression, stacked with the encoder.

A bundle made by ``rlpredict stack`` carries ``lexical.npz`` and a ``lexical`` manifest section.
The runtime then predicts, for each prompt,

1. the encoder's bucket probabilities ``p_enc`` (the ONNX model, as without the head);
2. TF-IDF + multinomial logistic regression probabilities ``p_lex`` of the prompt's text cut to
   ``text_cap`` characters (``rlpredict.inputs.lexical_text``): word unigrams and bigrams of the
   lower-cased text (scikit-learn's ``TfidfVectorizer`` rules: tokens are runs of two or more
   word characters; ``1 + log(tf)`` times the fitted idf; L2-normalised);
3. the stacker's logits ``A @ [log p_enc, log p_lex] + c`` (a multinomial logistic regression
   fitted on rows neither model trained on; its feature standardisation is folded into ``A``),
   which replace the encoder's logits everywhere downstream (softmax, bucket, point, reservation,
   calibrated quantiles).

Pure Python + numpy; no scikit-learn or pickle at serving time (``np.load`` with
``allow_pickle=False``). A prompt's cost is one regex pass over at most ``text_cap`` characters
and a gather of its terms' weight rows. ``export_tfidf`` (training side) turns a fitted
scikit-learn pipeline into these arrays; tests check that the two give the same probabilities.
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from rlpredict.inputs import InputSpec, lexical_text

FORMAT = "rlpredict.lexical/1"
FILE = "lexical.npz"
TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn's default token_pattern
EPS = 1e-9  # probabilities are clipped here before the stacker takes logs
ARRAYS = ("vocab_utf8", "idf", "coef", "intercept", "classes", "stack_coef", "stack_intercept")


@dataclass(frozen=True)
class LexicalHead:
    """The arrays of ``lexical.npz`` and the rules of the manifest's ``lexical`` section."""

    vocabulary: dict[str, int]
    idf: np.ndarray  # (V,) float64
    coef: np.ndarray  # (V, C) float64: column c is class ``classes[c]``'s weight of term v
    intercept: np.ndarray  # (C,)
    classes: np.ndarray  # (C,) bucket index of each TF-IDF class (buckets absent in training: none)
    stack_coef: np.ndarray  # (K, 2K): logits = stack_coef @ [log p_enc, log p_lex] + stack_intercept
    stack_intercept: np.ndarray  # (K,)
    n_buckets: int
    spec: InputSpec  # the bundle's input spec: which side of a long text is kept
    text_cap: int
    ngram_max: int = 2

    @classmethod
    def load(cls, folder: str | Path, section: dict, n_buckets: int, spec: InputSpec) -> LexicalHead:
        """Read and check the head named by a manifest's ``lexical`` section (raises ValueError)."""
        if section.get("format") != FORMAT:
            raise ValueError(f"lexical.format: expected {FORMAT!r}, got {section.get('format')!r}")
        tf = section.get("tfidf")
        if not isinstance(tf, dict):
            raise ValueError("lexical.tfidf: expected an object")
        rules = {"token_pattern": TOKEN_PATTERN, "lowercase": True, "sublinear_tf": True, "norm": "l2"}
        for key, want in rules.items():
            if tf.get(key) != want:
                raise ValueError(f"lexical.tfidf.{key}: this runtime supports {want!r}, got {tf.get(key)!r}")
        ngrams = tf.get("ngram_range")
        if not (isinstance(ngrams, list) and len(ngrams) == 2 and ngrams[0] == 1 and ngrams[1] in (1, 2)):
            raise ValueError(f"lexical.tfidf.ngram_range: this runtime supports [1, 1] or [1, 2], got {ngrams!r}")
        cap = section.get("text_cap")
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
            raise ValueError(f"lexical.text_cap: expected a positive integer, got {cap!r}")
        path = Path(folder) / str(section.get("file", FILE))
        if path.is_file() and not zipfile.is_zipfile(path):
            raise ValueError(f"{path.name}: not a .npz archive")
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [a for a in ARRAYS if a not in z.files]
                if missing:
                    raise ValueError(f"{path.name}: missing arrays {missing}")
                a = {}
                for name in ARRAYS:
                    try:
                        a[name] = z[name]
                    except ValueError as e:  # an object array (was: numpy's words, naming no file)
                        raise ValueError(f"{path.name}: {name}: {e}") from None
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path.name}: not a readable .npz file ({e})") from None
        for name in ARRAYS:  # each array's kind (was: a string idf, "internal error"; bytes that are
            # not UTF-8 or string classes, numpy's or the codec's words naming no file)
            want = "u" if name == "vocab_utf8" else "iu" if name == "classes" else "fiu"
            if a[name].dtype.kind not in want or (name == "vocab_utf8" and a[name].dtype.itemsize != 1):
                raise ValueError(f"{path.name}: {name} holds {a[name].dtype} values, expected "
                                 f"{'bytes (uint8)' if name == 'vocab_utf8' else 'integers' if name == 'classes' else 'numbers'}")
        try:
            terms = a["vocab_utf8"].tobytes().decode("utf-8").split("\n") if a["vocab_utf8"].size else []
        except UnicodeDecodeError as e:
            raise ValueError(f"{path.name}: vocab_utf8 is not UTF-8 (byte {e.start})") from None
        v, k = len(terms), n_buckets
        c = a["classes"].astype(np.int64)
        shapes = {"idf": (v,), "coef": (v, len(c)), "intercept": (len(c),), "stack_coef": (k, 2 * k),
                  "stack_intercept": (k,)}
        for name, shape in shapes.items():
            if a[name].shape != shape:
                raise ValueError(f"{path.name}: {name} has shape {a[name].shape}, expected {shape} "
                                 f"({v} terms, {len(c)} classes, {k} buckets)")
        if len(c) < 2 or len(set(c.tolist())) != len(c) or c.min() < 0 or c.max() >= k:
            raise ValueError(f"{path.name}: classes must be 2 or more distinct bucket indices < {k}, got {c.tolist()}")
        for name in ("idf", "coef", "intercept", "stack_coef", "stack_intercept"):
            if not np.all(np.isfinite(a[name])):
                raise ValueError(f"{path.name}: {name} has non-finite values")
        vocab = dict(zip(terms, range(v), strict=True))
        if len(vocab) != v:
            raise ValueError(f"{path.name}: the vocabulary has repeated terms")
        return cls(vocab, a["idf"].astype(np.float64), a["coef"].astype(np.float64),
                   a["intercept"].astype(np.float64), c, a["stack_coef"].astype(np.float64),
                   a["stack_intercept"].astype(np.float64), k, spec, cap, int(ngrams[1]))

    # ---- per prompt --------------------------------------------------------------------------
    def terms(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Column indices and L2-normalised sublinear TF-IDF weights of ``text``'s known terms
        (``text`` already cut by ``lexical_text``)."""
        tokens = _TOKEN.findall(text.lower())
        if self.ngram_max == 2:
            tokens += [f"{a} {b}" for a, b in pairwise(tokens)]
        counts: dict[int, int] = {}
        get = self.vocabulary.get
        for t in tokens:
            j = get(t)
            if j is not None:
                counts[j] = counts.get(j, 0) + 1
        if not counts:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        cols = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        tf = np.fromiter((1.0 + math.log(n) for n in counts.values()), dtype=np.float64, count=len(counts))
        w = tf * self.idf[cols]
        return cols, w / math.sqrt(float(w @ w))

    def lexical_probs(self, model_texts: Sequence[str]) -> np.ndarray:
        """``p_lex`` (n, K) of the model's input texts (``build_text``; cut here to ``text_cap``
        characters): the TF-IDF model's bucket probabilities (0 for buckets it never saw)."""
        out = np.zeros((len(model_texts), self.n_buckets))
        for i, t in enumerate(model_texts):
            cols, w = self.terms(lexical_text(t, self.spec, self.text_cap))
            z = w @ self.coef[cols] + self.intercept
            z = np.exp(z - z.max())
            out[i, self.classes] = z / z.sum()
        return out

    def stack(self, enc_logits: np.ndarray, model_texts: Sequence[str]) -> np.ndarray:
        """The stacked logits (n, K) from the encoder's logits and the model's input texts."""
        z = enc_logits - enc_logits.max(axis=1, keepdims=True)
        p_enc = np.exp(z, dtype=np.float32)  # the encoder's probabilities exactly as the runtime's
        p_enc /= p_enc.sum(axis=1, keepdims=True)  # ``from_logits`` gives them (the stacker's fit)
        x = np.hstack([_log_clipped(p_enc.astype(np.float64)), _log_clipped(self.lexical_probs(model_texts))])
        # one row at a time: a matrix product's kernel (and so its last bits) depends on the row
        # count, and a prompt's result must not depend on its batch
        z = np.empty((len(x), self.stack_coef.shape[0]))
        for i, row in enumerate(x):
            z[i] = self.stack_coef @ row
        return z + self.stack_intercept


_TOKEN = re.compile(TOKEN_PATTERN)


def _log_clipped(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, None)
    return np.log(p / p.sum(axis=1, keepdims=True))


# ---- training side: scikit-learn -> arrays --------------------------------------------------------
def export_arrays(vectorizer: Any, logreg: Any, stack_coef: np.ndarray, stack_intercept: np.ndarray,
                  n_buckets: int) -> dict[str, np.ndarray]:
    """The ``lexical.npz`` arrays of a fitted ``TfidfVectorizer`` (the rules ``load`` checks) and
    ``LogisticRegression`` over bucket labels, plus the stacker's folded coefficients."""
    rules = tfidf_rules(vectorizer)
    want = {"token_pattern": TOKEN_PATTERN, "lowercase": True, "sublinear_tf": True, "norm": "l2",
            "analyzer": "word", "strip_accents": None, "stop_words": None, "use_idf": True,
            "binary": False, "custom_preprocessor_or_tokenizer": False}
    bad = {k: rules[k] for k, v in want.items() if rules[k] != v}
    if bad or rules["ngram_range"] not in ([1, 1], [1, 2]):
        raise ValueError(f"the lexical runtime supports TfidfVectorizer{want} with ngram_range (1, 1) or "
                         f"(1, 2); this one has {bad or rules['ngram_range']}")
    terms = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.__getitem__)
    coef, intercept = np.asarray(logreg.coef_, dtype=np.float64), np.asarray(logreg.intercept_, dtype=np.float64)
    if coef.shape[0] == 1:  # binary: p1 = sigmoid(z) = softmax([0, z])[1]
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    return {"vocab_utf8": np.frombuffer("\n".join(terms).encode("utf-8"), dtype=np.uint8),
            "idf": np.asarray(vectorizer.idf_, dtype=np.float32),  # float32: half the bytes, and
            "coef": np.ascontiguousarray(coef.T, dtype=np.float32),  # probabilities move < 1e-6
            "intercept": intercept,
            "classes": np.asarray(logreg.classes_, dtype=np.int64),
            "stack_coef": np.asarray(stack_coef, dtype=np.float64).reshape(n_buckets, 2 * n_buckets),
            "stack_intercept": np.asarray(stack_intercept, dtype=np.float64).reshape(n_buckets)}


def tfidf_rules(vectorizer: Any) -> dict[str, Any]:
    """The manifest's ``lexical.tfidf`` record of a fitted ``TfidfVectorizer``."""
    return {"token_pattern": vectorizer.token_pattern, "lowercase": bool(vectorizer.lowercase),
            "sublinear_tf": bool(vectorizer.sublinear_tf), "norm": vectorizer.norm,
            "ngram_range": list(vectorizer.ngram_range), "analyzer": vectorizer.analyzer,
            "strip_accents": vectorizer.strip_accents, "stop_words": vectorizer.stop_words,
            "use_idf": bool(vectorizer.use_idf), "binary": bool(vectorizer.binary),
            "custom_preprocessor_or_tokenizer": vectorizer.preprocessor is not None or vectorizer.tokenizer is not None,
            "vocabulary": len(vectorizer.vocabulary_)}
