"""Honest baselines, scored on the same split and the same metrics as the encoder.

Each baseline turns texts into a probability matrix over the bucket scheme, like the encoder:
regressors (on log RL) become distributions through their out-of-fold residuals, so their
reservations are judged by the same rule as everyone's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlpredict.buckets import BucketScheme


class Baseline:
    name: str = "baseline"

    def fit(self, texts: Sequence[str], rl: np.ndarray, scheme: BucketScheme) -> Baseline:
        raise NotImplementedError

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError


class ConstantPrior(Baseline):
    """Always the training distribution: its median is the constant-median prediction."""

    name = "constant"

    def fit(self, texts, rl, scheme):
        self.prior = np.bincount(scheme.bucket_of(rl), minlength=scheme.n_buckets) / len(rl)
        return self

    def predict_proba(self, texts):
        return np.tile(self.prior, (len(texts), 1))


class _LogRegressor(Baseline):
    """A regressor of log(1 + RL); probabilities from its out-of-fold residuals."""

    def _model(self):
        raise NotImplementedError

    def fit(self, texts, rl, scheme):
        from sklearn.model_selection import cross_val_predict

        y = np.log1p(np.asarray(rl, dtype=float))
        oof = cross_val_predict(self._model(), list(texts), y, cv=3)
        self.residuals = np.sort(y - oof)
        self.model = self._model().fit(list(texts), y)
        self.log_edges = np.log1p(np.asarray(scheme.edges, dtype=float))
        return self

    def predict_proba(self, texts):
        mu = self.model.predict(list(texts))
        cdf = np.searchsorted(self.residuals, self.log_edges[None, :] - mu[:, None], side="right")
        cdf = cdf / len(self.residuals)
        cdf[:, -1] = 1.0
        p = np.diff(cdf, axis=1, prepend=0.0)
        return (p + 1e-9) / (p + 1e-9).sum(axis=1, keepdims=True)


def _length_features(texts) -> np.ndarray:
    return np.array([[np.log1p(len(t)), np.log1p(len(t.split()))] for t in texts])


class PromptLength(_LogRegressor):
    """Linear regression of log RL on log prompt length (characters and words)."""

    name = "prompt_length"

    def _model(self):
        from sklearn.linear_model import LinearRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import FunctionTransformer

        return make_pipeline(FunctionTransformer(_length_features), LinearRegression())


def _tfidf():
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=200_000, sublinear_tf=True)


class TfidfRidge(_LogRegressor):
    name = "tfidf_ridge"

    def _model(self):
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import make_pipeline

        return make_pipeline(_tfidf(), Ridge(alpha=1.0))


class TfidfLogistic(Baseline):
    """TF-IDF + multinomial logistic regression over the buckets."""

    name = "tfidf_logreg"

    def fit(self, texts, rl, scheme):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        self.k = scheme.n_buckets
        self.model = make_pipeline(_tfidf(), LogisticRegression(C=1.0, max_iter=300))
        self.model.fit(list(texts), scheme.bucket_of(rl))
        return self

    def predict_proba(self, texts):
        p = np.zeros((len(texts), self.k))
        p[:, self.model.classes_] = self.model.predict_proba(list(texts))
        return p


BASELINES: dict[str, type[Baseline]] = {
    c.name: c for c in (ConstantPrior, PromptLength, TfidfRidge, TfidfLogistic)}
