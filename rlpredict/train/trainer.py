"""Fine-tune an encoder to classify a prompt's response length into buckets, on ``transformers.Trainer``.

Full fine-tuning or LoRA (peft); cross-entropy or an ordinal-aware loss; class re-weighting
against collapse onto the common buckets; length-grouped global batches to cut padding. The
Trainer brings the device (GPU when present, bf16 where supported), several processes
(``torchrun`` / ``accelerate launch``), checkpoints and resume, held-out evaluation (MAE,
Kendall's tau) with early stopping, and progress. The output folder is a plain Hugging Face
model (LoRA merged) plus ``rlpredict.json`` and ``training_summary.json``; checkpoints go to a
separate folder (``OUT-checkpoints`` by default).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    EvalPrediction,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import TrainOutput
from transformers.utils import logging as hf_logging

from rlpredict.buckets import MAX_TOKENS, BucketScheme
from rlpredict.data import LoadReport, Sample, attach_rl, load_samples
from rlpredict.inputs import build_text
from rlpredict.outputs import (
    OutputError,
    check_new_dir,
    check_paths,
    mark_owned,
    naming,
    output_dir,
    plain_modes,
    resolved,
    write_text_atomic,
)
from rlpredict.serve.runtime import usable_cores
from rlpredict.splits import rows_sha256, split_with_pins
from rlpredict.train.config import RESUMABLE_CHANGES, TrainConfig
from rlpredict.train.encoders import check_loaded, check_positions, encoder_path, token_ids
from rlpredict.train.metrics import rl_metrics
from rlpredict.train.model_meta import TRAIN_TOOL, ModelMeta


@dataclass
class Prepared:
    train: list[Sample]
    test: list[Sample]
    scheme: BucketScheme
    report: LoadReport
    training_side: int = 0  # samples on the training side of the split, before the subsample
    pinned: list[str] = field(default_factory=list)  # the split's trained ids that in_test holds out


def make_scheme(spec: str | list[float], train_rl: np.ndarray, reserve_quantile: float) -> BucketScheme:
    if isinstance(spec, str) and spec.startswith("quantile:"):
        base = BucketScheme.from_quantiles(train_rl, int(spec.split(":", 1)[1]))
    else:
        base = BucketScheme.from_spec(spec)
    return base.fit(train_rl, reserve_quantile)


def prepare(cfg: TrainConfig) -> Prepared:
    """Load, count RL, split by group, subsample the training side, fit the bucket scheme."""
    check_has_data(cfg)
    samples, report = load_samples(cfg.data, on_error=cfg.on_error)
    attach_rl(samples, cfg.rl_tokenizer)
    return subsample(cfg, samples, report)[0]


def check_has_data(cfg: TrainConfig) -> None:
    if not cfg.data:
        raise ValueError("no training data: give --data PATH or `data = [...]` in the config")


def subsample(cfg: TrainConfig, samples: list[Sample], report: LoadReport) -> tuple[Prepared, list[Sample]]:
    """``prepare`` on loaded samples (RL attached): the group split, the seeded subsample of the
    training side, the scheme; also the whole training side (``rlpredict stack`` fits on it)."""
    train, test, pinned = split_with_pins(samples, cfg.test_frac, cfg.split_seed, cfg.split_rule)
    side = train
    rng = random.Random(cfg.seed)
    if cfg.max_rows_per_source:
        by_src: dict[str, list[Sample]] = {}
        for s in train:
            by_src.setdefault(s.source, []).append(s)
        train = [s for v in by_src.values() for s in
                 (rng.sample(v, cfg.max_rows_per_source) if len(v) > cfg.max_rows_per_source else v)]
    if cfg.max_rows and len(train) > cfg.max_rows:
        train = rng.sample(train, cfg.max_rows)
    if not train:
        first = f"; the first skipped: {report.examples[0]}" if report.examples else ""
        raise ValueError(f"{', '.join(map(str, cfg.data))}: no training samples left after the split "
                         f"({report.summary()}{first})")
    long = [s.location for s in train if s.rl_tokens > MAX_TOKENS]
    report.long_responses, report.first_long_response = len(long), long[0] if long else ""
    scheme = make_scheme(cfg.buckets, np.array([s.rl_tokens for s in train]), cfg.reserve_quantile)
    present = sum(1 for c in scheme.counts if c)
    if present < 2:
        raise ValueError(f"every training response falls in one bucket of {scheme.n_buckets} "
                         f"(edges {[None if math.isinf(e) else e for e in scheme.edges]}): a classifier "
                         "needs at least two; give more varied data or other bucket edges")
    return Prepared(train, test, scheme, report, len(side), pinned), side


def class_weights(labels: np.ndarray, k: int, mode: str) -> np.ndarray:
    counts = np.bincount(labels, minlength=k).astype(float)
    if mode == "none":
        return np.ones(k)
    inv = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / k, 0.0)
    w = np.sqrt(inv) if mode == "sqrt" else inv
    return w / (w[counts > 0] * counts[counts > 0]).sum() * counts.sum()  # mean weight 1 per example


def soft_targets(k: int, sigma: float) -> np.ndarray:
    """Row y: a Gaussian over bucket indices centred on y (the ordinal loss's targets)."""
    idx = np.arange(k)
    t = np.exp(-((idx[None, :] - idx[:, None]) ** 2) / (2 * sigma**2))
    return t / t.sum(axis=1, keepdims=True)


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random, chunk: int = 50) -> list[list[int]]:
    """Shuffle, sort within chunks of ``chunk`` batches by length, then shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for i in range(0, len(order), batch_size * chunk):
        part = sorted(order[i:i + batch_size * chunk], key=lengths.__getitem__)
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


# ---- output folders --------------------------------------------------------------------------------
#: The tool named in the model folder's owner record (``rlpredict.outputs``): ``train`` replaces
#: only a folder of its own, never another tool's, even with --force.
CHECKPOINT_TOOL = "rlpredict train (checkpoints)"
RUN_CONFIG = "run_config.json"


def default_checkpoint_dir(out_dir: str | Path) -> Path:
    """Checkpoints live beside the model folder, never inside it: the model folder appears only
    when complete (atomic output), while checkpoints must survive a crash to be resumed."""
    out = Path(out_dir)
    return out.parent / f"{out.name}-checkpoints"


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``folder``: one holding ``trainer_state.json``,
    which the Trainer writes last (a checkpoint cut short by a crash is skipped)."""
    best: tuple[int, Path] | None = None
    p = Path(folder)
    if not p.is_dir():
        return None
    for d in p.glob("checkpoint-*"):
        step = d.name.removeprefix("checkpoint-")
        if step.isdigit() and (d / "trainer_state.json").is_file() and (best is None or int(step) > best[0]):
            best = (int(step), d)
    return best[1] if best else None


