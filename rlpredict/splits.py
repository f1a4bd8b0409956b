"""Train/test splits by group, never by row.

A group goes to the test side when a salted hash of its key falls below ``test_frac``: stable
across runs and machines, independent of row order, and no group lands on both sides. The
rule (``SPLIT_RULES``) says what a group is:

- ``id``: the log's own id (``conversation_id``, ``prompt_id``; a row with none, a hash of
  its context: of the whole conversation for a ShareGPT row).
  A log that holds one conversation under several ids puts copies on both sides: 14.8% of the
  shipped bundle's ShareGPT held-out rows copy a training row (``benchmarks/split_leak.py``).
- ``copies``: the ``id`` groups, joined wherever one row (its context and response) appears in
  two of them; a joined group is held out only if each of its ids would be. So where a log holds
  no copies the split is the ``id`` split, row for row, and rows added to a log can move rows to
  the training side, never off it: a model's training rows stay there when ``eval`` or
  ``calibrate`` reads more data than the training did. The default for new trainings; a split
  that records no rule (every bundle before this one existed) is an ``id`` split.

As data shrinks, a joined group can come apart: given a log without the training-side copy, an
id the join kept on the training side would be held out. So a training records those ids
(``pinned``: ``pin_key`` of each id that ``in_test`` holds out but the join trained), and a
split given them (``split_by_group(..., pinned=...)``) keeps them on the training side whatever
data it reads. Ids are recorded as short digests, never as written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

SPLIT_RULES = ("id", "copies")
#: the rule of a split that records none
RECORDLESS_RULE = "id"
#: the largest test fraction a training takes (``TrainConfig``), and so the command lines that
#: name a training's split
MAX_TEST_FRAC = 0.9


def in_test(group: str, test_frac: float, seed: int = 0) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{group}".encode()).digest()[:8], "big")
    return h / 2**64 < test_frac


def group_keys(samples: Sequence[Any], rule: str = RECORDLESS_RULE) -> list[str]:
    """Each sample's group under ``rule`` (see the module docstring), named by its smallest id."""
    if rule == "id":
        return [s.group for s in samples]
    if rule != "copies":
        raise ValueError(f"split rule {rule!r}: choose from {', '.join(SPLIT_RULES)}")
    # union-find over ids (0, id) and rows (1, digest); a root is its set's smallest node, so
    # an id, the smallest of the set's ids
    parent: dict[tuple[int, str], tuple[int, str]] = {}

    def root(x: tuple[int, str]) -> tuple[int, str]:
        while (up := parent.setdefault(x, x)) != x:
            parent[x] = parent.setdefault(up, up)  # halve the path
            x = parent[x]
        return x

    for s in samples:
        a, b = root((0, s.group)), root((1, row_digest(s)))
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [root((0, s.group))[1] for s in samples]


def row_digest(sample: Any) -> str:
    """What ``copies`` joins rows by: a digest of one row's context and response. A sample that
    carries its own (``row_digest`` set: ``rlpredict calibrate``'s rows, which keep no text)
    gives it."""
    known = getattr(sample, "row_digest", None)
    if known is not None:
        return known
    return hashlib.sha256(json.dumps([sample.messages, sample.response], sort_keys=True, ensure_ascii=False)
                          .encode("utf-8", "surrogatepass")).hexdigest()


