"""Train/test splits by group (conversation or prompt id), never by row.

A group goes to the test side when a salted hash of its id falls below ``test_frac``: stable
across runs and machines, independent of row order, and no prompt lands on both sides.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def in_test(group: str, test_frac: float, seed: int = 0) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{group}".encode()).digest()[:8], "big")
    return h / 2**64 < test_frac


def split_by_group(items: Sequence[T], test_frac: float = 0.1, seed: int = 0,
                   key=lambda s: s.group) -> tuple[list[T], list[T]]:
    """(train, test) with every group wholly on one side."""
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
    train: list[T] = []
    test: list[T] = []
    for s in items:
        (test if in_test(key(s), test_frac, seed) else train).append(s)
    return train, test


def rows_sha256(samples: Sequence[Any]) -> str:
    """One sha256 over a set of samples (source, group, RL, generator and context of each; their
    order does not count): which rows the encoder trained on, so that ``rlpredict stack`` can
    tell whether a recipe reproduces them. A row with no id has a group made from its location
    (file path as given, line), so such data must be named the same way in both recipes."""
    keys = sorted(hashlib.sha256(json.dumps([s.source, s.group, s.rl_tokens, s.generator, s.messages], sort_keys=True,
                                            ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()
                  for s in samples)
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def recorded_split(manifest: object) -> dict:
    """The train/test split a bundle's manifest recorded (``{test_frac, seed}``; {} if none):
    its evaluation's, else the one ``rlpredict export`` copied from training."""
    if not isinstance(manifest, dict):
        return {}
    split = (manifest.get("evaluation") or {}).get("split") or manifest.get("training_split") or {}
    return split if isinstance(split, dict) else {}


def check_same_split(recorded: dict, given: dict[str, tuple[str, object]], fix: str) -> None:
    """``ValueError`` if a split setting given (``name -> (where it was given, value)``, value
    None: not given) differs from the one the bundle recorded: the held-out side would then hold
    rows the model trained on. ``fix`` ends the message."""
    for name, (where, value) in given.items():
        if value is not None and recorded.get(name) is not None and value != recorded[name]:
            raise ValueError(f"{where} {value} differs from the split the bundle recorded ({name} "
                             f"{recorded[name]}): its held-out side would hold training rows; {fix}")
