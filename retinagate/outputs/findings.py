"""Which labels are findings, and how a photograph's result is worded wherever a reader sees it.

A finding is a label whose probability is at or over the card's calibrated threshold for it,
compared unrounded. Every text that shows a probability next to that decision (the Secondary
Capture's legend and description, the SR's summary, the Parametric Map's description,
``retinagate score`` and ``retinagate results``) prints it with :func:`probability_text`, so the
printed number never reads on the other side of the threshold from the decision: 0.0499 against a
threshold of 0.05 prints as ``0.0499``, not ``0.05``.

What a photograph's result says is decided once, by :func:`summary_lines`: each disease finding
spelled out with its threshold ("Media haze (MH) 0.62, threshold 0.40"), most probable first;
Disease_Risk as the finding when it is the only one; otherwise "No finding above threshold"; and
the disease risk against its threshold. The SC draws these lines, the SR and the CLIs join them
with :func:`summary_text`, so no two of them can disagree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Final

from retinagate.labels import DISEASE_RISK, LABEL_DESCRIPTIONS

__all__ = [
    "NO_FINDING",
    "describe_findings",
    "finding_text",
    "findings_of",
    "label_name",
    "probability_text",
    "summary_lines",
    "summary_text",
    "threshold_text",
]

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
    """A threshold as written in the card, with at least two decimals like the probabilities (0.05, 0.50, 0.4375)."""
    two = f"{threshold:.2f}"
    return two if float(two) == threshold else f"{threshold:.6g}"


def label_name(label: str) -> str:
    """The label spelled out with its RFMiD code, ``Media haze (MH)``; Disease_Risk spelled out only."""
    name = LABEL_DESCRIPTIONS.get(label)
    if name is None:
        return label
    return name if label == DISEASE_RISK else f"{name} ({label})"


def finding_text(label: str, probability: float, threshold: float) -> str:
    """``Media haze (MH) 0.62, threshold 0.40``: the label spelled out, its probability and its threshold."""
    return f"{label_name(label)} {probability_text(probability, threshold)}, threshold {threshold_text(threshold)}"


def describe_findings(
    probabilities: Mapping[str, float],
    findings: Sequence[str],
    thresholds: Mapping[str, float],
    separator: str = "; ",
) -> str:
    """The findings in the order given, each as :func:`finding_text`, or :data:`NO_FINDING` when there are none."""
    if not findings:
        return NO_FINDING
    return separator.join(finding_text(name, probabilities[name], thresholds[name]) for name in findings)


def summary_lines(probabilities: Mapping[str, float], thresholds: Mapping[str, float]) -> list[str]:
    """What one photograph's result says, line by line; the one wording of the SC, the SR and the CLIs.

    Args:
        probabilities: Label to probability (of the photograph: for several frames, each label's highest).
        thresholds: Label to calibrated threshold, in the card's order (its labels are the ones read).

    Returns:
        ``Finding: <finding_text>`` per disease finding, most probable first, then the disease risk
        against its threshold; with Disease_Risk the only finding, that finding "(no single disease
        over its threshold)"; with none, :data:`NO_FINDING` and the disease risk.
    """
    labels = [name for name in thresholds if name in probabilities]
    findings = findings_of(probabilities, labels, [thresholds[name] for name in labels])
    diseases = [name for name in findings if name != DISEASE_RISK]
    lines = [f"Finding: {finding_text(name, probabilities[name], thresholds[name])}" for name in diseases]
    risk_over = DISEASE_RISK in findings
    if not diseases:
        if risk_over:
            alone = finding_text(DISEASE_RISK, probabilities[DISEASE_RISK], thresholds[DISEASE_RISK])
            return [f"Finding: {alone} (no single disease over its threshold)"]
        lines.append(NO_FINDING)
    if DISEASE_RISK in labels:
        risk, limit = probabilities[DISEASE_RISK], thresholds[DISEASE_RISK]
        side = "at or over" if risk_over else "under"
        lines.append(
            f"{label_name(DISEASE_RISK)} {probability_text(risk, limit)}, {side} threshold {threshold_text(limit)}"
        )
    return lines


def summary_text(probabilities: Mapping[str, float], thresholds: Mapping[str, float]) -> str:
    """:func:`summary_lines` on one line, joined by ``; `` (the CLIs, the SR, the SC's description)."""
    return "; ".join(summary_lines(probabilities, thresholds))
