"""Evaluation metrics for classification and anomaly stacks. No TensorFlow here."""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
)

__all__ = ["anomaly_metrics", "choose_threshold", "classification_metrics", "pca_baseline_scores"]


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    """Return accuracy, macro F1, log loss and the confusion matrix of predicted probabilities."""
    predicted = probabilities.argmax(axis=1)
    every_class = list(range(len(classes)))
    clipped = np.clip(probabilities, 1e-7, 1.0)
    clipped = clipped / clipped.sum(axis=1, keepdims=True)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, average="macro", labels=every_class, zero_division=0)),
        "log_loss": float(log_loss(labels, clipped, labels=every_class)),
        "confusion_matrix": confusion_matrix(labels, predicted, labels=every_class).tolist(),
        "rows": int(len(labels)),
    }


def choose_threshold(is_anomaly: np.ndarray, scores: np.ndarray) -> float:
    """Return the score threshold with the best F1 for flagging anomalies (score >= threshold)."""
    if not is_anomaly.any() or is_anomaly.all():
        # F1 is undefined with one class; flag what lies above every normal score.
        return float(np.max(scores[~is_anomaly])) if (~is_anomaly).any() else float(np.min(scores))
    precision, recall, thresholds = precision_recall_curve(is_anomaly, scores)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    return float(thresholds[int(np.argmax(f1))])


def anomaly_metrics(
    validation_is_anomaly: np.ndarray,
    validation_scores: np.ndarray,
    is_anomaly: np.ndarray,
    scores: np.ndarray,
) -> dict:
    """Return ROC AUC and PR AUC of `scores`, and precision, recall and F1 at a threshold.

    The threshold is chosen on the validation split, never on the split evaluated.
    """
    threshold = choose_threshold(validation_is_anomaly, validation_scores)
    flagged = scores >= threshold
    both_classes = bool(is_anomaly.any() and (~is_anomaly).any())
    return {
        "roc_auc": float(roc_auc_score(is_anomaly, scores)) if both_classes else None,
        "pr_auc": float(average_precision_score(is_anomaly, scores)) if both_classes else None,
        "threshold": threshold,
        "precision": float(precision_score(is_anomaly, flagged, zero_division=0)),
        "recall": float(recall_score(is_anomaly, flagged, zero_division=0)),
        "f1": float(f1_score(is_anomaly, flagged, zero_division=0)),
        "anomalies": int(is_anomaly.sum()),
        "rows": int(len(scores)),
    }


def pca_baseline_scores(normal_train: np.ndarray, splits: dict[str, np.ndarray], components: int) -> dict:
    """Score each split by its reconstruction error under a PCA fitted on normal training rows."""
    components = max(1, min(components, normal_train.shape[1], len(normal_train)))
    pca = PCA(n_components=components, random_state=0).fit(normal_train)
    scores = {}
    for name, values in splits.items():
        reconstructed = pca.inverse_transform(pca.transform(values))
        scores[name] = ((values - reconstructed) ** 2).mean(axis=1)
    return scores

