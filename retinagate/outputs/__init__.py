"""DICOM outputs of a scored photograph: heatmap Secondary Capture, Comprehensive SR, Parametric Map.

One module per kind of object (``sc``, ``sr``, ``pm``), the heatmap picture in ``render`` and the
shared identity (deterministic UIDs, the model as Contributing Equipment) in ``identity``. Every
output is in the source's patient and study, in a new series per model and kind, marked as derived,
unverified AI output.
"""

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
from retinagate.outputs.render import HeatmapFinding, Legend, display_shape, render_heatmaps
from retinagate.outputs.sc import ScEncoder, build_sc
from retinagate.outputs.sr import CODING_SCHEME, FrameScores, SrEncoder, build_report, build_sr

__all__ = [
    "AI_DISCLAIMER",
    "CODING_SCHEME",
    "MANUFACTURER",
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
    "display_shape",
    "output_uid",
    "render_heatmaps",
    "series_uid",
]