def check_output(cfg: TrainConfig, out_dir: str | Path, force: bool = False, *,
                 checkpoint_dir: str | Path | None = None, resume: bool = False) -> Path:
    """Refuse (``OutputError``) an output folder that exists without ``force``, holds files no
    tool of ours wrote, or holds the training data; the same for the checkpoint folder (which
    ``resume`` needs to hold a complete checkpoint of the same run instead). Checked before
    training starts; returns the checkpoint folder. The encoder is checked here too (found, and
    ``max_length`` within its positions): before the data is read (was: after, a minute into
    the shipped recipe)."""
    out = Path(out_dir)
    check_positions(encoder_path(cfg.encoder), cfg.max_length, f"encoder {cfg.encoder}")
    if checkpoint_dir is not None and not cfg.save_checkpoints:  # was: ignored without a word
        raise OutputError(f"{checkpoint_dir}: --checkpoint-dir, but this config saves no checkpoints "
                          "(save_checkpoints = false)")
    if cfg.precision in ("bf16", "fp16") and world_size() == 1 and not _accelerator():
        # was: refused by transformers after the data was read, naming an option users do not have
        raise ValueError(f"precision = {cfg.precision!r} needs a GPU (CUDA, MPS or XPU) and none is visible: "
                         "use 'auto' or 'fp32'")
    ckpt = Path(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir(out)
    # the encoder folder and a tokenizer file are inputs too (was: `--encoder runs/m1 --out
    # runs/m1 --force` replaced it, and an encoder inside the checkpoint folder was deleted)
    files = [p for p in (cfg.encoder, cfg.rl_tokenizer) if Path(p).expanduser().exists()]
    check_paths([*cfg.data, *files], [("--out", out), ("--checkpoint-dir", ckpt)], apart=cfg.data)
    o, c = resolved(out), resolved(ckpt)  # (a link loop: followed as far as it goes, no RuntimeError)
    if o in c.parents or c in o.parents:
        raise OutputError(f"{ckpt}: --checkpoint-dir and --out {out} are nested; the model folder is replaced "
                          "as a whole at the end, so keep them apart")
    check_new_dir(out, force=force, option="--out", only=TRAIN_TOOL)  # never another tool's folder
    if resume:
        if latest_checkpoint(ckpt) is None:
            raise OutputError(f"{ckpt}: no complete checkpoint to resume from (--resume); "
                              "give the --checkpoint-dir of the interrupted run")
        _check_same_run(cfg, ckpt)
    elif cfg.save_checkpoints:
        if not force and latest_checkpoint(ckpt) is not None:  # was: "pass --force", which deletes them
            raise OutputError(f"{ckpt}: holds checkpoints of an earlier run; --resume continues it, "
                              "--force starts over and deletes them (--checkpoint-dir)")
        # never another tool's folder (was: --force deleted a trained model given as --checkpoint-dir)
        check_new_dir(ckpt, force=force, option="--checkpoint-dir", only=CHECKPOINT_TOOL)
    return ckpt


def _data_files(cfg: TrainConfig) -> list[str]:
    """The data entries with their paths resolved (an entry that is no path kept as typed), as a
    run records them for ``--resume``."""
    return [os.path.realpath(d) if os.path.exists(d) else d for d in cfg.data]


def _check_same_run(cfg: TrainConfig, ckpt: Path) -> None:
    f = ckpt / RUN_CONFIG
    try:
        record = json.loads(f.read_text(encoding="utf-8"))
        saved = record["config"]
    except (OSError, ValueError, KeyError, TypeError):
        raise OutputError(f"{f}: missing or unreadable; {ckpt} was not written by `rlpredict train`") from None
    now = cfg.to_dict()
    files = record.get("data_files")
    if isinstance(files, list):  # the same files, typed relative or absolute, from any folder (was: refused)
        saved["data"], now["data"] = files, _data_files(cfg)
    elif isinstance(saved.get("data"), list):  # a run from before data_files: resolved from this folder
        saved["data"] = [os.path.realpath(d) if isinstance(d, str) else d for d in saved["data"]]
        now["data"] = [os.path.realpath(d) for d in cfg.data]
    diff = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if diff:
        raise ValueError(f"{ckpt}: --resume with other settings than the interrupted run ({', '.join(diff)}); "
                         f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change")


def _check_same_rows(ckpt: Path, train_rows: str) -> None:
    """``--resume`` trains on the rows the interrupted run trained on (was: data changed under the
    same path went on without a word, and the summary named the new file beside a best MAE
    measured on the old one). A run recorded before the rows were is not checked."""
    recorded = json.loads((ckpt / RUN_CONFIG).read_text(encoding="utf-8")).get("train_rows_sha256")
    if recorded is not None and recorded != train_rows:
        raise ValueError(f"{ckpt}: --resume on other training rows than the interrupted run's (its data changed: "
                         "train_rows_sha256 differs); run without --resume (with --force) to train on them")


# ---- the Trainer -----------------------------------------------------------------------------------
class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Indices in length-grouped *global* batches (``length_grouped_batches``, short batch last).

    Every process draws the same order (seed + epoch), and accelerate hands consecutive
    per-device slices to the processes, so one optimizer step sees the same examples on 1 or N
    processes: the loss curve does not depend on the number of processes."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        batches = length_grouped_batches(self.lengths, self.batch_size, random.Random(self.seed * 100_003 + self.epoch))
        batches.sort(key=lambda b: len(b) < self.batch_size)  # stable: the short batch goes last
        for b in batches:
            yield from b


class RLTrainer(Trainer):
    """``transformers.Trainer`` with the project's loss (class-weighted cross-entropy against
    one-hot or ordinal soft targets), a separate learning rate for the head, and length-grouped
    global batches. Labels are response lengths in tokens; the bucket is found on the device."""

    def __init__(self, *args: Any, scheme: BucketScheme, cfg: TrainConfig, labels: np.ndarray,
                 lengths: Sequence[int], global_batch: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        k = scheme.n_buckets
        self.rl_targets = torch.tensor(soft_targets(k, cfg.ordinal_sigma) if cfg.loss == "ordinal" else np.eye(k),
                                       dtype=torch.float32)
        self.rl_weights = torch.tensor(class_weights(labels, k, cfg.class_weight), dtype=torch.float32)
        # bucket k holds RL <= edge k; RLs are integers, so floor(edge) is the same bound
        self.rl_edges = torch.tensor([min(math.floor(e), 2**62) if math.isfinite(e) else 2**62 for e in scheme.edges],
                                     dtype=torch.int64)
        self.head_lr, self.lengths, self.global_batch = cfg.head_lr, lengths, global_batch
        self.step_losses: list[torch.Tensor] = []
        self.examples_seen, self.overhead_s = 0, 0.0
        self.model_accepts_loss_kwargs = False  # our loss is a per-batch mean
        self.loss_is_scaled_for_ga = False

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler:
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return LengthGroupedSampler(self.lengths, self.global_batch, seed)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        inputs = dict(inputs)
        rl = inputs.pop("labels")
        outputs = model(**inputs)
        logp = torch.log_softmax(outputs.logits.float(), dim=-1)
        if self.rl_targets.device != logp.device:
            self.rl_targets, self.rl_weights = self.rl_targets.to(logp.device), self.rl_weights.to(logp.device)
            self.rl_edges = self.rl_edges.to(logp.device)
        y = torch.bucketize(rl.to(torch.int64), self.rl_edges)
        loss = (-(self.rl_targets[y] * logp).sum(-1) * self.rl_weights[y]).mean()
        if model.training:
            self.step_losses.append(loss.detach())
            self.examples_seen += len(y)
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """AdamW; the encoder at ``lr``, the new head at ``head_lr``; no decay on biases and norms."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
            for n, p in opt_model.named_parameters():
                if p.requires_grad:
                    groups.setdefault(("classifier" in n, n in decay), []).append(p)
            self.optimizer = torch.optim.AdamW(
                [{"params": ps, "lr": self.head_lr if head else self.args.learning_rate,
                  "weight_decay": self.args.weight_decay if dec else 0.0} for (head, dec), ps in sorted(groups.items())],
                lr=self.args.learning_rate)
        return self.optimizer

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        t = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.overhead_s += time.perf_counter() - t

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        t = time.perf_counter()
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.overhead_s += time.perf_counter() - t


class _OwnCheckpoints(TrainerCallback):
    """Record each checkpoint in the folder's ownership file *before* it is written, so that
    ``--force`` may replace the folder even after a crash cut a save short."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_save and state.is_world_process_zero:
            mark_owned(self.folder, CHECKPOINT_TOOL, [f"checkpoint-{state.global_step}"])

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        ckpt = self.folder / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and ckpt.is_dir():
            plain_modes(ckpt)


class _StderrProgress(ProgressCallback):
    """transformers' progress bar, with its log lines on stderr and readable (``step 20: loss
    2.31, lr 4.1e-05``; evaluations ``step 20: held-out mae 118.1, kendall_tau 0.21``), without
    the run's closing dict: the CLI's ``saved`` line says it. Was: ``{'loss': ...}`` dicts on
    stdout, in the middle of a report redirected to a file."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:  # a bar on a terminal only (was: its frames in a log file)
            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, disable=not sys.stderr.isatty())
        self.current_step = 0

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if sys.stderr.isatty():
            super().on_prediction_step(args, state, control, **kwargs)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not (state.is_world_process_zero and self.training_bar is not None and logs):
            return
        if "train_runtime" in logs:  # the closing summary
            return
        held = any(k.startswith("eval_") for k in logs)
        keep = {k.removeprefix("eval_"): v for k, v in logs.items()
                if (k.startswith("eval_") if held else k in ("loss", "learning_rate", "grad_norm"))
                and isinstance(v, int | float) and not k.endswith(("_runtime", "_per_second"))}
        text = ", ".join(f"{k.replace('learning_rate', 'lr')} {v:.4g}" for k, v in keep.items())
        if text:
            self.training_bar.write(f"step {state.global_step}: {'held-out ' if held else ''}{text}", file=sys.stderr)


def _checkpoint_done(ckpt: Path, total: int) -> bool:
    """Whether the run a checkpoint belongs to had ended there: its planned steps trained, or its
    early stopping said stop (``trainer_state.json``; False if unreadable)."""
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        stop = (state.get("stateful_callbacks") or {}).get("TrainerControl", {}).get("args", {})
        return int(state.get("global_step", 0)) >= total or bool(stop.get("should_training_stop"))
    except (OSError, ValueError, TypeError, AttributeError):
        return False


class _StepLosses(TrainerCallback):
    """Write the losses of every step so far (and the examples seen) into each checkpoint, one
    file per process, so that a run resumed from it still reports every step (was: only the
    steps after the resume)."""

    def __init__(self) -> None:
        self.trainer: RLTrainer | None = None

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        t = self.trainer
        if t is not None and ckpt.is_dir():
            losses = torch.stack(t.step_losses).float().cpu().tolist() if t.step_losses else []
            write_text_atomic(ckpt / STEP_LOSSES.format(rank=args.process_index),
                              json.dumps({"losses": losses, "examples_seen": t.examples_seen}) + "\n")

    @staticmethod
    def restore(trainer: RLTrainer, ckpt: Path, rank: int) -> tuple[int, int]:
        """Put the losses saved in ``ckpt`` back into ``trainer``: (steps, examples) they cover
        ((0, 0): none saved, as in a checkpoint of an earlier version)."""
        path = ckpt / STEP_LOSSES.format(rank=rank)
        if not path.is_file():
            return 0, 0
        saved = json.loads(path.read_text(encoding="utf-8"))
        trainer.step_losses = [torch.tensor(x) for x in saved["losses"]]
        trainer.examples_seen = int(saved["examples_seen"])
        return len(trainer.step_losses), trainer.examples_seen


class _Patience(TrainerCallback):
    """A resumed run restores its early-stopping count of evaluations without improvement from
    the checkpoint, and with it the patience then set: put back the configured one (a resume may
    change it, ``RESUMABLE_CHANGES``)."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.trainer: RLTrainer | None = None

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        for cb in self.trainer.callback_handler.callbacks if self.trainer is not None else ():
            if isinstance(cb, EarlyStoppingCallback):
                cb.early_stopping_patience = self.patience


class _BestInMemory(TrainerCallback):
    """Without checkpoints, keep the best evaluated weights in memory (on the CPU), so that an
    early stop still ends with the best model (was: the last one, reported as the best)."""

    def __init__(self, metric: str, greater: bool) -> None:
        self.key, self.greater = f"eval_{metric}", greater
        self.value: float | None = None
        self.step: int | None = None
        self.weights: dict[str, torch.Tensor] | None = None

    def on_evaluate(self, args: TrainingArguments, state: Any, control: Any, metrics: dict | None = None,
                    model: Any = None, **kwargs: Any) -> None:
        v = (metrics or {}).get(self.key)
        if v is None or model is None or not math.isfinite(v):
            return
        if self.value is None or (v > self.value if self.greater else v < self.value):
            self.value, self.step = v, state.global_step
            self.weights = {k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()}


#: the file in each checkpoint holding a process's step losses so far (``_StepLosses``)
STEP_LOSSES = "rl_step_losses.rank{rank}.json"


def _metrics_fn(scheme: BucketScheme) -> Any:
    def compute(pred: EvalPrediction) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        z = np.asarray(logits, dtype=np.float64)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        m = rl_metrics(np.asarray(pred.label_ids), p / p.sum(axis=1, keepdims=True), scheme)
        return {k: m[k] for k in EVAL_METRICS}

    return compute


EVAL_METRICS = ("mae", "kendall_tau", "bucket_acc", "within1_acc", "acc100")


def _encode(tok: Any, samples: Sequence[Sample], cfg: TrainConfig) -> list[dict[str, Any]]:
    spec = cfg.input_spec
    ids = token_ids(tok, (build_text(s.messages, spec, s.generator) for s in samples), spec)
    return [{"input_ids": x, "labels": int(s.rl_tokens)} for x, s in zip(ids, samples, strict=True)]


def _accelerator() -> bool:
    """A device transformers runs mixed precision on: CUDA, Apple's MPS or Intel's XPU."""
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return bool(torch.cuda.is_available() or (mps is not None and mps.is_available())
                or (xpu is not None and xpu.is_available()))


def _precision(cfg: TrainConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def world_size() -> int:
    """Processes of this run (``torchrun`` / ``accelerate launch`` set ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def train(cfg: TrainConfig, out_dir: str | Path, *, prepared: Prepared | None = None, progress: bool = True,
          force: bool = False, checkpoint_dir: str | Path | None = None, resume: bool = False,
          callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """Train per ``cfg`` with ``transformers.Trainer`` and write the model folder; returns the
    training summary (on every process; only the main one writes).

    Uses a GPU when present (bf16 where supported) and every process of a ``torchrun`` /
    ``accelerate launch`` run (``cfg.batch_size`` is the global batch). Checkpoints go to
    ``checkpoint_dir`` (default ``OUT-checkpoints``); ``resume`` continues from its newest
    complete one. An existing ``out_dir`` is replaced only with ``force``, and only if a tool of
    ours wrote everything in it (``rlpredict.outputs``); the new folder is moved into place at
    the end."""
    with contextlib.ExitStack() as stack:
        return _train(cfg, out_dir, prepared=prepared, progress=progress, force=force, checkpoint_dir=checkpoint_dir,
                      resume=resume, callbacks=callbacks, stack=stack)


def _train(cfg: TrainConfig, out_dir: str | Path, *, prepared: Prepared | None, progress: bool, force: bool,
           checkpoint_dir: str | Path | None, resume: bool, callbacks: Sequence[TrainerCallback],
           stack: contextlib.ExitStack) -> dict:
    ckpt = check_output(cfg, out_dir, force, checkpoint_dir=checkpoint_dir, resume=resume)  # and the encoder
    hf_logging.set_verbosity_error()  # the new head's "newly initialized" report is expected
    hf_logging.disable_progress_bar()
    t0 = time.time()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads:  # at most the cores this process may use, as the predictor's threads
        torch.set_num_threads(min(cfg.threads, usable_cores()))
    prep = prepared or prepare(cfg)
    if cfg.best_metric == "kendall_tau" and min(cfg.eval_rows, len(prep.test)) == 1:  # the config's own
        # check, on the rows there are (was: a held-out side of one row picked checkpoints on tau "0")
        raise ValueError(f"{', '.join(map(str, cfg.data))}: the held-out side has 1 row: best_metric kendall_tau "
                         "needs at least 2 (a rank correlation over one row is undefined); give more data, "
                         "or another best_metric")
    train_rows = rows_sha256(prep.train)  # which rows it trains on (the summary's, and --resume's check)
    if resume:
        _check_same_rows(ckpt, train_rows)
    scheme = prep.scheme
    world = world_size()
    replicas = world * (max(1, torch.cuda.device_count()) if world == 1 else 1)  # a lone process uses every GPU
    if cfg.batch_size % replicas:
        raise ValueError(f"batch_size {cfg.batch_size} is the global batch: it must divide by the {replicas} "
                         "devices of this run")

    enc = encoder_path(cfg.encoder)
    tok = AutoTokenizer.from_pretrained(enc)
    tok.truncation_side = cfg.input_spec.truncation_side
    torch.manual_seed(cfg.seed)
    model, loaded = AutoModelForSequenceClassification.from_pretrained(
        enc, num_labels=scheme.n_buckets, ignore_mismatched_sizes=True, output_loading_info=True,
        id2label={i: f"rl<={e:g}" for i, e in enumerate(scheme.edges)},
        label2id={f"rl<={e:g}": i for i, e in enumerate(scheme.edges)})
    check_loaded(model, loaded, f"encoder {cfg.encoder}")
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():  # peft asks transformers' deprecated name: not the user's to fix
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            model = get_peft_model(model, LoraConfig(
                task_type="SEQ_CLS", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                target_modules=["query", "key", "value", "dense"]))

    train_ds = _encode(tok, prep.train, cfg)
    held = prep.test if len(prep.test) <= cfg.eval_rows else random.Random(cfg.split_seed).sample(prep.test, cfg.eval_rows)
    eval_ds = sorted(_encode(tok, held, cfg), key=lambda r: len(r["input_ids"]))  # less padding
    evaluating = bool(eval_ds) and cfg.eval_rows > 0
    keep_best = evaluating and cfg.save_checkpoints
    steps_per_epoch = math.ceil(len(train_ds) / cfg.batch_size)
    total = cfg.max_steps or max(1, int(round(cfg.epochs * steps_per_epoch)))
    every = min(cfg.eval_steps or steps_per_epoch, total)
    precision = _precision(cfg)
    trainer_dir = str(ckpt)
    if not cfg.save_checkpoints:  # the Trainer creates its output folder even when it saves nothing
        trainer_dir = tempfile.mkdtemp(prefix="rlpredict-train-")
        stack.callback(shutil.rmtree, trainer_dir, ignore_errors=True)
    args = TrainingArguments(
        output_dir=trainer_dir, per_device_train_batch_size=cfg.batch_size // replicas,
        per_device_eval_batch_size=max(cfg.batch_size // replicas, 32),
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=1.0, max_steps=total,
        lr_scheduler_type="linear", warmup_steps=int(cfg.warmup_ratio * total), seed=cfg.seed, data_seed=cfg.seed,
        bf16=precision == "bf16", fp16=precision == "fp16",
        eval_strategy="steps" if evaluating else "no", eval_steps=every,
        save_strategy="steps" if cfg.save_checkpoints else "no", save_steps=every, save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=keep_best, metric_for_best_model=cfg.best_metric if evaluating else None,
        greater_is_better=cfg.best_metric == "kendall_tau", logging_steps=cfg.logging_steps, report_to="none",
        disable_tqdm=not progress, remove_unused_columns=False, label_names=["labels"],
        ddp_find_unused_parameters=False, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),  # was: a pin_memory warning on every CPU run
        # a resumed run keeps its early-stopping patience (was: reset, so it ran on and ended
        # with another model than the run it continues)
        restore_callback_states_from_checkpoint=True,
        use_cpu=world > 1 and not torch.cuda.is_available())  # accelerate makes CPU processes DDP (gloo) only so
    args.device  # noqa: B018 - sets up the process group (torchrun / accelerate launch), or a single process
    state: PartialState = args.distributed_state
    step_log = _StepLosses()
    cbs: list[TrainerCallback] = [_OwnCheckpoints(ckpt), step_log] if cfg.save_checkpoints else []
    patience = _Patience(cfg.early_stopping_patience or 0)
    if evaluating and cfg.early_stopping_patience:
        cbs += [EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience), patience]
    in_memory = _BestInMemory(cfg.best_metric, cfg.best_metric == "kendall_tau") if evaluating and not keep_best else None
    if in_memory is not None:
        cbs.append(in_memory)
    trainer = RLTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds if evaluating else None,
        processing_class=tok, data_collator=DataCollatorWithPadding(tok),
        compute_metrics=_metrics_fn(scheme) if evaluating else None, callbacks=[*cbs, *callbacks],
        scheme=scheme, cfg=cfg, labels=scheme.bucket_of([s.rl_tokens for s in prep.train]).astype(np.int64),
        lengths=[len(r["input_ids"]) for r in train_ds], global_batch=cfg.batch_size)
    if not progress:
        trainer.remove_callback(PrinterCallback)
    elif trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_StderrProgress())
    step_log.trainer = patience.trainer = trainer

    state.wait_for_everyone()  # every process has checked the folders before the main one writes
    # --force: the earlier run's checkpoints wait beside the folder until this run has one of
    # its own (was: deleted as it started, so an interrupted rerun lost them)
    previous: Path | None = None
    if state.is_main_process and cfg.save_checkpoints and not resume:
        if ckpt.exists() and any(ckpt.iterdir()):  # checked: written entirely by us (with --force)
            previous = Path(tempfile.mkdtemp(prefix=f".{ckpt.name}.", suffix=".part", dir=ckpt.parent))
            os.replace(ckpt, previous / "previous")
        elif ckpt.exists():  # empty
            ckpt.rmdir()
        ckpt.mkdir(parents=True)
        write_text_atomic(ckpt / RUN_CONFIG, json.dumps({"config": cfg.to_dict(), "data_files": _data_files(cfg),
                                                         "train_rows_sha256": train_rows}, indent=2) + "\n")
        mark_owned(ckpt, CHECKPOINT_TOOL, [RUN_CONFIG])
    state.wait_for_everyone()
    resumed = latest_checkpoint(ckpt) if resume else None
    finished = resumed is not None and _checkpoint_done(resumed, total)  # (transformers would train on)
    if finished and Path(out_dir).exists():
        raise OutputError(f"{resumed}: this run already ended (its {total} steps, or an early stop) and its model is "
                          f"in {out_dir}; there is nothing to resume (to train again, run without --resume, with --force)")
    prior, prior_seen = _StepLosses.restore(trainer, resumed, args.process_index) if resumed else (0, 0)
    try:
        if finished:  # killed after its last checkpoint, before its model was written: write it now
            assert resumed is not None
            trainer.state = TrainerState.load_from_json(str(resumed / "trainer_state.json"))
            trainer._load_from_checkpoint(str(resumed))
            if keep_best and trainer.state.best_global_step:  # in this folder (the state records
                best = resumed.parent / f"checkpoint-{trainer.state.best_global_step}"  # where it was)
                if not best.is_dir():  # was: the last checkpoint's weights, without a word
                    raise OutputError(f"{best}: this run's best checkpoint is missing, so its model cannot be "
                                      "written; run without --resume (with --force) to train again")
                trainer.state.best_model_checkpoint = str(best)
                trainer._load_best_model()
            result = TrainOutput(trainer.state.global_step, 0.0, {"train_runtime": 0.0})
        else:  # a full disk while a checkpoint is written names the folder (was: an internal error)
            with naming(ckpt) if cfg.save_checkpoints else contextlib.nullcontext():
                result = trainer.train(resume_from_checkpoint=str(resumed) if resumed else None)
    except BaseException:
        # Stopped before its first complete checkpoint: nothing to resume from, and a folder
        # left behind would only block the same command (which would need --force); the
        # earlier run's checkpoints, if any, go back in place.
        if state.is_main_process and cfg.save_checkpoints and not resume and latest_checkpoint(ckpt) is None:
            shutil.rmtree(ckpt, ignore_errors=True)
            if previous is not None:
                os.replace(previous / "previous", ckpt)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)

    losses = torch.stack(trainer.step_losses).float() if trainer.step_losses else torch.zeros(0)
    if world > 1:  # the global batch's loss = the mean of the processes' (equal-sized) shares
        losses = trainer.accelerator.reduce(losses.to(args.device), reduction="mean")
    steps_run = len(trainer.step_losses) - prior
    seen = trainer.examples_seen * world
    loop_s = max(result.metrics.get("train_runtime", 0.0) - trainer.overhead_s, 1e-9)
    model = trainer.model
    if in_memory is not None and in_memory.weights is not None:  # the best evaluated weights
        model.load_state_dict(in_memory.weights)
    if cfg.method == "lora":
        model = model.merge_and_unload()
    model.eval()
    st = trainer.state
    evals = [{k.removeprefix("eval_"): v for k, v in h.items() if k.startswith("eval_") or k == "step"}
             for h in st.log_history if any(k.startswith("eval_") for k in h)]
    evals = [e for e in evals if "mae" in e]
    best_step = st.best_global_step if keep_best else (in_memory.step if in_memory is not None else None)
    run = {"processes": world, "device": str(args.device), "precision": precision,
           "per_device_batch": args.per_device_train_batch_size, "global_batch": cfg.batch_size,
           "checkpoint_dir": str(ckpt) if cfg.save_checkpoints else None,
           "resumed_from": str(resumed) if resumed else None, "best_checkpoint": st.best_model_checkpoint,
           "planned_steps": total, "stopped_early": st.global_step < total, "eval_samples": len(eval_ds) if evaluating else 0,
           "eval_every_steps": every if evaluating else None, "best_metric": cfg.best_metric if evaluating else None}
    run["losses_from_step"] = st.global_step - len(trainer.step_losses) + 1  # 1 unless resumed from
    # a checkpoint without them (an earlier version's)
    info = dict(step=st.global_step, steps_run=steps_run, seen=seen, seen_run=seen - prior_seen * world,
                losses=losses.cpu().tolist(), train_s=time.time() - t0, loop_s=loop_s, run=run, evals=evals,
                best=next((e for e in evals if e["step"] == best_step), None), train_rows=train_rows)
    if not state.is_main_process:
        return _summary(cfg, prep, scheme, **info)
    with output_dir(out_dir, force=force, tool=TRAIN_TOOL) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        ModelMeta(buckets=scheme, input=cfg.input_spec, rl_tokenizer=cfg.rl_tokenizer).save(tmp)
        summary = _summary(cfg, prep, scheme, **info)
        (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _summary(cfg: TrainConfig, prep: Prepared, scheme: BucketScheme, *, step: int, steps_run: int, seen: int,
             seen_run: int, losses: list[float], train_s: float, loop_s: float, run: dict, evals: list[dict],
             best: dict | None, train_rows: str) -> dict:
    window = max(1, min(50, len(losses) // 5))
    mean = (lambda xs: float(np.mean(xs)) if xs else None)  # noqa: E731  (None: no step run, strict JSON)
    return {
        "format": "rlpredict.training_summary/1",
        "config": cfg.to_dict(),
        "encoder": str(cfg.encoder),
        "data": {"load": prep.report.summary(), "train_samples": len(prep.train), "test_samples": len(prep.test),
                 "training_side_samples": prep.training_side,
                 "train_sources": dict(sorted(_count_by(prep.train, "source").items())),
                 "split": {"by": "group (conversation_id / prompt_id / context hash)",
                           "rule": cfg.split_rule, "test_frac": cfg.test_frac, "seed": cfg.split_seed,
                           "train_rows_sha256": train_rows,
                           **({"pinned": prep.pinned} if prep.pinned else {})}},
        "buckets": {"edges": [None if math.isinf(e) else e for e in scheme.edges], "train_counts": list(scheme.counts)},
        "steps": step, "steps_this_run": steps_run, "examples_seen": seen,
        "loss_first": mean(losses[:window]), "loss_last": mean(losses[-window:]),
        "loss_window_steps": window,
        "loss_curve": [mean(losses[i:i + 50]) for i in range(0, len(losses), 50)],
        "loss_per_step": [round(x, 6) for x in losses],
        "eval_history": evals, "eval_best": best,
        "trainer": run,
        "train_seconds": round(train_s, 1),
        "examples_per_second": round(seen_run / loop_s, 2) if steps_run else None,  # (None: nothing trained)
    }


def _count_by(samples: list[Sample], attr: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in samples:
        key = str(getattr(s, attr))
        out[key] = out.get(key, 0) + 1
    return out
