"""Metrics against the spec's check vectors (imbalanced-learn's definitions)."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_dala.training.metrics import classification_metrics, format_table


def test_binary_check_vector():
    metrics = classification_metrics([1, 0, 0, 1, 0, 1], [0, 0, 1, 1, 0, 1], ["benign", "malignant"], 1)
    assert metrics["binary"]["gmean"] == pytest.approx(0.6667, abs=1e-4)
    assert metrics["per_class"]["malignant"]["iba"] == pytest.approx(0.4444, abs=1e-4)
    assert metrics["per_class"]["benign"]["iba"] == pytest.approx(0.4444, abs=1e-4)
    assert metrics["binary"]["recall"] == pytest.approx(2 / 3)
    assert metrics["accuracy"] == pytest.approx(4 / 6)


def test_multiclass_check_vector():
    metrics = classification_metrics([0, 1, 2, 2, 2], [0, 0, 2, 2, 1], ["a", "b", "c"])
    gmeans = [metrics["per_class"][c]["gmean"] for c in "abc"]
    ibas = [metrics["per_class"][c]["iba"] for c in "abc"]
    np.testing.assert_allclose(gmeans, [0.866, 0.0, 0.816], atol=1e-3)
    np.testing.assert_allclose(ibas, [0.769, 0.0, 0.644], atol=1e-3)
    assert metrics["weighted"]["gmean"] == pytest.approx(0.6631, abs=1e-4)
    assert metrics["weighted"]["iba"] == pytest.approx(0.5404, abs=1e-4)
    assert metrics["weighted"]["support"] == 5
    assert metrics["confusion_matrix"] == [[1, 0, 0], [1, 0, 0], [0, 1, 2]]


def test_roc_auc_and_table():
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    metrics = classification_metrics([0, 0, 1, 1], [0, 0, 1, 1], ["benign", "malignant"], 1, probabilities)
    assert metrics["roc_auc"] == 1.0
    table = format_table(metrics, "title")
    assert "malignant" in table and "GMean 1.0000" in table and "ROC AUC 1.0000" in table
