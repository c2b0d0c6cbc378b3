"""Which labels are findings, and how their probabilities are written wherever a reader sees them.

A finding is a label whose probability is at or over the card's calibrated threshold for it,
compared unrounded. Every text that shows a probability next to that decision (the Secondary
Capture's legend and description, the Parametric Map's description, ``retinagate score``) prints it
with :func:`probability_text`, so the printed number never reads on the other side of the threshold
from the decision: 0.0499 against a threshold of 0.05 prints as ``0.0499``, not ``0.05``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Final

__all__ = ["NO_FINDING", "describe_findings", "findings_of", "probability_text", "threshold_text"]

#: What the outputs say when no label reaches its threshold.
NO_FINDING: Final = "No finding above threshold"

#: Decimals tried before giving up on rounding (then the number is truncated towards its side).
_MOST_DIGITS: Final = 4


def findings_of(probabilities: Mapping[str, float], labels: Sequence[str], thresholds: Sequence[float]) -> list[str]:
    """Labels whose probability reaches the threshold, most probable first (ties in label order)."""
    over = [(probabilities[name], index, name) for index, (name, t) in enumerate(zip(labels, thresholds, strict=True))
            if probabilities[name] >= t]  # fmt: skip
    return [name for _, _, name in sorted(over, key=lambda item: (-item[0], item[1]))]


def probability_text(probability: float, threshold: float, digits: int = 2) -> str:
    """The probability with the fewest decimals (at least ``digits``) that keep it on its side of the threshold.

    Rounded to ``digits`` decimals when that reads the same way as the unrounded comparison
    (``probability >= threshold``); otherwise with more decimals, up to four, and past that
    truncated towards its own side (0.049999 against 0.05 prints ``0.0499``).
    """
    over = probability >= threshold
    for places in range(digits, _MOST_DIGITS + 1):
        text = f"{probability:.{places}f}"
        if (float(text) >= threshold) == over:
            return text
    scale = 10**_MOST_DIGITS
    cut = math.ceil(probability * scale) if over else math.floor(probability * scale)
    return f"{cut / scale:.{_MOST_DIGITS}f}"


def threshold_text(threshold: float) -> str:
    """A threshold as written in the card, without trailing zeros (0.05, 0.5, 0.4375)."""
    return f"{threshold:.6g}"


def describe_findings(
    probabilities: Mapping[str, float],
    findings: Sequence[str],
    thresholds: Mapping[str, float],
    separator: str = ", ",
) -> str:
    """``DR 0.83, MH 0.61`` for the findings in the order given, or :data:`NO_FINDING` when there are none."""
    if not findings:
        return NO_FINDING
    return separator.join(f"{name} {probability_text(probabilities[name], thresholds[name])}" for name in findings)
