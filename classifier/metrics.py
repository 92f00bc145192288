"""Classification metrics from predicted probabilities, computed with scikit-learn.

Every metric a pathology reader asks for: accuracy, balanced accuracy (mean per-class
sensitivity), macro-F1, per-class sensitivity (recall) and specificity, one-vs-rest ROC AUC per
class and their macro mean, and the confusion matrix (rows: true class, columns: predicted).
:func:`by_group` aggregates tiles to the image or patient they come from (the level the label of
most public sets belongs to): the mean of the tiles' probabilities, or their majority vote.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             roc_auc_score)


def classification_metrics(y_true, probs, classes: list[str]) -> dict:
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    if probs.shape != (len(y_true), k):
        raise ValueError(f"probs must be {len(y_true)} x {k}, got {probs.shape}")
    y_pred = probs.argmax(1)
    labels = list(range(k))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    tp = np.diag(cm).astype(np.float64)
    fn = cm.sum(1) - tp
    fp = cm.sum(0) - tp
    tn = cm.sum() - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        spec = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
    auc = []
    for c in labels:
        pos = y_true == c
        auc.append(float(roc_auc_score(pos, probs[:, c])) if 0 < pos.sum() < len(pos) else math.nan)
    present = [a for a in auc if not math.isnan(a)]
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "auc": float(np.mean(present)) if present else math.nan,
        "per_class": {c: {"sensitivity": float(sens[i]), "specificity": float(spec[i]), "auc": auc[i],
                          "support": int(tp[i] + fn[i])} for i, c in enumerate(classes)},
        "confusion": cm.tolist(),
    }


def by_group(y_true, probs, groups, how: str = "mean") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(labels, probabilities, group ids) with one row per group: the label is the majority label
    of the group's tiles; ``how``: ``mean`` averages their probabilities, ``vote`` gives each class
    the share of the group's tiles predicted as it (ties broken by the mean probability)."""
    y_true, probs = np.asarray(y_true, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    ids = sorted(set(groups))
    where = {g: i for i, g in enumerate(ids)}
    gi = np.array([where[g] for g in groups])
    k = probs.shape[1]
    labels = np.array([np.bincount(y_true[gi == i], minlength=k).argmax() for i in range(len(ids))])
    mean = np.stack([probs[gi == i].mean(0) for i in range(len(ids))])
    if how == "mean":
        return labels, mean, ids
    votes = np.stack([np.bincount(probs[gi == i].argmax(1), minlength=k) / (gi == i).sum() for i in range(len(ids))])
    return labels, votes + 1e-6 * mean, ids
