"""DICOM outputs of a scored photograph: heatmap Secondary Capture, Comprehensive SR, Parametric Map.

One module per kind of object (``sc``, ``sr``, ``pm``), the heatmap picture in ``render``, what
counts as a finding and how probabilities are written in ``findings``, and the shared identity
(deterministic UIDs, the model as Contributing Equipment) in ``identity``. Every output is in the
source's patient and study, in a new series per model and kind, marked as derived, unverified AI
output.
"""

from retinagate.outputs.findings import NO_FINDING, describe_findings, findings_of, probability_text
from retinagate.outputs.identity import (
    AI_DISCLAIMER,
    MANUFACTURER,
    SERIES_NUMBERS,
    ModelIdentity,
    derived_uid,
    output_uid,
    series_uid,
)
from retinagate.outputs.pm import build_pm
from retinagate.outputs.render import HeatmapFinding, Legend, display_shape, render_heatmaps, retina_heat
from retinagate.outputs.sc import ScEncoder, build_sc
from retinagate.outputs.sr import CODING_SCHEME, FrameScores, SrEncoder, build_report, build_sr

__all__ = [
    "AI_DISCLAIMER",
    "CODING_SCHEME",
    "MANUFACTURER",
    "NO_FINDING",
    "SERIES_NUMBERS",
    "FrameScores",
    "HeatmapFinding",
    "Legend",
    "ModelIdentity",
    "ScEncoder",
    "SrEncoder",
    "build_pm",
    "build_report",
    "build_sc",
    "build_sr",
    "derived_uid",
    "describe_findings",
    "display_shape",
    "findings_of",
    "output_uid",
    "probability_text",
    "render_heatmaps",
    "retina_heat",
    "series_uid",
]
