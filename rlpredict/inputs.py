"""What text the predictor sees for a request: the input spec and the text builder.

Shared by training (``rlpredict.train.trainer``) and the torch-free runtime, so that a model is served
exactly on the text it was trained on. Pure Python.

Two modes:
- ``last_user``: the last user message; long messages keep their head (truncation on the right).
- ``history``: the conversation before the response, one ``role: content`` line per message;
  long histories keep their tail, the most recent turns (truncation on the left).
With ``include_generator`` the served model's name is added on the kept side, so one predictor
can serve logs that pool several LLMs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from rlpredict.records import names_nothing

Mode = Literal["last_user", "history"]
#: Longest input an encoder of ours reads (BERT-style encoders stop at 512; some go to 8192).
MAX_LENGTH = 8192
LEXICAL_TEXT_CAP = 4000  # characters of the kept side that lexical models (TF-IDF) see
Message = Mapping[str, str]


@dataclass(frozen=True)
class InputSpec:
    mode: Mode = "last_user"
    max_length: int = 128
    include_generator: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("last_user", "history"):
            raise ValueError(f"input mode must be 'last_user' or 'history', got {self.mode!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) \
                or not 8 <= self.max_length <= MAX_LENGTH:
            raise ValueError(f"max_length must be an integer in [8, {MAX_LENGTH}] tokens, got {self.max_length!r}")
        if not isinstance(self.include_generator, bool):
            raise ValueError(f"include_generator must be true or false, got {self.include_generator!r}")

    @property
    def truncation_side(self) -> Literal["left", "right"]:
        return "left" if self.mode == "history" else "right"

    def to_dict(self) -> dict:
        return {**asdict(self), "truncation_side": self.truncation_side}

    @classmethod
    def from_dict(cls, d: Mapping) -> InputSpec:
        return cls(mode=d.get("mode", "last_user"), max_length=d.get("max_length", 128),
                   include_generator=d.get("include_generator", False))


def last_user_message(messages: Sequence[Message]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return m.get("content") or ""
    return ""


def build_text(messages: Sequence[Message], spec: InputSpec, generator: str | None = None) -> str:
    """The predictor's input for a request whose context (before the response) is ``messages``;
    a ``generator`` of blank space names no model (``records.names_nothing``), as the readers
    take it (was: "model:    " from the Python API, where the CLI said "unknown")."""
    name = "unknown" if names_nothing(generator) else generator
    if spec.mode == "last_user":
        text = last_user_message(messages)
        if spec.include_generator:
            text = f"model: {name}\n{text}"
        return text
    lines = [f"{m.get('role', 'user')}: {m.get('content') or ''}" for m in messages]
    if spec.include_generator:
        lines.append(f"model: {name}")
    return "\n".join(lines)


def lexical_text(text: str, spec: InputSpec, cap: int = LEXICAL_TEXT_CAP) -> str:
    """``text`` (a ``build_text`` result) cut to ``cap`` characters on the side the spec keeps:
    the TF-IDF baselines' input and the bundle's lexical head's."""
    return text[-cap:] if spec.truncation_side == "left" else text[:cap]


def messages_from_prompt(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]
