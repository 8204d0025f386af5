"""Linear probe on frozen embeddings and classification metrics."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from slimformer.errors import UserError

# scikit-learn is imported inside the functions: importing it seeds Python's `random`, sets
# KMP_* environment variables and adds warnings filters, and importing slimformer must change nothing.


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def classification_metrics(y_true: Sequence[Any], y_pred: Sequence[Any]) -> dict:
    """Accuracy and macro precision / recall / F1 as floats."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    y_true, y_pred = list(y_true), list(y_pred)
    if len(y_true) != len(y_pred) or not y_true:
        raise UserError(f"classification metrics: expected equal non-empty label lists, found {len(y_true)} and {len(y_pred)}")
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    return {"accuracy": float(accuracy_score(y_true, y_pred)), "precision": float(p), "recall": float(r), "f1": float(f)}


def probe(train_x: Any, train_y: Sequence[Any], test_x: Any, test_y: Sequence[Any]) -> dict:
    """Fit standardise + logistic regression on `train_x`, report `classification_metrics` on the test set."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr, xte = _numpy(train_x), _numpy(test_x)
    ytr, yte = list(train_y), list(test_y)
    if xtr.ndim != 2 or len(xtr) != len(ytr):
        raise UserError(f"probe: expected train features (N, H) with N labels, found shape {xtr.shape} and {len(ytr)} labels")
    if xte.ndim != 2 or len(xte) != len(yte) or xte.shape[1] != xtr.shape[1]:
        raise UserError(f"probe: expected test features (M, {xtr.shape[1]}) with M labels, found shape {xte.shape} and {len(yte)} labels")
    if len(set(ytr)) < 2:
        raise UserError(f"probe: expected at least 2 classes in the training labels, found {sorted(set(map(str, ytr)))}")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=0))
    clf.fit(xtr, ytr)
    return classification_metrics(yte, clf.predict(xte).tolist())
