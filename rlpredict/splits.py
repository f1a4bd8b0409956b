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
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")

SPLIT_RULES = ("id", "copies")
#: the rule of a split that records none
RECORDLESS_RULE = "id"


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
        row = hashlib.sha256(json.dumps([s.messages, s.response], sort_keys=True, ensure_ascii=False)
                             .encode("utf-8", "surrogatepass")).hexdigest()
        a, b = root((0, s.group)), root((1, row))
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [root((0, s.group))[1] for s in samples]


def split_by_group(items: Sequence[T], test_frac: float = 0.1, seed: int = 0,
                   rule: str = RECORDLESS_RULE) -> tuple[list[T], list[T]]:
    """(train, test) with every group (``group_keys`` under ``rule``) wholly on one side; a
    group of several ids (``copies``) is held out only if each id is."""
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
    keys = group_keys(items, rule)
    held = {g for g in {s.group for s in items} if in_test(g, test_frac, seed)}  # type: ignore[attr-defined]
    if rule != "id":
        for s, key in zip(items, keys, strict=True):
            if s.group not in held:  # type: ignore[attr-defined]
                held.discard(key)  # a training-side id trains its whole group
    train: list[T] = []
    test: list[T] = []
    for s, key in zip(items, keys, strict=True):
        (test if key in held else train).append(s)
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
    the evaluation scored every row: ``eval --split all``). A record without a rule gets
    ``RECORDLESS_RULE``; an unknown rule is a ``ValueError``."""
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
    return {**split, "rule": rule}


def check_split_record(split: dict, field: str) -> None:
    """``ValueError("FIELD.KEY: ...")`` for a recorded split (``rlpredict train``'s summary, a
    bundle's ``training_split`` or ``evaluation.split``) whose values are of the wrong kind: a
    ``test_frac`` in (0, 1), a whole ``seed`` >= 0, a ``rule`` named by a string, a
    ``train_rows_sha256`` of 64 hex digits. Absent keys pass (the readers' defaults)."""
    frac, seed, rule, rows = (split.get(k) for k in ("test_frac", "seed", "rule", "train_rows_sha256"))
    if frac is not None and (isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 < frac < 1):
        raise ValueError(f"{field}.test_frac: must be a number in (0, 1), got {frac!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"{field}.seed: must be a whole number >= 0, got {seed!r}")
    if rule is not None and not isinstance(rule, str):
        raise ValueError(f"{field}.rule: must be one of {', '.join(SPLIT_RULES)}, got {rule!r}")
    if rows is not None and not (isinstance(rows, str) and len(rows) == 64
                                 and all(c in "0123456789abcdef" for c in rows)):
        raise ValueError(f"{field}.train_rows_sha256: must be 64 lowercase hex digits, got {rows!r}")


def check_same_split(recorded: dict, given: dict[str, tuple[str, object]], fix: str) -> None:
    """``ValueError`` if a split setting given (``name -> (where it was given, value)``, value
    None: not given) differs from the one the bundle recorded: the held-out side would then hold
    rows the model trained on. ``fix`` ends the message."""
    for name, (where, value) in given.items():
        if value is not None and recorded.get(name) is not None and value != recorded[name]:
            raise ValueError(f"{where} {value} differs from the split the bundle recorded ({name} "
                             f"{recorded[name]}): its held-out side would hold training rows; {fix}")
