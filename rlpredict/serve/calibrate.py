"""``rlpredict calibrate``: add split-conformal quantiles to a bundle (``conformal.py``).

The calibration prompts must be data the model never trained on: by default the held-out side
of the split the bundle's evaluation recorded (``--split test``), divided again by a salted group
hash into a calibration part and a check part (``--check-frac``) on which the achieved coverage
is reported, per source. ``--split all`` uses every row of new logs the same way. The served
model itself (the bundle's ONNX file, int8 included) predicts, so the offsets fit what serving
sees. The result is a new bundle folder: the same model and tokenizer files, the manifest with a
``calibration`` section, and the model card with a calibration table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlpredict.data import LoadReport, Sample, attach_rl, iter_samples
from rlpredict.outputs import check_new_dir, check_paths, output_dir
from rlpredict.serve.bundle import copy_files, write_manifest
from rlpredict.serve.conformal import (
    MIN_GROUP,
    QuantileCalibration,
    check_quantiles,
    coverage_table,
)
from rlpredict.splits import (
    RECORDLESS_RULE,
    check_same_split,
    group_keys,
    recorded_split,
    row_digest,
    split_by_group,
)

#: The tool named in its output folder's owner record (``rlpredict.outputs``): it replaces
#: only a folder of its own, never another tool's, even with --force.
CALIBRATE_TOOL = "rlpredict calibrate"


CARD = "MODEL_CARD.md"
CHECK_SALT = 7919  # the calibration/check division must not repeat the train/test one


def held_out(samples: Sequence[Sample], manifest: dict, split: str, test_frac: float | None,
             seed: int | None) -> tuple[list[Sample], str]:
    """The samples the model never trained on, and how they were chosen."""
    if split == "all":
        if test_frac is not None:
            raise ValueError("--test-frac names the training split; --split all uses every row: pass one")
        return list(samples), "every row (--split all)"
    if split != "test":
        raise ValueError(f"split must be 'test' or 'all', got {split!r}")
    recorded = recorded_split(manifest)
    check_same_split(recorded, {"test_frac": ("--test-frac", test_frac), "seed": ("--seed", seed)},
                     "leave the option out, or use --split all for logs the model never saw")
    test_frac = test_frac if test_frac is not None else recorded.get("test_frac")
    seed = seed if seed is not None else recorded.get("seed", 0)
    if test_frac is None:
        raise ValueError("the bundle records no train/test split; pass --test-frac and --seed as "
                         "used in training, or --split all for logs the model never saw")
    rule = recorded.get("rule", RECORDLESS_RULE)
    _, test = split_by_group(samples, float(test_frac), int(seed), rule, recorded.get("pinned", ()))
    return test, f"held-out side of the training split (test_frac {test_frac}, seed {seed}, rule {rule})"


def divide(pool: Sequence[Sample], manifest: dict, split: str, seed: int | None, check_frac: float,
           data: Sequence[str | Path] = ()) -> tuple[list[Sample], list[Sample]]:
    """The fit and check parts of ``pool``, by the bundle's split rule (copies of one row on
    both would flatter the check), salted from the training split's own seed, with or without
    ``--seed`` (was: from ``--seed`` alone, so a bundle trained with seed 7919 put every
    held-out row on the check side)."""
    recorded = recorded_split(manifest)
    rule = recorded.get("rule", RECORDLESS_RULE)
    base = seed if seed is not None else recorded.get("seed", 0) if split == "test" else 0
    fit_part, check_part = split_by_group(pool, check_frac, int(base) + CHECK_SALT, rule)
    if not fit_part or not check_part:
        groups = len({s.group for s in pool})
        why = (f"in {groups} conversations or prompts: each part needs whole ones" if groups < 2 else
               f"{groups} conversations or prompts, but the division by --check-frac {check_frac:g} "
               f"left the {'fit' if not fit_part else 'check'} part empty")
        raise ValueError(f"{', '.join(map(str, data))}: {len(pool)} {'' if split == 'all' else 'held-out '}samples "
                         f"are too few to calibrate and check ({why})")
    return fit_part, check_part


def calibrate_bundle(bundle: str | Path, data: Sequence[str | Path], out: str | Path, *,
                     quantiles: Sequence[float] = (0.5, 0.9), split: str = "test",
                     test_frac: float | None = None, seed: int | None = None, check_frac: float = 0.5,
                     min_group: int = MIN_GROUP, confidence: float | None = None,
                     on_error: str = "fail", threads: int | None = None,
                     force: bool = False, log: Callable[[str], None] = lambda m: None) -> dict:
    """Fit the offsets, measure coverage on the check part, write the calibrated bundle to
    ``out`` (atomically; never over an input). Returns the report."""
    from rlpredict.serve.runtime import Predictor

    qs = check_quantiles(quantiles)
    if not 0.0 < check_frac < 1.0:
        raise ValueError(f"check_frac must be in (0, 1), got {check_frac}")
    bundle, out = Path(bundle), Path(out)
    check_paths([bundle, *data], [("--out", out)], apart=[bundle, *data])  # a calibrated bundle inside --data became data
    check_new_dir(out, force=force, option="--out", only=CALIBRATE_TOOL)  # never another tool's folder
    p = Predictor.load(bundle, threads=threads)
    p.bundle.check_rl_tokenizer()
    rule = recorded_split(p.bundle.manifest).get("rule", RECORDLESS_RULE)
    load = LoadReport()
    rows = read_rows(data, load, on_error)
    for line in load.lines():
        log(line)
    pool, how = held_out(rows, p.bundle.manifest, split, test_frac, seed)
    fit_part, check_part = divide(pool, p.bundle.manifest, split, seed, check_frac, data)
    fit_probs, check_probs = predict_rows(p, data, on_error, rows, [fit_part, check_part])
    fit_groups, check_groups = (len(set(group_keys(part, rule))) for part in (fit_part, check_part))
    log(f"calibrating on {len(fit_part)} samples ({fit_groups} conversations or prompts), checking on "
        f"{len(check_part)} ({check_groups}) ({how})")
    # counted in conversations and prompts, whose rows are not independent draws (was: in rows, so
    # 800 turns of two conversations were no few samples, and the margin was a row count's)
    if min(fit_groups, check_groups) < FEW_SAMPLES:  # valid on average, but loose: said (was: silent)
        q = min(qs, key=lambda v: abs(v - 0.5))  # the level whose check is loosest
        log(f"note: few samples: the quantiles cover their level on average over calibration sets, but "
            f"one set of {fit_groups} conversations or prompts varies widely, and the check's coverage of "
            f"q{q:g} on {check_groups} is about +-{1.96 * math.sqrt(q * (1 - q) / check_groups):.2f} (95%, "
            f"each counted as one draw); a few hundred of each make both tight")

    scheme = p.scheme
    cal = QuantileCalibration.fit(scheme, fit_probs, [s.rl_tokens for s in fit_part], qs,
                                  min_group=min_group, source=f"{_sources(fit_part)}: {how}",
                                  confidence=confidence, clusters=group_keys(fit_part, rule))
    check_rl = np.array([s.rl_tokens for s in check_part])
    src = np.array([s.source for s in check_part])
    report = {"bundle": str(bundle), "quantiles": list(qs), "confidence": confidence,
              "calibration_samples": len(fit_part), "calibration_groups": fit_groups,
              "check_samples": len(check_part), "check_groups": check_groups, "selection": how, "load": load.summary(),
              "skipped_examples": load.examples,
              "check": {"all": coverage_table(scheme, cal, check_probs, check_rl)}}
    for name in sorted(set(src)):
        m = src == name
        report["check"][name] = coverage_table(scheme, cal, check_probs[m], check_rl[m])

    with output_dir(out, force=force, tool=CALIBRATE_TOOL) as tmp:
        names = copy_files(p.bundle, tmp)
        manifest = {k: v for k, v in p.bundle.manifest.items() if k != "files"}
        manifest["calibration"] = {**cal.to_dict(), "check": report["check"]}
        manifest["files"] = names
        write_manifest(tmp, manifest)
        card = bundle / CARD
        text = card.read_text(encoding="utf-8") if card.is_file() else f"# {p.bundle.name}\n"
        (tmp / CARD).write_text(_with_card_section(text, report), encoding="utf-8")
    log(f"calibrated bundle written to {out}")
    return report


#: Below this many calibration or check samples ``calibrate`` says its figures are loose.
FEW_SAMPLES = 200

#: Samples counted and predicted at a time on the second read: what calibrate holds of the
#: logs' text (``drift``'s chunk).
CHUNK = 256


@dataclass(slots=True)
class Row:
    """What ``calibrate`` keeps of a sample between its two reads of the logs: no text. The
    split needs every row's group (and, under ``copies``, its ``row_digest``) before anything
    is predicted; the text is read again for the rows it selects (``predict_rows``), and each
    sample checked against its ``Row`` (``same``)."""
    index: int  # the sample's place in the logs (``iter_samples``' order)
    group: str
    source: str
    rl_tokens: int | None  # the row's own count; counted on the second read where it gave none
    row_digest: str  # of its context and response: ``copies`` joins by it, the second read checks it
    generator: str | None

    def same(self, s: Sample) -> bool:
        """Whether the second read's sample is this one (was: its group alone, so a row edited in
        place between the reads went unnoticed)."""
        return ((self.group, self.source, self.generator, self.rl_tokens) == (s.group, s.source, s.generator, s.rl_tokens)
                and self.row_digest == row_digest(s))  # (``rl_tokens``: still as read; counted after this)


def read_rows(data: Sequence[str | Path], load: LoadReport, on_error: str) -> list[Row]:
    """The first read: each sample's ``Row`` (was: every sample with its text, 889 MB for a
    580 MB log). The logs are read twice, so each must be a regular file or a folder of them."""
    for path in data:
        if Path(path).exists() and not (Path(path).is_file() or Path(path).is_dir()):  # (was: a pipe hung)
            raise ValueError(f"{path}: not a regular file (a pipe or a device): calibrate reads its logs twice; "
                             "write them to a file")
    return [Row(i, s.group, s.source, s.rl_tokens, row_digest(s), s.generator)
            for i, s in enumerate(iter_samples(data, load, on_error=on_error))]  # type: ignore[arg-type]


def predict_rows(p: Any, data: Sequence[str | Path], on_error: str, rows: Sequence[Row],
                 parts: Sequence[Sequence[Row]]) -> list[np.ndarray]:
    """The second read: the served model's probabilities for the rows of each part (in its order),
    ``CHUNK`` samples at a time, and the response-token count of each selected row that gave
    none. The logs must read as they did the first time (``Row.same``: every sample's group,
    source, generator, given count, context and response)."""
    where = {r.index: (k, j) for k, part in enumerate(parts) for j, r in enumerate(part)}
    out = [np.empty((len(part), p.scheme.n_buckets), dtype=np.float32) for part in parts]  # (``probs``'s)
    chunk: list[tuple[Sample, int, int]] = []

    def flush() -> None:
        samples = [s for s, _, _ in chunk]
        attach_rl(samples, p.bundle.rl_tokenizer)
        probs = p.predict_arrays([s.messages for s in samples], [s.generator for s in samples]).probs
        for (s, k, j), row in zip(chunk, probs, strict=True):
            out[k][j] = row
            parts[k][j].rl_tokens = s.rl_tokens
        chunk.clear()

    n, changed = 0, False
    for n, s in enumerate(iter_samples(data, LoadReport(), on_error=on_error), 1):  # type: ignore[arg-type]
        if changed := n > len(rows) or not rows[n - 1].same(s):
            break
        if (at := where.get(n - 1)) is not None:
            chunk.append((s, *at))
            if len(chunk) >= CHUNK:
                flush()
    if changed or n != len(rows):
        raise ValueError(f"{', '.join(map(str, data))}: changed while calibrate read it (it reads the logs twice: "
                         f"first for the split, then the selected rows' text); run it again on logs no one writes to")
    if chunk:
        flush()
    return out


def _sources(samples: Sequence[Sample]) -> str:
    return ", ".join(sorted({s.source for s in samples}))


def markdown(report: dict) -> str:
    """The check table: target vs achieved coverage, reserved / actual tokens, raw vs calibrated."""
    lines = ["| source | quantile | n | coverage (calibrated) | reserved/actual (calibrated) "
             "| coverage (raw) | reserved/actual (raw) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, rows in report["check"].items():
        for r in rows:
            lines.append(f"| {name} | {r['quantile']} | {r['n']} | {r['coverage']:.3f} | "
                         f"{r['reserved_over_actual']:.2f}x | {r['raw_coverage']:.3f} | "
                         f"{r['raw_reserved_over_actual']:.2f}x |")
    return "\n".join(lines)


def _with_card_section(card: str, report: dict) -> str:
    head = "## Calibrated quantiles"
    kept = card.split(f"\n{head}\n")[0].rstrip("\n")
    return (f"{kept}\n\n{head}\n\nSplit-conformal offsets (`rlpredict calibrate`) fitted on "
            f"{report['calibration_samples']} prompts, checked on {report['check_samples']} others "
            f"({report['selection']}). On data exchangeable with them a response is at most its "
            f"calibrated q-quantile with probability >= q, averaged over calibration sets; one "
            f"set's coverage scatters around q (docs/bundle.md, \"Calibrated quantiles\").\n\n"
            f"{markdown(report)}\n")