def pin_key(group: str) -> str:
    """How a split record names a group's id (``pinned``): 16 hex digits of its sha256."""
    return hashlib.sha256(group.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def split_with_pins(items: Sequence[T], test_frac: float = 0.1, seed: int = 0, rule: str = RECORDLESS_RULE,
                    pinned: Collection[str] = ()) -> tuple[list[T], list[T], list[str]]:
    """``split_by_group``'s (train, test), and the ``pin_key`` of each id that ``in_test`` holds
    out but that trains here (joined to a training-side id, or in ``pinned``), sorted: what a
    training records so that a later split of less data keeps them on its side."""
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
    keys = group_keys(items, rule)
    by_hash = {g for g in {s.group for s in items} if in_test(g, test_frac, seed)}  # type: ignore[attr-defined]
    pins = frozenset(pinned)
    held = {g for g in by_hash if not pins or pin_key(g) not in pins}
    if rule != "id":
        for s, key in zip(items, keys, strict=True):
            if s.group not in held:  # type: ignore[attr-defined]
                held.discard(key)  # a training-side id trains its whole group
    train: list[T] = []
    test: list[T] = []
    for s, key in zip(items, keys, strict=True):
        (test if key in held else train).append(s)
    trained = {s.group for s in train}  # type: ignore[attr-defined]
    return train, test, sorted(pin_key(g) for g in by_hash & trained)


def split_by_group(items: Sequence[T], test_frac: float = 0.1, seed: int = 0,
                   rule: str = RECORDLESS_RULE, pinned: Collection[str] = ()) -> tuple[list[T], list[T]]:
    """(train, test) with every group (``group_keys`` under ``rule``) wholly on one side; a
    group of several ids (``copies``) is held out only if each id is; an id whose ``pin_key``
    is in ``pinned`` (a training's record) trains."""
    train, test, _ = split_with_pins(items, test_frac, seed, rule, pinned)
    return train, test


def rows_sha256(samples: Sequence[Any]) -> str:
    """One sha256 over a set of samples (source, group, RL, generator and context of each; their
    order does not count): which rows the encoder trained on, so that ``rlpredict stack`` can
    tell whether a recipe reproduces them."""
    keys = sorted(hashlib.sha256(json.dumps([s.source, s.group, s.rl_tokens, s.generator, s.messages], sort_keys=True,
                                            ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()
                  for s in samples)
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def recorded_split(manifest: object) -> dict:
    """The train/test split a bundle's manifest recorded (``{test_frac, seed, rule}``; {} if
    none): its evaluation's, else the one ``rlpredict export`` copied from training (first, if
    the evaluation scored every row: ``eval --split all``), with the training's ``pinned`` ids
    where it recorded them. A record without a rule gets ``RECORDLESS_RULE``; an unknown rule is
    a ``ValueError``."""
    if not isinstance(manifest, dict):
        return {}
    evaluated = (manifest.get("evaluation") or {}).get("split")
    trained = manifest.get("training_split")
    if isinstance(evaluated, dict) and evaluated.get("mode") == "all" and trained:
        evaluated = None
    split = evaluated or trained or {}
    if not isinstance(split, dict) or not split:
        return {}
    rule = split.get("rule", RECORDLESS_RULE)
    if rule not in SPLIT_RULES:
        raise ValueError(f"the bundle's manifest records split rule {rule!r}, which this version does not "
                         f"know ({', '.join(SPLIT_RULES)}): use the rlpredict that made the bundle")
    pinned = split.get("pinned") or (trained.get("pinned") if isinstance(trained, dict) else None)
    return {**split, "rule": rule, **({"pinned": pinned} if pinned else {})}


def check_split_record(split: dict, field: str) -> None:
    """``ValueError("FIELD.KEY: ...")`` for a recorded split (``rlpredict train``'s summary, a
    bundle's ``training_split`` or ``evaluation.split``) whose values are of the wrong kind: a
    ``test_frac`` in (0, 1), a whole ``seed`` >= 0, a ``rule`` named by a string, a
    ``train_rows_sha256`` of 64 hex digits, ``pinned`` ids of 16. Absent keys pass (the readers' defaults)."""
    frac, seed, rule, rows, pinned = (split.get(k) for k in ("test_frac", "seed", "rule", "train_rows_sha256",
                                                              "pinned"))
    if frac is not None and (isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 < frac < 1):
        raise ValueError(f"{field}.test_frac: must be a number in (0, 1), got {frac!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"{field}.seed: must be a whole number >= 0, got {seed!r}")
    if rule is not None and not isinstance(rule, str):
        raise ValueError(f"{field}.rule: must be one of {', '.join(SPLIT_RULES)}, got {rule!r}")
    if rows is not None and not _hex(rows, 64):
        raise ValueError(f"{field}.train_rows_sha256: must be 64 lowercase hex digits, got {rows!r}")
    if pinned is not None:
        bad = [pinned] if not isinstance(pinned, list) else [k for k in pinned if not _hex(k, 16)][:1]
        if bad:  # (a list: was, a null entry passed as "none bad")
            raise ValueError(f"{field}.pinned: must be a list of ids as 16 lowercase hex digits, got {bad[0]!r}")


def _hex(value: object, digits: int) -> bool:
    return isinstance(value, str) and len(value) == digits and all(c in "0123456789abcdef" for c in value)


def check_same_split(recorded: dict, given: dict[str, tuple[str, object]], fix: str) -> None:
    """``ValueError`` if a split setting given (``name -> (where it was given, value)``, value
    None: not given) differs from the one the bundle recorded: the held-out side would then hold
    rows the model trained on. ``fix`` ends the message."""
    for name, (where, value) in given.items():
        if value is not None and recorded.get(name) is not None and value != recorded[name]:
            raise ValueError(f"{where} {value} differs from the split the bundle recorded ({name} "
                             f"{recorded[name]}): its held-out side would hold training rows; {fix}")
