"""Classification metrics, exactly as imbalanced-learn and scikit-learn define them.

Per class (one-vs-rest): precision, recall (sensitivity), specificity, F1, GMean, IBA (α = 0.1), and a
support-weighted average row — imbalanced-learn's ``classification_report_imbalanced``. For two
classes also the binary figures with the positive (malignant/tumour) class; plus accuracy, balanced
accuracy, macro precision/recall/F1, ROC AUC and the confusion matrix.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from imblearn.metrics import (
    classification_report_imbalanced,
    geometric_mean_score,
    make_index_balanced_accuracy,
    sensitivity_score,
    specificity_score,
)
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

IBA_ALPHA = 0.1
_ROW_KEYS = {
    "pre": "precision",
    "rec": "recall",
    "spe": "specificity",
    "f1": "f1",
    "geo": "gmean",
    "iba": "iba",
    "sup": "support",
}


def classification_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    class_names: list[str],
    positive_index: int | None = None,
    probabilities: np.ndarray | None = None,
) -> dict[str, Any]:
    """All figures as a JSON-able dict (floats, lists)."""
    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(y_pred, dtype=int)
    labels = list(range(len(class_names)))
    report = classification_report_imbalanced(
        y_true,
        y_pred,
        labels=labels,
        target_names=class_names,
        output_dict=True,
        alpha=IBA_ALPHA,
        zero_division=0,
    )
    per_class = {
        name: {_ROW_KEYS[k]: float(v) for k, v in report[name].items() if k in _ROW_KEYS}
        for name in class_names
        if name in report
    }
    weighted = {_ROW_KEYS[k[4:]]: float(v) for k, v in report.items() if k.startswith("avg_") and k[4:] in _ROW_KEYS}
    weighted["support"] = float(report.get("total_support", len(y_true)))
    result: dict[str, Any] = {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "macro": {
            "precision": float(precision_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
            "recall": float(recall_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
            "f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        },
        "per_class": per_class,
        "weighted": weighted,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "class_names": list(class_names),
    }
    if len(class_names) == 2 and positive_index is not None:
        result["binary"] = binary_metrics(y_true, y_pred, positive_index)
        result["binary"]["positive_class"] = class_names[positive_index]
    result["roc_auc"] = _roc_auc(y_true, probabilities, positive_index, len(class_names))
    return result


def binary_metrics(y_true: np.ndarray, y_pred: np.ndarray, positive_index: int) -> dict[str, float]:
    """Precision, recall, specificity, F1, GMean and IBA with ``positive_index`` as the positive class."""
    iba = make_index_balanced_accuracy(alpha=IBA_ALPHA, squared=True)(geometric_mean_score)
    kwargs = {"pos_label": positive_index, "average": "binary"}
    return {
        "precision": float(precision_score(y_true, y_pred, zero_division=0, **kwargs)),
        "recall": float(sensitivity_score(y_true, y_pred, **kwargs)),
        "specificity": float(specificity_score(y_true, y_pred, **kwargs)),
        "f1": float(f1_score(y_true, y_pred, zero_division=0, **kwargs)),
        "gmean": float(geometric_mean_score(y_true, y_pred, **kwargs)),
        "iba": float(iba(y_true, y_pred, **kwargs)),
    }


def _roc_auc(
    y_true: np.ndarray, probabilities: np.ndarray | None, positive_index: int | None, n_classes: int
) -> float | None:
    if probabilities is None or len(np.unique(y_true)) < 2:
        return None
    if n_classes == 2:
        pos = 1 if positive_index is None else positive_index
        return float(roc_auc_score(y_true == pos, probabilities[:, pos]))
    if len(np.unique(y_true)) < n_classes:
        return None
    return float(roc_auc_score(y_true, probabilities, multi_class="ovr", average="macro"))


def format_table(metrics: dict[str, Any], title: str = "") -> str:
    """A readable table: one row per class, the weighted row, then the summary figures."""
    head = f"{'class':<16}{'precision':>10}{'recall':>9}{'spec':>8}{'f1':>8}{'gmean':>8}{'iba':>8}{'support':>9}"
    lines = [title, head, "-" * len(head)] if title else [head, "-" * len(head)]
    rows = [*list(metrics["per_class"].items()), ("weighted avg", metrics["weighted"])]
    for name, row in rows:
        lines.append(
            f"{name[:15]:<16}{row.get('precision', 0):>10.4f}{row.get('recall', 0):>9.4f}"
            f"{row.get('specificity', 0):>8.4f}{row.get('f1', 0):>8.4f}{row.get('gmean', 0):>8.4f}"
            f"{row.get('iba', 0):>8.4f}{int(row.get('support', 0)):>9d}"
        )
    lines.append("-" * len(head))
    summary = (
        f"accuracy {metrics['accuracy']:.4f}  balanced accuracy {metrics['balanced_accuracy']:.4f}  "
        f"macro F1 {metrics['macro']['f1']:.4f}"
    )
    if metrics.get("roc_auc") is not None:
        summary += f"  ROC AUC {metrics['roc_auc']:.4f}"
    lines.append(summary)
    if "binary" in metrics:
        b = metrics["binary"]
        lines.append(
            f"binary ({b['positive_class']} positive): precision {b['precision']:.4f} recall {b['recall']:.4f} "
            f"specificity {b['specificity']:.4f} F1 {b['f1']:.4f} GMean {b['gmean']:.4f} IBA {b['iba']:.4f}"
        )
    return "\n".join(lines)
