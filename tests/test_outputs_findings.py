"""Tests for retinagate.outputs.findings: what is a finding, and how its probability is written."""

from __future__ import annotations

import pytest

from retinagate.outputs.findings import NO_FINDING, describe_findings, findings_of, probability_text


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
    assert describe_findings(probabilities, findings, by_label) == "DR 0.91, MH 0.30"
    assert describe_findings(probabilities, [], by_label) == NO_FINDING == "No finding above threshold"
