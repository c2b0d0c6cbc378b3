"""Ranking metrics and the RIADD score, checked against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from retinagate.labels import DISEASE_LABELS, LABELS
from train import metrics as m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_average_precision_match_sklearn_including_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) + 0.3 * truth, 1)  # rounding makes many ties
    assert m.auroc(truth, scores) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    assert m.average_precision(truth, scores) == pytest.approx(average_precision_score(truth, scores), abs=1e-12)


def test_roc_curve_matches_sklearn_points() -> None:
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, 100)
    scores = np.round(rng.random(100), 2)
    fpr, tpr = m.roc_curve(truth, scores)
    ref_fpr, ref_tpr, _ = roc_curve(truth, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)


def test_single_class_label_has_no_auroc_and_is_left_out_of_the_macro_mean() -> None:
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 2, (60, len(LABELS)))
    truth[:, 5] = 0  # no positive at all
    truth[:, 6] = 1  # no negative at all
    scores = rng.random(truth.shape)
    result = m.compute_metrics(truth, scores)
    assert result.auroc[5] is None and result.auroc[6] is None
    assert result.average_precision[5] is None and result.average_precision[6] is not None
    usable = [c for c in range(len(LABELS)) if c not in (5, 6)]
    expected = np.mean([roc_auc_score(truth[:, c], scores[:, c]) for c in usable])
    assert result.macro_auroc == pytest.approx(expected)
    with_positives = [c for c in range(len(LABELS)) if c != 5]
    assert result.map == pytest.approx(
        np.mean([average_precision_score(truth[:, c], scores[:, c]) for c in with_positives])
    )


def test_riadd_score_averages_disease_risk_auroc_with_the_mean_of_disease_auroc_and_map() -> None:
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 2, (80, len(LABELS)))
    truth[:, LABELS.index("RP")] = 0  # a disease column without positives is dropped, as RIADD did
    scores = rng.random(truth.shape) + 0.4 * truth
    result = m.compute_metrics(truth, scores)

    disease = [LABELS.index(n) for n in DISEASE_LABELS if truth[:, LABELS.index(n)].any()]
    ml_auc = roc_auc_score(truth[:, disease], scores[:, disease], average="macro")
    ml_map = average_precision_score(truth[:, disease], scores[:, disease], average="macro")
    risk = roc_auc_score(truth[:, 0], scores[:, 0])
    assert result.disease_risk_auroc == pytest.approx(risk)
    assert result.ml_auroc == pytest.approx(ml_auc)
    assert result.ml_map == pytest.approx(ml_map)
    assert result.riadd_score == pytest.approx((risk + (ml_auc + ml_map) / 2) / 2)


def test_to_dict_carries_per_label_detail_and_the_summary() -> None:
    truth = np.eye(len(LABELS), dtype=np.uint8).repeat(2, axis=0)
    scores = truth * 0.9 + 0.05
    data = m.compute_metrics(truth, scores, loss=0.25).to_dict()
    assert data["macro_auroc"] == pytest.approx(1.0)
    assert data["loss"] == 0.25
    assert data["per_label"]["DR"] == {"auroc": 1.0, "average_precision": 1.0, "positives": 2}


def test_mismatched_shapes_are_refused_with_the_shapes_named() -> None:
    with pytest.raises(ValueError, match=r"\(3, 29\).*\(3, 28\)"):
        m.compute_metrics(np.zeros((3, 29)), np.zeros((3, 28)))
    with pytest.raises(ValueError, match="only 0 and 1"):
        m.auroc([0, 2, 1], [0.1, 0.2, 0.3])
