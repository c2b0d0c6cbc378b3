"""DICOM outputs of a scored photograph: heatmap Secondary Capture, Comprehensive SR, Parametric Map.

One module per kind of object (``sc``, ``sr``, ``pm``), each with a class that implements the
output interface of ``kind`` and is listed in ``registry`` (the one place that names the kinds,
in build order); the heatmap picture in ``render``, what counts as a finding and how
probabilities are written in ``findings``, and the shared identity (deterministic UIDs, the
model as Contributing Equipment) in ``identity``. Every output is in the source's patient and
study, in a series per eye, model and kind, marked as derived, unverified AI output. The study
report (``study``) is built once per complete study from all its photographs' predictions, not per
photograph: same result type, its own series per study and model.

The names below are imported on first use: the gateway reads the registry (to validate the
``outputs`` setting) without loading OpenCV or highdicom.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retinagate.outputs.findings import (
        NO_FINDING,
        describe_findings,
        findings_of,
        probability_text,
        summary_lines,
        summary_text,
    )
    from retinagate.outputs.identity import (
        AI_DISCLAIMER,
        MANUFACTURER,
        ModelIdentity,
        derived_uid,
        output_uid,
        series_uid,
    )
    from retinagate.outputs.kind import BuiltOutput, FrameScores, OutputKind, ScoredPhotograph
    from retinagate.outputs.pm import build_pm
    from retinagate.outputs.render import HeatmapFinding, Legend, display_shape, render_heatmaps, retina_heat
    from retinagate.outputs.sc import ScEncoder, build_sc
    from retinagate.outputs.sr import CODING_SCHEME, SrEncoder, build_report, build_sr

_HOMES = {
    "NO_FINDING": "findings", "describe_findings": "findings", "findings_of": "findings",
    "probability_text": "findings", "summary_lines": "findings", "summary_text": "findings",
    "AI_DISCLAIMER": "identity", "MANUFACTURER": "identity",
    "ModelIdentity": "identity", "derived_uid": "identity", "output_uid": "identity", "series_uid": "identity",
    "BuiltOutput": "kind", "FrameScores": "kind", "OutputKind": "kind", "ScoredPhotograph": "kind",
    "build_pm": "pm", "HeatmapFinding": "render", "Legend": "render", "display_shape": "render",
    "render_heatmaps": "render", "retina_heat": "render", "ScEncoder": "sc", "build_sc": "sc",
    "CODING_SCHEME": "sr", "SrEncoder": "sr", "build_report": "sr", "build_sr": "sr",
}  # fmt: skip

__all__ = [
    "AI_DISCLAIMER",
    "CODING_SCHEME",
    "MANUFACTURER",
    "NO_FINDING",
    "BuiltOutput",
    "FrameScores",
    "HeatmapFinding",
    "Legend",
    "ModelIdentity",
    "OutputKind",
    "ScEncoder",
    "ScoredPhotograph",
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
    "summary_lines",
    "summary_text",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
