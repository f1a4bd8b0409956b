"""``rlpredict drift``: are new logs still what the bundle was trained and calibrated on?

For every group of the new logs (all rows, each source, each generator with enough rows):

- **Label shift**: total variation distance between the observed bucket distribution of the new
  responses and the one in the bundle's evaluation (the row sums of its confusion matrix). A
  note, not drift: the bundle's data mixes every source and generator it was trained on, so one
  model's logs differ from it by design; whether predictions still fit is what the two checks
  below decide (``drift`` on a shipped bundle's own held-out rows of two generators said "drift").
- **Calibration**: total variation distance between the observed bucket distribution and the
  model's mean predicted distribution on the same prompts (0: the model's probabilities still
  match reality).

A distance counts as drift when it exceeds ``max_tv`` plus what sampling alone gives at this
group's size (the 99th percentile of the distance of ``n`` draws from the reference itself),
the size counted in independent draws (``effective_rows``: the rows over the design effect of
their conversations and prompts, as the coverage's error counts them).
- **Coverage**: for each calibrated quantile q, the share of new responses at or below it, and
  whether it fell below q by more than sampling noise (``z`` standard errors) plus ``tolerance``.
  The standard error counts the logs' conversations and prompts, not their rows (``coverage_se``:
  turns of one conversation, or one prompt's answers by many generators, are not independent),
  and adds the calibration set's own scatter: on exchangeable halves of the shipped bundle's
  held-out rows a row-counted error said ``drift`` in 42% of 200 halvings. Only the group of
  all rows decides on coverage (calibration holds q over its whole mix); a source's or a
  generator's shortfall is a note.

Verdict ``drift`` if any group with at least ``min_rows`` rows breaks a calibration bound, or
the group of all rows a coverage bound; exit code 3 then
(0: no drift; 2: bad input), so that cron or CI can act on it. Verdict ``too few rows``, exit
code 4, when all the logs together hold fewer than ``min_rows`` rows, or so few independent
draws (conversations and prompts) that no bound of theirs could break: no group decides, and
"ok" would say that logs nothing judged were fine (the bounds the small groups broke are listed).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlpredict.data import LoadReport, attach_rl, iter_samples

#: Samples read, counted and predicted at a time: what drift holds of the logs' text.
CHUNK = 256

DRIFT_EXIT = 3
TOO_FEW_EXIT = 4


@dataclass(frozen=True)
class DriftBounds:
    max_tv: float = 0.15  # total variation, observed vs reference (or vs predicted)
    tolerance: float = 0.02  # coverage may fall this far below q, beyond sampling noise
    z: float = 3.0  # sampling noise allowance, in standard errors of a proportion
    min_rows: int = 200  # groups smaller than this are reported but never decide


def _tv(a: np.ndarray, b: np.ndarray) -> float:
    a = a / max(a.sum(), 1e-12)
    b = b / max(b.sum(), 1e-12)
    return float(0.5 * np.abs(a - b).sum())


def sampling_tv(ref: np.ndarray, n: int, draws: int = 2000, seed: int = 0) -> float:
    """99th percentile of the distance between ``n`` draws from ``ref`` and ``ref``: what a
    group of this size shows without any drift (2,000 simulated groups: with 200 the estimate
    sat low, and a reviewer's 20,000 trials at ``max_tv`` 0 flagged 1.8-2.2%, not 1%)."""
    p = np.asarray(ref, dtype=np.float64)  # summed in float64: a float32 sum can leave p summing past 1
    p = p / max(float(p.sum()), 1e-12)
    counts = np.random.default_rng(seed).multinomial(max(n, 1), p, size=draws)
    return float(np.quantile(0.5 * np.abs(counts / max(n, 1) - p).sum(axis=1), 0.99))


#: Clusters from which ``effective_rows`` centres the residuals (fewer: a design effect
#: estimated around their own mean is unreliable).
CENTRED_FROM = 30


def effective_rows(buckets: np.ndarray, probs: np.ndarray, clusters: np.ndarray | None) -> float:
    """A group's rows in independent draws, for its TV bounds: the rows over the design effect of
    their ``clusters`` (conversations or prompts), the variance of the residuals (each row's
    bucket, one-hot, less its predicted probabilities) summed by cluster over the same summed by
    row, over the buckets, at least 1. From ``CENTRED_FROM`` clusters the residuals are centred
    on their mean: a drift is a bias every row shares, which summed over a conversation's turns
    counted as their correlation, so a real drift cut the draws to 0.14-0.36 of the rows and hid
    itself (a TV of 0.23 over 100 conversations found 5 times in 300, an audit's simulation;
    centred, 181 in 200). Below it they are not (under no drift their mean is 0): centred, two
    conversations that happened to share a bucket were many draws (119 of 300 turns, a
    reviewer's example, and 38% false alarms). All rows where they are independent (None); one
    draw for one cluster."""
    n = len(buckets)
    if clusters is None or n < 2:
        return float(n)
    _, ix = np.unique(clusters, return_inverse=True)
    g = int(ix.max()) + 1
    if g < 2:
        return 1.0
    y = -np.asarray(probs, dtype=np.float64)
    y[np.arange(n), buckets] += 1.0
    if g >= CENTRED_FROM:
        y -= y.mean(axis=0)
    within = float((y * y).sum())
    if not within > 1e-12 * n:  # every row exactly as predicted: no scatter to count
        return float(n)
    per = np.stack([np.bincount(ix, weights=col, minlength=g) for col in y.T], axis=1)
    return n / max(1.0, float((per * per).sum()) / within)


def reference_distribution(manifest: dict, n_buckets: int) -> np.ndarray | None:
    """Observed bucket shares in the bundle's own evaluation (confusion matrix rows)."""
    m = (manifest.get("confusion") or {}).get("matrix")
    try:
        a = np.asarray(m, dtype=float)
    except (TypeError, ValueError):
        return None
    if a.shape != (n_buckets, n_buckets) or not np.isfinite(a).all() or a.sum() <= 0:
        return None
    return a.sum(axis=1)


def coverage_se(covered: np.ndarray, clusters: np.ndarray | None, q: float,
                cal: int | tuple[np.ndarray, np.ndarray]) -> float:
    """Standard error of a coverage share under no drift: the cluster-robust (sandwich)
    variance of the share over the logs' groups (``clusters``: each row's conversation or prompt;
    None: rows are independent), at least the binomial one at ``q``, plus the calibration's own
    scatter (its quantile is itself an estimate): ``cal`` is its prompts, or (each row's offset
    group, each group's calibration prompts), each group's binomial variance weighted by the
    square of its share of the rows (a log predicted into one bucket with an offset of its own
    from 130 prompts was judged as if by all 4,100: drift on 13% of undrifted 5,000-row logs, an
    audit's simulation), times the logs' design effect (under no drift the calibration's
    conversations are like the logs': counted in rows, its scatter sat low, and calibrations on
    20% of the held-out conversations said drift on the rest 9 times in 200; 0 in 100 now)."""
    n = len(covered)
    binomial = q * (1 - q) / max(n, 1)
    v = binomial
    if clusters is not None and n > 1:
        _, ix = np.unique(clusters, return_inverse=True)
        g = int(ix.max()) + 1
        if g > 1:
            per = np.bincount(ix, weights=covered) - covered.mean() * np.bincount(ix)
            v = max(v, g / (g - 1) * float(per @ per) / n**2)
    if isinstance(cal, tuple):
        group, counts = cal
        share = np.bincount(group, minlength=len(counts))[: len(counts)] / max(n, 1)
        used = share > 0
        if not (counts[used] > 0).all():
            return math.inf
        scatter = float((share[used] ** 2 / counts[used]).sum())
    else:
        scatter = 1.0 / cal if cal > 0 else 0.0
    return math.sqrt(v + q * (1 - q) * scatter * (v / binomial))


def _t_within(t: float, nu: int) -> float:
    """P(|T| <= t) for Student's t with ``nu`` (whole) degrees of freedom: Abramowitz and Stegun
    26.7.3-4, exact (no scipy on the serving install)."""
    theta = math.atan(t / math.sqrt(nu))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if nu % 2:  # odd: (2 / pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, total = 1.0, 1.0 if nu > 1 else 0.0
        for k in range(1, (nu - 3) // 2 + 1):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + (s * math.cos(theta) * total if nu > 1 else 0.0))
    term = total = 1.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for k in range(1, (nu - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def few_clusters_z(z: float, clusters: np.ndarray | None) -> float:
    """``z`` standard errors, for a share over few clusters: Student's t quantile at the same
    one-sided tail as the normal's ``z``, with one degree of freedom fewer than the clusters (a
    cluster-robust error from few conversations is itself uncertain: one 300-turn session judged
    with ``z`` alone said ``drift`` on 21% of undrifted draws in a reviewer's simulation); ``z``
    without clusters, inf for one (one conversation says nothing of the next)."""
    if not 0 < z <= 8:  # past 8 the normal's tail is below float precision here
        raise ValueError(f"z must be in (0, 8], got {z!r}")
    if clusters is None:
        return z
    nu = len(np.unique(clusters)) - 1
    if nu < 1:
        return math.inf
    return z if nu > 1000 else _t_quantile(z, nu)


@functools.lru_cache(maxsize=256)
def _t_quantile(z: float, nu: int) -> float:
    """The ``t`` with P(|T| <= t) = P(|N| <= z) for ``nu`` degrees of freedom, by bisection
    (cached: drift asks it per group and quantile, up to 10 ms each near 1,000)."""
    within = math.erf(z / math.sqrt(2))  # P(|N| <= z); the t quantile with the same
    lo, hi = z, z
    while _t_within(hi, nu) < within:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_within(mid, nu) < within else (lo, mid)
    return hi


def group_report(name: str, probs: np.ndarray, rl: np.ndarray, pred_q: np.ndarray | None,
                 quantiles: Sequence[float], ref: np.ndarray | None, scheme, bounds: DriftBounds,
                 clusters: np.ndarray | None = None, cal: int | tuple[np.ndarray, np.ndarray] = 0,
                 coverage_decides: bool = True) -> dict:
    """One group's distances and coverage, and the bounds they break (``coverage_se`` for
    ``clusters`` and ``cal``). ``coverage_decides``: False for a source or a generator, whose
    coverage below its floor is a note: calibration covers q over its whole mix, not over each
    part of it (on the shipped bundle's undrifted held-out rows one generator's q0.9 covers 0.78,
    and 300 of its prompts were called drift)."""
    n = len(rl)
    buckets = scheme.bucket_of(rl)
    observed = np.bincount(buckets, minlength=scheme.n_buckets).astype(float)
    predicted = probs.sum(axis=0)
    draws = max(1, round(effective_rows(buckets, probs, clusters))) if n else 0
    row: dict = {"group": name, "n": n, "decides": n >= bounds.min_rows, "tv_draws": draws,
                 "tv_vs_predicted": _tv(observed, predicted),
                 "tv_vs_reference": _tv(observed, ref) if ref is not None else None,
                 "median_rl": float(np.median(rl)), "coverage": {}, "problems": [], "notes": [], "shortfalls": []}
    by_rows = bounds.max_tv + sampling_tv(predicted, n)
    limit = _draws_limit(by_rows, bounds.max_tv, predicted, draws, n)
    row["tv_limit_predicted"] = limit
    if row["tv_vs_predicted"] > limit:
        row["problems"].append(f"predicted distribution off by TV {_beyond(row['tv_vs_predicted'], '>', limit)}")
    elif by_rows < 1.0 <= limit:  # counted in rows it could break, in draws no distance can: said
        row["notes"].append(f"its {n} rows are {draws} independent draw(s) by their conversations and prompts: "
                            "too few for any distance to break the TV bound")
    if ref is not None:
        limit = _draws_limit(bounds.max_tv + sampling_tv(ref, n), bounds.max_tv, ref, draws, n)
        row["tv_limit_reference"] = limit
        if row["tv_vs_reference"] > limit:
            row["notes"].append(f"response lengths shifted by TV {_beyond(row['tv_vs_reference'], '>', limit)} "
                                   "from the bundle's data")
    if pred_q is not None:
        for j, q in enumerate(quantiles):
            covered = (rl <= pred_q[:, j]).astype(float)
            cov = float(covered.mean()) if n else math.nan
            allowance = few_clusters_z(bounds.z, clusters) * coverage_se(covered, clusters, q, cal)
            floor = q - bounds.tolerance - allowance
            if not floor > 0:  # no coverage could break it: said, not a silent pass
                floor = None
                groups = len(np.unique(clusters)) if clusters is not None else n
                row["notes"].append(  # (was: "too few" where the tolerance was the cause)
                    f"q{q}: --tolerance {bounds.tolerance:g} is not below q: its coverage is not judged"
                    if not q - bounds.tolerance > 0 else
                    f"q{q}: {groups} conversation(s) or prompt(s) are too few to judge its coverage (no share "
                    "could fall below the bound)")
            row["coverage"][str(q)] = {"achieved": cov, "floor": floor}
            if floor is not None and cov < floor:
                if coverage_decides:
                    row["problems"].append(f"q{q} covers {_beyond(cov, '<', floor)}")
                else:
                    row["shortfalls"].append(f"q{q} covers {_beyond(cov, '<', floor)} (calibration holds q "
                                             "over the whole mix, not over each source or generator)")
    row["notes"] += row["shortfalls"]
    return row


def _draws_limit(by_rows: float, max_tv: float, ref: np.ndarray, draws: int, n: int) -> float:
    """A TV bound at ``draws`` independent draws of ``n`` rows, never below the rows' own
    (``by_rows``: the sampled percentile is not monotone in the draws)."""
    return max(by_rows, max_tv + sampling_tv(ref, draws)) if draws < n else by_rows


def _beyond(value: float, op: str, bound: float) -> str:
    """``value (op bound)`` with as many decimals (3 to 6) as it takes to tell them apart."""
    for digits in range(3, 7):
        a, b = f"{value:.{digits}f}", f"{bound:.{digits}f}"
        if a != b:
            break
    return f"{a} ({op} {b})"


def drift_report(bundle: str | Path | None, data: Sequence[str | Path], *, bounds: DriftBounds = DriftBounds(),
                 on_error: str = "fail", threads: int | None = None) -> dict:
    """Predict on ``data`` (logs with responses) and compare, per group (see the module doc)."""
    from rlpredict.serve.runtime import Predictor

    p = Predictor.load(bundle, threads=threads)
    p.bundle.check_rl_tokenizer()
    cal = p.bundle.calibration
    qs = list(cal.quantiles) if cal is not None else []
    # a chunk at a time: only each sample's prediction, length and group are kept (was: every
    # log's text held at once, about 50 KB a row on long prompts)
    load = LoadReport()
    probs, rls, pred_q, codes = [], [], [], {"source": {}, "generator": {}}
    clusters: dict[int, int] = {}  # hash of (source, conversation or prompt) -> code: the coverage's groups
    cluster_of: list[int] = []
    labels: dict[str, list[int]] = {"source": [], "generator": []}
    chunk: list = []
    for sample in itertools.chain(iter_samples(data, load, on_error=on_error), [None]):  # type: ignore[arg-type]
        if sample is not None:
            chunk.append(sample)
        if chunk and (sample is None or len(chunk) >= CHUNK):
            attach_rl(chunk, p.bundle.rl_tokenizer)
            a = p.predict_arrays([s.messages for s in chunk], [s.generator for s in chunk], quantiles=qs or None)
            probs.append(a.probs.astype(np.float32))
            rls.append(np.array([s.rl_tokens for s in chunk], dtype=float))
            if a.quantile_tokens is not None:
                pred_q.append(a.quantile_tokens)
            for label in labels:
                labels[label] += [codes[label].setdefault(str(getattr(s, label)), len(codes[label])) for s in chunk]
            cluster_of += [clusters.setdefault(hash((s.source, s.group)), len(clusters)) for s in chunk]
            chunk = []
    if not rls:
        first = f"; first skipped: {load.examples[0]}" if load.examples else ""
        raise ValueError("no samples in " + ", ".join(str(d) for d in data) + f" (read {load.summary()}{first})")
    all_probs, rl = np.concatenate(probs), np.concatenate(rls)
    all_q = np.concatenate(pred_q) if pred_q else None
    n = len(rl)
    ref = reference_distribution(p.bundle.manifest, p.scheme.n_buckets)
    groups: list[tuple[str, np.ndarray]] = [("all", np.ones(n, dtype=bool))]
    for label in ("source", "generator"):
        values = np.asarray(labels[label])
        for v, code in sorted(codes[label].items()):
            if v != "None":
                groups.append((f"{label}={v}", values == code))
    cl = np.asarray(cluster_of)
    if cal is not None:
        index, counts = cal.offset_groups()
        offset_of = index[all_probs.argmax(axis=1)]  # each row's offset group, as tokens() picks it
    rows = [group_report(name, all_probs[m], rl[m], all_q[m] if all_q is not None else None,
                         qs, ref, p.scheme, bounds, cl[m], (offset_of[m], counts) if cal is not None else 0,
                         coverage_decides=name == "all") for name, m in groups]
    drifted = [r for r in rows if r["decides"] and r["problems"]]
    whole = rows[0]  # the "all" group: no group decides if it does not, nor where no bound of it could break
    can_break = whole["tv_limit_predicted"] < 1.0 or any(c["floor"] is not None for c in whole["coverage"].values())
    judged = whole["decides"] and can_break
    verdict = "drift" if drifted else "ok" if judged else "too few rows"
    why = (f"{n} rows, fewer than --min-rows {bounds.min_rows}: no group decides" if not whole["decides"] else
           f"{n} rows are {whole['tv_draws']} independent draw(s) by their conversations and prompts: no bound "
           f"could break at --max-tv {bounds.max_tv:g}, --tolerance {bounds.tolerance:g}")
    # (was: "ok" on logs nothing judged, exit 0; a reviewer's find)
    reasons = ([f"{r['group']}: {'; '.join(r['problems'])}" for r in drifted] if drifted else
               [why] + [f"{r['group']} (small): {'; '.join(r['problems'])}" for r in rows if r["problems"]]
               if not judged else [])
    notes = [f"{r['group']}: {'; '.join(r['notes'])}" for r in rows if r["decides"] and r["notes"]]
    if judged:  # a small group's broken bound does not decide, but is said (was: silent)
        notes += [f"{r['group']} ({r['n']} rows, fewer than --min-rows: does not decide): "
                  f"{'; '.join(r['problems'] + r['shortfalls'])}" for r in rows if not r["decides"]
                  and (r["problems"] or r["shortfalls"])]
    if not qs:
        notes.append("the bundle has no calibrated quantiles (`rlpredict calibrate`): coverage is not checked, "
                     "the verdict rests on the predicted distribution alone")
    return {"bundle": str(p.bundle.path), "load": load.summary(), "skipped_examples": load.examples,
            "samples": n,
            "calibrated_quantiles": qs, "bounds": bounds.__dict__, "groups": rows,
            "verdict": verdict, "reasons": reasons, "notes": notes}


def markdown(report: dict) -> str:
    qs = report["calibrated_quantiles"]
    head = ("| group | n | independent draws | TV vs predicted (limit) | TV vs bundle data | median RL |"
            + "".join(f" q{q} coverage |" for q in qs))
    lines = [head, "|---" * (6 + len(qs)) + "|"]
    for r in report["groups"]:
        ref = "-" if r["tv_vs_reference"] is None else f"{r['tv_vs_reference']:.3f}"
        cov = "".join(f" {r['coverage'][str(q)]['achieved']:.3f}"
                      f"{' (not judged)' if r['coverage'][str(q)]['floor'] is None else ''} |" for q in qs)
        mark = "" if r["decides"] else " (small)"
        lines.append(f"| {r['group']}{mark} | {r['n']} | {r['tv_draws']} | {r['tv_vs_predicted']:.3f} "
                     f"({r['tv_limit_predicted']:.3f}) | {ref} | {r['median_rl']:.0f} |{cov}")
    return "\n".join(lines)

