"""Tests for retinagate.outputs.findings: what is a finding, and how its probability is written."""

from __future__ import annotations

import numpy as np
import pytest

from retinagate.outputs.findings import (
    NO_FINDING,
    describe_findings,
    findings_of,
    probability_text,
    summary_lines,
    summary_text,
)


@pytest.mark.parametrize(
    ("probability", "threshold", "text"),
    [
        (0.8312, 0.5, "0.83"),  # far from the threshold: two decimals
        (0.05, 0.05, "0.05"),  # at the threshold is over it
        (0.0499, 0.05, "0.0499"),  # would round up to the threshold it is under
        (0.049999, 0.05, "0.0499"),  # past four decimals: truncated towards its side
        (0.0504, 0.0501, "0.0504"),  # over a threshold that two or three decimals would hide
        (0.50004, 0.5, "0.50"),
        (0.4996, 0.5, "0.4996"),
    ],
)
def test_a_probability_is_printed_on_the_same_side_of_its_threshold_as_it_is(
    probability: float, threshold: float, text: str
) -> None:
    assert probability_text(probability, threshold) == text
    assert (float(text) >= threshold) == (probability >= threshold)


def test_findings_are_compared_unrounded_and_described_with_the_same_digits() -> None:
    labels, thresholds = ("DR", "TSLN", "MH"), (0.5, 0.05, 0.3)
    probabilities = {"DR": 0.91, "TSLN": 0.0499, "MH": 0.3}

    findings = findings_of(probabilities, labels, thresholds)

    assert findings == ["DR", "MH"]  # TSLN 0.0499 is under 0.05, however it rounds
    by_label = dict(zip(labels, thresholds, strict=True))
    assert describe_findings(probabilities, findings, by_label) == (
        "Diabetic retinopathy (DR) 0.91, threshold 0.50; Media haze (MH) 0.30, threshold 0.30"
    )
    assert describe_findings(probabilities, [], by_label) == NO_FINDING == "No finding above threshold"


THRESHOLDS = {"Disease_Risk": 0.25, "DR": 0.5, "MH": 0.4, "TSLN": 0.05}


def test_the_summary_spells_out_each_disease_finding_with_its_threshold_then_the_disease_risk() -> None:
    probabilities = {"Disease_Risk": 0.71, "DR": 0.55, "MH": 0.62, "TSLN": 0.0499}

    assert summary_lines(probabilities, THRESHOLDS) == [
        "Finding: Media haze (MH) 0.62, threshold 0.40",
        "Finding: Diabetic retinopathy (DR) 0.55, threshold 0.50",
        "Disease risk (any abnormality) 0.71, at or over threshold 0.25",
    ]


def test_with_no_disease_finding_the_summary_never_names_a_label_under_its_threshold() -> None:
    """Issue 13 item 7: "No disease finding (highest: TSLN 0.05)" over "Disease risk 0.28 (over threshold)"."""
    risk_only = {"Disease_Risk": 0.28, "DR": 0.1, "MH": 0.1, "TSLN": 0.0499}
    nothing = {**risk_only, "Disease_Risk": 0.2499}

    assert summary_lines(risk_only, THRESHOLDS) == [
        "Finding: Disease risk (any abnormality) 0.28, threshold 0.25 (no single disease over its threshold)"
    ]
    assert (
        summary_text(nothing, THRESHOLDS)
        == f"{NO_FINDING}; Disease risk (any abnormality) 0.2499, under threshold 0.25"
    )


def test_no_probability_under_its_threshold_prints_like_one_at_or_over_it() -> None:
    rng = np.random.default_rng(13)
    for threshold in [*rng.random(200), 0.05, 0.5, 0.4375, 0.0501, 0.123456789]:
        for offset in (-1e-3, -1e-5, -1e-9, 0.0, 1e-9, 1e-5, 1e-3):
            probability = min(1.0, max(0.0, threshold + offset))
            printed = float(probability_text(probability, threshold))
            assert (printed >= threshold) == (probability >= threshold), (probability, threshold)
