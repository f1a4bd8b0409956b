"""Fine-tune an encoder to classify a prompt's response length into buckets.

Full fine-tuning or LoRA (peft); cross-entropy or an ordinal-aware loss; class re-weighting
against collapse onto the common buckets; length-grouped batches to cut padding on CPU.
The output folder is a plain Hugging Face model (LoRA merged) plus ``rlpredict.json`` and
``training_summary.json``.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlpredict.buckets import BucketScheme
from rlpredict.config import TrainConfig
from rlpredict.data import LoadReport, Sample, attach_rl, load_samples
from rlpredict.encoders import encoder_path
from rlpredict.inputs import build_text
from rlpredict.model_meta import ModelMeta
from rlpredict.outputs import check_new_dir, check_paths, output_dir
from rlpredict.splits import split_by_group


@dataclass
class Prepared:
    train: list[Sample]
    test: list[Sample]
    scheme: BucketScheme
    report: LoadReport


def make_scheme(spec: str | list[float], train_rl: np.ndarray, reserve_quantile: float) -> BucketScheme:
    if isinstance(spec, str) and spec.startswith("quantile:"):
        base = BucketScheme.from_quantiles(train_rl, int(spec.split(":", 1)[1]))
    else:
        base = BucketScheme.from_spec(spec)
    return base.fit(train_rl, reserve_quantile)


def prepare(cfg: TrainConfig) -> Prepared:
    """Load, count RL, split by group, subsample the training side, fit the bucket scheme."""
    if not cfg.data:
        raise ValueError("no training data: give --data PATH or `data = [...]` in the config")
    samples, report = load_samples(cfg.data, on_error=cfg.on_error)
    attach_rl(samples, cfg.rl_tokenizer)
    train, test = split_by_group(samples, cfg.test_frac, cfg.split_seed)
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
        raise ValueError("no training samples left after the split")
    scheme = make_scheme(cfg.buckets, np.array([s.rl_tokens for s in train]), cfg.reserve_quantile)
    present = sum(1 for c in scheme.counts if c)
    if present < 2:
        raise ValueError(f"every training response falls in one bucket of {scheme.n_buckets} "
                         f"(edges {[None if math.isinf(e) else e for e in scheme.edges]}): a classifier "
                         "needs at least two; give more varied data or other bucket edges")
    return Prepared(train, test, scheme, report)


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


def check_output(cfg: TrainConfig, out_dir: str | Path, force: bool = False) -> None:
    """Refuse (``OutputError``) an output folder that exists without ``force``, holds files no
    tool of ours wrote, or holds the training data: checked before training starts."""
    check_paths(cfg.data, [("--out", Path(out_dir))])
    check_new_dir(out_dir, force=force, option="--out")


def train(cfg: TrainConfig, out_dir: str | Path, *, prepared: Prepared | None = None, progress: bool = True,
          force: bool = False) -> dict:
    """Train per ``cfg`` and write the model folder; returns the training summary.

    An existing ``out_dir`` is replaced only with ``force``, and only if a tool of ours wrote
    everything in it (``rlpredict.outputs``); the new folder is moved into place at the end."""
    check_output(cfg, out_dir, force)
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the new head's "newly initialized" report is expected
    hf_logging.disable_progress_bar()
    t0 = time.time()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    prep = prepared or prepare(cfg)
    scheme, spec = prep.scheme, cfg.input_spec
    k = scheme.n_buckets

    enc = encoder_path(cfg.encoder)
    tok = AutoTokenizer.from_pretrained(enc)
    tok.truncation_side = spec.truncation_side
    model = AutoModelForSequenceClassification.from_pretrained(
        enc, num_labels=k, ignore_mismatched_sizes=True,
        id2label={i: f"rl<={e:g}" for i, e in enumerate(scheme.edges)},
        label2id={f"rl<={e:g}": i for i, e in enumerate(scheme.edges)})
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            task_type="SEQ_CLS", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=["query", "key", "value", "dense"]))

    texts = [build_text(s.messages, spec, s.generator) for s in prep.train]
    enc_ids = tok(texts, truncation=True, max_length=spec.max_length)["input_ids"]
    labels = scheme.bucket_of([s.rl_tokens for s in prep.train]).astype(np.int64)

    rng = random.Random(cfg.seed)
    steps_per_epoch = math.ceil(len(texts) / cfg.batch_size)
    total = cfg.max_steps or max(1, int(round(cfg.epochs * steps_per_epoch)))
    head = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    body = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n]
    opt = torch.optim.AdamW([{"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr}],
                            weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
    weights = torch.tensor(class_weights(labels, k, cfg.class_weight), dtype=torch.float32)
    targets = torch.tensor(soft_targets(k, cfg.ordinal_sigma) if cfg.loss == "ordinal" else np.eye(k),
                           dtype=torch.float32)

    model.train()
    t_loop = time.time()
    losses: list[float] = []
    step, seen, batches = 0, 0, []
    with Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(), disable=not progress) as bar:
        task = bar.add_task("train", total=total, loss=float("nan"))
        while step < total:
            if not batches:
                batches = length_grouped_batches([len(x) for x in enc_ids], cfg.batch_size, rng)
            idx = batches.pop()
            batch = tok.pad({"input_ids": [enc_ids[i] for i in idx]}, return_tensors="pt")
            y = torch.from_numpy(labels[idx])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logp = torch.log_softmax(logits, dim=-1)
            loss = (-(targets[y] * logp).sum(-1) * weights[y]).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            seen += len(idx)
            bar.update(task, advance=1, loss=float(np.mean(losses[-50:])))
            if progress and not bar.console.is_terminal and (step % 25 == 0 or step == total):
                bar.console.print(f"step {step}/{total} loss {np.mean(losses[-25:]):.4f} "
                                  f"{seen / (time.time() - t_loop):.1f} ex/s")
    loop_s, train_s = time.time() - t_loop, time.time() - t0

    if cfg.method == "lora":
        model = model.merge_and_unload()
    model.eval()
    with output_dir(out_dir, force=force, tool="rlpredict train") as tmp:
        summary = _save(model, tok, cfg, prep, scheme, tmp, step=step, seen=seen, losses=losses,
                        train_s=train_s, loop_s=loop_s)
    return summary


def _save(model, tok, cfg: TrainConfig, prep: Prepared, scheme: BucketScheme, tmp: Path, *, step: int,
          seen: int, losses: list[float], train_s: float, loop_s: float) -> dict:
    window = max(1, min(50, step // 5))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    ModelMeta(buckets=scheme, input=cfg.input_spec, rl_tokenizer=cfg.rl_tokenizer).save(tmp)
    summary = {
        "format": "rlpredict.training_summary/1",
        "config": cfg.to_dict(),
        "encoder": str(cfg.encoder),
        "data": {"load": prep.report.summary(), "train_samples": len(prep.train), "test_samples": len(prep.test),
                 "train_sources": dict(sorted(_count_by(prep.train, "source").items())),
                 "split": {"by": "group (conversation_id / prompt_id / context hash)",
                           "test_frac": cfg.test_frac, "seed": cfg.split_seed}},
        "buckets": {"edges": [None if math.isinf(e) else e for e in scheme.edges], "train_counts": list(scheme.counts)},
        "steps": step, "examples_seen": seen,
        "loss_first": float(np.mean(losses[:window])), "loss_last": float(np.mean(losses[-window:])),
        "loss_window_steps": window,
        "loss_curve": [float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)],
        "train_seconds": round(train_s, 1), "examples_per_second": round(seen / max(loop_s, 1e-9), 2),
    }
    (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _count_by(samples: list[Sample], attr: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in samples:
        key = str(getattr(s, attr))
        out[key] = out.get(key, 0) + 1
    return out
