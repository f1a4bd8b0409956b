"""Metrics the RL-prediction literature reports, from one probability matrix per method.

Every method (the fine-tuned encoder and each baseline) yields probabilities over buckets; from
them: the bucket (argmax), the predicted length (the predictive median, which minimizes absolute
error) and two reservations: the scheme's per-bucket reservation of the argmax bucket, and the
``q``-quantile of the predicted length distribution (wider when the model is unsure).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rlpredict.buckets import BucketScheme


@dataclass(frozen=True)
class Decoded:
    bucket: np.ndarray
    pred_tokens: np.ndarray
    reserve_bucket: np.ndarray
    reserve_quantile: np.ndarray


def decode(probs: np.ndarray, scheme: BucketScheme, q: float = 0.9) -> Decoded:
    bucket = probs.argmax(axis=1)
    return Decoded(bucket=bucket,
                   pred_tokens=scheme.median_tokens(probs),
                   reserve_bucket=np.asarray(scheme.reserve_tokens, dtype=float)[bucket],
                   reserve_quantile=scheme.quantile_tokens(probs, q))  # as served (was: no rounding of float noise)


def quantile_tag(q: float) -> str:
    """``q90`` for 0.9, ``q975`` for 0.975: how ``rl_metrics`` names its quantile reservation's
    metrics, as ``annotate`` names the column (0.975 was ``q98``; 0.995 and 1 both ``q100``)."""
    from rlpredict.serve.conformal import quantile_digits

    return f"q{quantile_digits(q)}"


def rl_metrics(rl: np.ndarray, probs: np.ndarray, scheme: BucketScheme, q: float = 0.9) -> dict[str, float]:
    """Bucket accuracy, +-1 bucket, MAE, Acc-50/100, Kendall's tau-b, reservation coverage/ratios."""
    from scipy.stats import kendalltau

    rl = np.asarray(rl, dtype=float)
    d = decode(probs, scheme, q)
    true_b = scheme.bucket_of(rl)
    err = np.abs(d.pred_tokens - rl)
    # Ties in the point prediction are broken by the expected bucket index, so ranking uses the
    # whole probability vector (what an SJF-style scheduler sorts by).
    rank_score = d.pred_tokens + 1e-3 * (probs @ np.arange(probs.shape[1]))
    tau = kendalltau(rank_score, rl).statistic if rl.size > 1 else float("nan")
    denom = np.maximum(rl, 1.0)
    out = {
        "n": int(rl.size),
        "bucket_acc": float(np.mean(d.bucket == true_b)),
        "within1_acc": float(np.mean(np.abs(d.bucket - true_b) <= 1)),
        "mae": float(err.mean()),
        "acc50": float(np.mean(err <= 50)),
        "acc100": float(np.mean(err <= 100)),
        "kendall_tau": float(tau) if np.isfinite(tau) else 0.0,  # constant predictions rank nothing
    }
    for tag, res in (("", d.reserve_bucket), (f"_{quantile_tag(q)}", d.reserve_quantile)):
        out[f"coverage{tag}"] = float(np.mean(rl <= res))
        out[f"reserve_ratio_total{tag}"] = float(res.sum() / max(rl.sum(), 1.0))
        out[f"reserve_ratio_mean{tag}"] = float(np.mean(res / denom))
    return out


def confusion(rl: np.ndarray, probs: np.ndarray, scheme: BucketScheme) -> np.ndarray:
    """Counts, rows = true bucket, columns = predicted (argmax) bucket."""
    k = scheme.n_buckets
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (scheme.bucket_of(rl), probs.argmax(axis=1)), 1)
    return m
