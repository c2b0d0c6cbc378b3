"""The gradability gate: is this a colour fundus photograph the model can grade?

A model scores whatever it is given, and a confident score on a blurred, dark or wrong photograph is
worse than none: a reader trusts it, or learns to ignore the tool. So before a finding is shown, each
photograph passes five checks; one that fails any of them gets the status ``ungradable`` with the
named reasons instead of findings (:mod:`retinagate.pipeline` makes the SC and SR say so).

1. **Field of view** (:data:`NO_FOV`). Fundus cameras image the retina through a round aperture: a
   bright, roughly circular region on a dark border. The region is the one the preprocessing finds
   (:func:`retinagate.preprocess.find_fov`, the single home of that rule); here a circle is fitted to
   its edge where it does not touch the image border, and the region must match that circle, keep
   nearly all of its width (many cameras clip the circle top and bottom, which is fine; one cut off
   on the left or right is a crop that lost part of the retina) and show enough of its area. A scene
   or a document has no such region, or one that is not a circle.
2. **Colour** (:data:`NOT_COLOUR`). A greyscale or red-free copy has no chroma inside the field of
   view; a colour fundus photograph is strongly chromatic, and red is its brightest channel
   (haemoglobin and melanin absorb green and blue; the retina reflects red).
3. **Focus** (:data:`OUT_OF_FOCUS`). The field of view is resampled to :data:`WORK_DIAMETER` pixels
   across, so the measure does not depend on the photograph's size, and the green channel (the one
   that carries the vessels) is split into octaves by differences of Gaussian blurs: the finest
   octave's energy over the next one's is the sharpness (:data:`MIN_SHARPNESS`). Blur takes the
   finest detail first; a ratio does not change with exposure or with how contrasted the vessels are.
4. **Exposure** (:data:`OVER_EXPOSED`, :data:`UNDER_EXPOSED`): the mean luma inside the field of
   view and the share of it clipped (green at the top, or every channel at the bottom).
5. **Out of distribution** (:func:`ood_reason`): the model's own ``ood_score`` output, when its graph
   has one, against the threshold in the model card (``card.ood.threshold``).

Checks 1-4 run on the decoded photograph with numpy and OpenCV (2-6 ms for a 1024-pixel frame on one
core, most of it the area reduction to the working size); check 5 needs the model's run, so
:func:`with_ood` adds it to a verdict afterwards.

How the thresholds were chosen is written beside each constant: from measurements on the project's
own synthetic photographs (``retinagate synth``), normal and degraded in each way, and from physical
reasoning where the synthetic data cannot speak; the targets were at most 2 % of normal photographs
flagged and at least 95 % of degraded ones. They are defaults: ``retinagate export`` measures the
training photographs and moves any limit that would flag more than 1 in 400 of them just past them
(:func:`fit_limits`, written to the card's ``gate``), so another camera's normal photographs are not
called ungradable wholesale; focus never below :data:`FIT_FOCUS_FLOOR` of their median sharpness, so
that a tail of soft training photographs does not let heavy blur through.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import cv2
import numpy as np
from numpy.typing import NDArray

from retinagate.card import GateLimits
from retinagate.preprocess import FieldOfView, find_fov

__all__ = [
    "DEFAULT_LIMITS",
    "MIN_DECODE_SIDE",
    "NOT_COLOUR",
    "NO_FOV",
    "OUT_OF_FOCUS",
    "OVER_EXPOSED",
    "UNDER_EXPOSED",
    "WORK_DIAMETER",
    "Status",
    "Verdict",
    "assess",
    "count_reasons",
    "distinct_numbers",
    "fit_limits",
    "ood_reason",
    "reason_code",
    "with_ood",
]

Status = Literal["scored", "ungradable"]

#: Reasons, as shown in the SC, the SR, the CLI and SQL.
NO_FOV: Final = "no circular field of view"
NOT_COLOUR: Final = "not a colour photograph"
OUT_OF_FOCUS: Final = "out of focus"
OVER_EXPOSED: Final = "over-exposed"
UNDER_EXPOSED: Final = "under-exposed"
#: How the out-of-distribution reason starts (its numbers follow, see :func:`ood_reason`).
_OOD_PREFIX: Final = "unlike the training photographs"

#: Short codes of the reasons (the SR codes them in RetinaGate's local scheme) and their meanings.
_REASON_CODES: Final = {
    NO_FOV: ("NO-FOV", "No circular field of view"),
    NOT_COLOUR: ("NOT-COLOUR", "Not a colour photograph"),
    OUT_OF_FOCUS: ("OUT-OF-FOCUS", "Out of focus"),
    OVER_EXPOSED: ("OVER-EXPOSED", "Over-exposed"),
    UNDER_EXPOSED: ("UNDER-EXPOSED", "Under-exposed"),
    _OOD_PREFIX: ("OUT-OF-DISTRIB", "Unlike the training photographs"),
}

#: Pixels across the field of view at which colour, focus and exposure are measured. 256 is enough
#: to see the main vessels (about 1 % of the diameter, so 2-3 pixels) and small enough that nearly
#: every photograph is shrunk to it. A smaller one is measured as it is, never enlarged (that would
#: soften it); the focus measure compares two octaves, which for natural images changes little with
#: scale (measured: see :data:`MIN_SHARPNESS`).
WORK_DIAMETER: Final = 256

#: Short side the decode must keep for the gate: the field of view spans 80 % or more of the short
#: side on every camera layout we know, so this leaves :data:`WORK_DIAMETER` pixels across it.
MIN_DECODE_SIDE: Final = 320

# --- 1. Field of view --------------------------------------------------------------------------------

#: Least share of the image the bright region must cover. Fundus cameras fill 40-60 % of the frame
#: with the field of view (a 4:3 frame with a circle 95 % of its height: 54 %); a quarter of that
#: leaves room for small-aperture cameras and still refuses specks and small bright objects.
FOV_MIN_AREA: Final = 0.12

#: Least share of the bright region inside its fitted circle: the aperture is round, so nothing of
#: the region sticks out of the circle (a rectangle's corners would). Synthetic photographs: 0.997-1.
FOV_MIN_CONTAINED: Final = 0.97

#: Least share of the fitted circle (where it lies in the image) that the region fills. A notch (a
#: camera's orientation mark) costs 1-3 %; a dim periphery under uneven light, lost below the FOV
#: threshold, up to 10 % (synthetic photographs: 0.91-1); a square fills 65 % of the circle fitted
#: to it, a 4:3 rectangle 72 %, an ellipse of axes 3:2 76 % (measured); an octagon passes.
FOV_MIN_FILLED: Final = 0.85

#: Rounds of the circle fit that drop edge points lying inside the circle by more than the tolerance
#: (thumbnail pixels): the aperture's edge is the outermost one.
_FOV_FIT_ROUNDS: Final = 4
_FOV_FIT_TOLERANCE: Final = 1.5

#: Largest share of the circle's width that may lie outside the image on the left and right
#: together. A camera that centres its circle keeps all of it; 6 % allows an off-centre circle and
#: the fit's error (about a thumbnail pixel each side), and refuses a crop that cut off a tenth
#: (synthetic photographs cropped by 10 % measured 0.10-0.14, by 5 % 0.05-0.09: 1 % of those flagged).
FOV_MAX_SIDE_CUT: Final = 0.06

#: Least share of the circle's area inside the image. Clipping the top and bottom to a 4:3 or 3:2
#: frame keeps 75-90 %; below 60 % more than a third of the retina is missing.
FOV_MIN_VISIBLE: Final = 0.6

#: Fewest edge points (on the thumbnail, off the image border) to fit a circle to.
_FOV_MIN_EDGE_POINTS: Final = 24

# --- 2. Colour -----------------------------------------------------------------------------------------

#: Least chroma inside the field of view: mean (max - min channel) over mean max channel. A grey copy
#: scores 0 (JPEG's chroma noise: below 0.02); the synthetic colour photographs scored 0.47-0.86 (red
#: well above green and blue), and over-exposure, which washes colour out, is its own reason.
MIN_CHROMA: Final = 0.15

#: Least ratio of the mean red to the mean green level inside the field of view. In a colour fundus
#: photograph red is the brightest channel (synthetic ones: 1.4-3.1 x green); a red-free photograph
#: stored as a green image has almost no red (0.003-0.025).
MIN_RED_OVER_GREEN: Final = 0.9

# --- 3. Focus --------------------------------------------------------------------------------------------

#: Least sharpness: the RMS of the finest octave of the green channel (difference of Gaussian blurs
#: at sigma 1 and 2 working pixels, 0.4-0.8 % of the diameter: the scale of the main vessels' edges)
#: over the RMS of the next octave (sigma 2 and 4). A ratio, so that neither exposure nor how much
#: contrast the vessels have changes it; blur takes the finer octave first, so the ratio falls. A
#: blur of 1 % of the diameter (15 pixels on a 1500-pixel field) erases every vessel narrower than
#: the main arcades: heavy. One of 0.4 % softens small vessels' edges and leaves them: mild.
#: Measured on ``retinagate synth --n 200 --seed 5`` photographs (hard mode, which varies the camera's
#: defocus itself) at 640 x 480 and at the generator's mixed camera sizes (768-2048 pixels wide): as
#: made 0.54-1.10 (1st percentile 0.63-0.69); softened by a Gaussian of 0.3 % of the diameter
#: 0.50-0.92, of 0.4 % 0.48-0.84 (one in 200 flagged); blurred by 0.75 % 0.43-0.60 (8-9 % flagged),
#: by 1 % 0.41-0.50 and by 1.5 % 0.35-0.41 (all flagged).
MIN_SHARPNESS: Final = 0.52

#: Share of the radius kept when measuring colour and focus: the outer ring of the field of view is
#: darker (vignetting) and ends in the hard edge of the aperture, which any blur leaves sharp.
_INNER: Final = 0.88

# --- 4. Exposure ---------------------------------------------------------------------------------------

#: Rec. 601 luma weights, for the mean level.
_LUMA: Final = np.array([0.299, 0.587, 0.114], dtype=np.float32)

#: Mean luma (0-255) inside the field of view below which the photograph is under-exposed. At luma 28
#: the green channel, which carries the vessels, sits near 22, and a vessel's 15-20 % contrast is 3-4
#: grey levels: the size of JPEG's quantisation steps at the usual qualities, so the detail is gone.
#: The synthetic photographs above measured 43-182 as made (1st percentile 52) and 31-132 one stop
#: darker (none flagged); with their green brought down to a mean of 10, 13-19 (all flagged).
MIN_LEVEL: Final = 28.0

#: Mean luma above which the photograph is over-exposed: a fundus is a dark red object, and at 200 red
#: is clipped nearly everywhere and green pushed into the top fifth of its range, where the bright
#: structures (disc, exudates, reflexes) clip and the rest has lost its contrast. The synthetic
#: photographs measured at most 182 as made; one stop brighter 0.5-1 % of them pass 200; with their
#: green brought up to a mean of 235, 195-229, and all flagged (with the clipped share below).
MAX_LEVEL: Final = 200.0

#: Largest share of the field of view that may be clipped: green at 250 or more (over-exposed), or
#: every channel at 10 or less (under-exposed). Green carries the vessels and most lesions; where it is
#: clipped that detail is gone. Red alone is not counted: it clips over much of the field in many
#: well-exposed photographs of light fundi (synthetic ones: up to 70 %) and costs little detail.
#: Synthetic photographs as made: green clipped over at most 1 %.
MAX_CLIPPED: Final = 0.25


#: The limits above, as a model card holds them (:class:`retinagate.card.GateLimits`).
DEFAULT_LIMITS: Final = GateLimits(
    fov_min_area=FOV_MIN_AREA,
    fov_min_contained=FOV_MIN_CONTAINED,
    fov_min_filled=FOV_MIN_FILLED,
    fov_max_side_cut=FOV_MAX_SIDE_CUT,
    fov_min_visible=FOV_MIN_VISIBLE,
    min_chroma=MIN_CHROMA,
    min_red_over_green=MIN_RED_OVER_GREEN,
    min_sharpness=MIN_SHARPNESS,
    min_level=MIN_LEVEL,
    max_level=MAX_LEVEL,
)


@dataclass(frozen=True)
class Verdict:
    """What the gate found for one photograph.

    Attributes:
        reasons: Why it cannot be graded, in check order; empty when it can.
        measures: Each check's measurement (no patient data), for SQL and ``--json``.
    """

    reasons: tuple[str, ...] = ()
    measures: dict[str, float] = field(default_factory=dict)

    @property
    def gradable(self) -> bool:
        """Whether every check passed."""
        return not self.reasons

    @property
    def status(self) -> Status:
        """``scored`` when gradable, else ``ungradable``."""
        return "scored" if self.gradable else "ungradable"


# --- Fitting the limits to the training photographs ----------------------------------------------------

#: Share of the training photographs a limit may flag before it is moved. The limits above were set on
#: the project's own synthetic photographs; another camera (or another generator) can sit past one of
#: them with every photograph, and a gate that calls a whole clinic's camera ungradable is worse than
#: none. The photographs a model learned from are gradable by definition, so a limit that flags more
#: than this share of them is moved to the share's quantile, and a margin (:data:`FIT_MARGIN`) beyond.
#: A limit is only ever relaxed: a degraded copy of such a photograph still falls well past it (blur
#: halves the focus ratio, greyscale zeroes the chroma, a crop cuts the circle). One in 400: a limit
#: that flags a share p of the training photographs flags about p of a clinic's normal ones, and the
#: target is at most 2 % of a test set's (3 or more of 120 with a chance of 12 % at p = 1 %, 0.4 % at
#: 0.25 %). On the second generator's seed 9, 2 of 400 training photographs (0.5 %) under the default
#: focus limit kept it at the 1 % share, and 2 of its 120 test photographs were flagged; moved at this
#: share (to 0.466), none, and every copy blurred by 1 % of the diameter was still refused.
FIT_QUANTILE: Final = 0.0025

#: Relative margin beyond the quantile a moved limit is set at.
FIT_MARGIN: Final = 0.1

#: Least share of the training photographs' median sharpness a fitted focus limit may fall to. Focus,
#: unlike exposure (normal photographs span a factor of four in brightness), has a narrow spread
#: across a camera's normal photographs (synthetic 0.54-1.10; the second generator's 0.40-0.90 about a
#: median of 0.70), and blur moves a photograph along that same axis. A set with a tail of soft
#: photographs drags the quantile down to where heavily blurred copies of its sharp ones pass: on the
#: second generator's seed 10 (15 of 400 training photographs under the default 0.52, the softest
#: 0.40) the quantile rule alone gave 0.379 (at a share of 1 %; 0.360 at 1 in 400), and 1 of 20 test
#: photographs blurred by 1.5 % of the diameter (0.34-0.40) passed; at 0.6 of the median (0.421) all
#: 20 were refused, and 1 % of the training photographs and none of the 120 test photographs were
#: flagged. A blur to 0.6 of the camera's typical sharpness is one of about 1 % of the diameter on a
#: typical photograph.
FIT_FOCUS_FLOOR: Final = 0.6

#: Each fitted limit: (card field, the measure it bounds, whether it is a least or a largest value, the
#: least share of the measure's median it may be moved to, if any).
_FITTED: Final[tuple[tuple[str, str, str, float | None], ...]] = (
    ("fov_min_area", "fov_area", "least", None),
    ("fov_min_contained", "fov_contained", "least", None),
    ("fov_min_filled", "fov_filled", "least", None),
    ("fov_max_side_cut", "fov_side_cut", "largest", None),
    ("fov_min_visible", "fov_visible", "least", None),
    ("min_chroma", "chroma", "least", None),
    ("min_red_over_green", "red_over_green", "least", None),
    ("min_sharpness", "sharpness", "least", FIT_FOCUS_FLOOR),
    ("min_level", "level", "least", None),
    ("max_level", "level", "largest", None),
)


def count_reasons(verdicts: Iterable[Verdict]) -> dict[str, int]:
    """How many of the verdicts give each reason, in the order the reasons first appear."""
    return dict(Counter(reason for verdict in verdicts for reason in verdict.reasons))


def fit_limits(verdicts: Iterable[Verdict], defaults: GateLimits = DEFAULT_LIMITS) -> GateLimits:
    """The gate's limits fitted to photographs known to be gradable (the training photographs).

    Args:
        verdicts: :func:`assess` of each photograph with ``defaults``.
        defaults: The limits to start from.

    Returns:
        ``defaults`` with each limit that flags more than :data:`FIT_QUANTILE` of the photographs moved
        past that quantile by :data:`FIT_MARGIN` (focus no lower than :data:`FIT_FOCUS_FLOOR` of the
        median sharpness); ``fitted_on`` says how many photographs were measured,
        how many the defaults flagged (by reason), and which limits moved from what to what. Only
        photographs whose field of view has a fitted circle move a limit.
    """
    verdicts = list(verdicts)
    rows: list[Mapping[str, float]] = [verdict.measures for verdict in verdicts]
    limits: dict[str, Any] = defaults.model_dump()
    moved: dict[str, dict[str, float]] = {}
    for name, measure, side, floor in _FITTED:
        # Only photographs with a fitted circle move a limit: one without (a black frame, a scene) has
        # an area of 0 and is refused whatever the area limit says, so it would only weaken the check.
        seen = np.array([row[measure] for row in rows if measure in row and "fov_filled" in row], dtype=np.float64)
        if not len(seen):
            continue
        default = float(getattr(defaults, name))
        lowest = None if floor is None else floor * float(np.median(seen))
        if side == "least":
            edge = float(np.quantile(seen, FIT_QUANTILE))
            limit = edge * (1 - FIT_MARGIN) if edge < default else default
            if lowest is not None:
                limit = min(default, max(limit, lowest))
        else:
            edge = float(np.quantile(seen, 1 - FIT_QUANTILE))
            bound = 255.0 if measure == "level" else 1.0
            limit = min(bound, edge * (1 + FIT_MARGIN)) if edge > default else default
        if limit != default:
            limits[name] = round(limit, 6)
            moved[name] = {"default": default, "fitted": round(limit, 6), "quantile": round(edge, 6)}
            if lowest is not None:
                moved[name]["floor"] = round(lowest, 6)
    limits["fitted_on"] = {
        "photographs": len(rows),
        "flagged_by_defaults": sum(not verdict.gradable for verdict in verdicts),
        "reasons": count_reasons(verdicts),
        "quantile": FIT_QUANTILE,
        "moved": moved,
    }
    return GateLimits(**limits)


def distinct_numbers(value: float, limit: float, digits: int = 1, most: int = 6) -> tuple[str, str]:
    """``value`` and ``limit`` printed with the fewest decimals (at least ``digits``) that tell them apart.

    So that "3.2 > 3.2" is never printed for 3.24 against 3.21.
    """
    for places in range(digits, most + 1):
        a, b = f"{value:.{places}f}", f"{limit:.{places}f}"
        if a != b or value == limit:
            return a, b
    return f"{value:.{most}f}", f"{limit:.{most}f}"


def reason_code(reason: str) -> tuple[str, str]:
    """The short code (at most 16 characters) and meaning of a reason; ``("OTHER", reason)`` for one not from here."""
    for start, code in _REASON_CODES.items():
        if reason.startswith(start):
            return code
    return "OTHER", reason[:64]


def ood_reason(score: float, threshold: float) -> str | None:
    """The reason for an ``ood_score`` over the card's threshold, or ``None`` when it is within.

    A score that is not a finite number counts as out of distribution: the model saw something it
    cannot place.
    """
    if math.isfinite(score) and score <= threshold:
        return None
    shown, limit = distinct_numbers(score, threshold)
    return f"{_OOD_PREFIX} (ood {shown} > {limit})"


def with_ood(verdict: Verdict, score: float | None, threshold: float | None) -> Verdict:
    """The verdict with check 5 added: the model's ``ood_score`` against the card's threshold.

    Without a score (the graph has no ``ood_score`` output) or a threshold, the verdict is returned
    as it is.
    """
    if score is None or threshold is None:
        return verdict
    measures = {**verdict.measures, "ood_score": float(score), "ood_threshold": float(threshold)}
    reason = ood_reason(float(score), float(threshold))
    reasons = verdict.reasons if reason is None else (*verdict.reasons, reason)
    return Verdict(reasons, measures)


@dataclass(frozen=True)
class _Circle:
    """A circle on the FOV thumbnail (pixel-centre coordinates)."""

    cx: float
    cy: float
    r: float


def _kasa(points: NDArray[np.float64]) -> _Circle | None:
    """Kasa's algebraic least-squares circle: x^2 + y^2 = a x + b y + c is linear in (a, b, c)."""
    x, y = points[:, 0], points[:, 1]
    design = np.stack([x, y, np.ones_like(x)], axis=1)
    (a, b, c), *_ = np.linalg.lstsq(design, x * x + y * y, rcond=None)
    cx, cy = a / 2, b / 2
    squared = c + cx * cx + cy * cy
    if not math.isfinite(squared) or squared <= 1.0:
        return None
    return _Circle(float(cx), float(cy), math.sqrt(squared))


def _fit_circle(mask: NDArray[np.bool_]) -> _Circle | None:
    """The circle of the aperture, fitted to the region's edge where it does not touch the image border.

    The aperture's edge is the region's outermost edge: where the region's edge runs inside it (a dim
    periphery under uneven light fell below the threshold, or a notch), those points are dropped and
    the circle fitted again, a few times.
    """
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    points = np.concatenate([c[:, 0, :] for c in contours]).astype(np.float64)
    height, width = mask.shape
    inside = (points[:, 0] > 0) & (points[:, 0] < width - 1) & (points[:, 1] > 0) & (points[:, 1] < height - 1)
    points = points[inside]
    if len(points) < _FOV_MIN_EDGE_POINTS:
        return None
    circle = _kasa(points)
    for _ in range(_FOV_FIT_ROUNDS):
        if circle is None:
            return None
        residual = np.hypot(points[:, 0] - circle.cx, points[:, 1] - circle.cy) - circle.r
        kept = points[residual > -_FOV_FIT_TOLERANCE]
        if len(kept) < _FOV_MIN_EDGE_POINTS or len(kept) == len(points):
            break
        points, circle = kept, _kasa(kept)
    if circle is None:
        return None
    # The contour runs through the centres of the region's outermost pixels: the edge is half a
    # pixel further out.
    return _Circle(circle.cx, circle.cy, circle.r + 0.5)


def _field_of_view(fov: FieldOfView, limits: GateLimits) -> tuple[_Circle | None, dict[str, float], list[str]]:
    """Check 1 on the thumbnail: the fitted circle (or None), the measures and the reasons."""
    mask = fov.mask
    assert mask is not None
    height, width = mask.shape
    measures = {"fov_area": float(mask.mean())}
    circle = _fit_circle(mask)
    if circle is None:
        return None, measures, [NO_FOV]
    ys, xs = np.mgrid[0:height, 0:width]
    disc = (xs - circle.cx) ** 2 + (ys - circle.cy) ** 2 <= circle.r**2
    both = int(np.count_nonzero(disc & mask))
    contained = both / max(1, int(np.count_nonzero(mask)))
    filled = both / max(1, int(np.count_nonzero(disc)))
    left, right = circle.cx + 0.5 - circle.r, circle.cx + 0.5 + circle.r
    side_cut = (max(0.0, -left) + max(0.0, right - width)) / (2 * circle.r)
    visible = int(np.count_nonzero(disc)) / (math.pi * circle.r**2)
    measures |= {
        "fov_contained": contained,
        "fov_filled": filled,
        "fov_side_cut": side_cut,
        "fov_visible": min(1.0, visible),
    }
    ok = (
        measures["fov_area"] >= limits.fov_min_area
        and contained >= limits.fov_min_contained
        and filled >= limits.fov_min_filled
        and side_cut <= limits.fov_max_side_cut
        and visible >= limits.fov_min_visible
    )
    return circle, measures, ([] if ok else [NO_FOV])


@dataclass(frozen=True)
class _Work:
    """The field of view at working size: its channels as float32, and where the retina is."""

    red: NDArray[np.float32]
    green: NDArray[np.float32]
    blue: NDArray[np.float32]
    inside: NDArray[np.bool_]  # the field of view
    inner: NDArray[np.bool_]  # its inner part, off the edge (see _INNER)


def _shrink(crop: NDArray[np.uint8], width: int, height: int) -> NDArray[np.uint8]:
    """Area reduction to ``(width, height)``: exact halvings first (OpenCV's fast path), then one resize."""
    while crop.shape[1] // 2 >= width and crop.shape[0] // 2 >= height:
        half = (crop.shape[1] // 2, crop.shape[0] // 2)
        crop = np.asarray(cv2.resize(crop, half, interpolation=cv2.INTER_AREA), dtype=np.uint8)
    if crop.shape[:2] == (height, width):
        return crop
    return np.asarray(cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA), dtype=np.uint8)


def _working(image: NDArray[np.uint8], fov: FieldOfView, circle: _Circle) -> _Work:
    """The field of view resampled to :data:`WORK_DIAMETER` across, with its masks there."""
    assert fov.mask is not None
    factor = fov.factor
    height, width = image.shape[:2]
    # Thumbnail pixel i covers the photograph's [i * factor, (i + 1) * factor).
    cx, cy, r = (circle.cx + 0.5) * factor, (circle.cy + 0.5) * factor, circle.r * factor
    x0, x1 = max(0, math.floor(cx - r)), min(width, math.ceil(cx + r))
    y0, y1 = max(0, math.floor(cy - r)), min(height, math.ceil(cy + r))
    # Shrunk to the working size, never enlarged: enlarging would soften a small photograph.
    scale = min(1.0, WORK_DIAMETER / (2 * r))
    work_w, work_h = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))
    crop = image[y0:y1, x0:x1]
    shrunk = _shrink(crop, work_w, work_h) if scale < 1.0 else crop
    red, green, blue = (np.asarray(c, dtype=np.float32) for c in cv2.split(shrunk))
    # Working pixel -> photograph -> thumbnail pixel, for the region's mask.
    sx, sy = (x1 - x0) / work_w, (y1 - y0) / work_h
    columns = np.clip(((np.arange(work_w) + 0.5) * sx + x0) // factor, 0, fov.mask.shape[1] - 1).astype(np.intp)
    rows = np.clip(((np.arange(work_h) + 0.5) * sy + y0) // factor, 0, fov.mask.shape[0] - 1).astype(np.intp)
    region = fov.mask[rows[:, None], columns[None, :]]
    wx = ((np.arange(work_w) + 0.5) * sx + x0 - cx)[None, :]
    wy = ((np.arange(work_h) + 0.5) * sy + y0 - cy)[:, None]
    radius2 = (wx * wx + wy * wy) / (r * r)
    inside = region & (radius2 <= 1.0)
    inner = region & (radius2 <= _INNER**2)
    if np.count_nonzero(inner) > 0:
        # Keep the inner measure off notches and clipped edges of the region, too.
        eroded = cv2.erode(region.astype(np.uint8), np.ones((9, 9), np.uint8), borderType=cv2.BORDER_REPLICATE)
        inner &= eroded.astype(bool)
    return _Work(red, green, blue, inside, inner)


def _colour(work: _Work, limits: GateLimits) -> tuple[dict[str, float], list[str]]:
    top = np.maximum(np.maximum(work.red, work.green), work.blue)[work.inner]
    bottom = np.minimum(np.minimum(work.red, work.green), work.blue)[work.inner]
    chroma = float((top - bottom).mean() / max(1.0, float(top.mean())))
    red, green = float(work.red[work.inner].mean()), float(work.green[work.inner].mean())
    red_over_green = red / max(1.0, green)
    ok = chroma >= limits.min_chroma and red_over_green >= limits.min_red_over_green
    return {"chroma": chroma, "red_over_green": red_over_green}, ([] if ok else [NOT_COLOUR])


def _focus(work: _Work, limits: GateLimits) -> tuple[dict[str, float], list[str]]:
    fine, middle, coarse = (cv2.GaussianBlur(work.green, (0, 0), sigma) for sigma in (1.0, 2.0, 4.0))
    fine_band = float(np.sqrt(np.mean(np.square((fine - middle)[work.inner]))))
    coarse_band = float(np.sqrt(np.mean(np.square((middle - coarse)[work.inner]))))
    sharpness = fine_band / coarse_band if coarse_band > 0 else 0.0
    return {"sharpness": sharpness}, ([] if sharpness >= limits.min_sharpness else [OUT_OF_FOCUS])


def _exposure(work: _Work, limits: GateLimits) -> tuple[dict[str, float], list[str]]:
    inside = work.inside
    luma = _LUMA[0] * work.red + _LUMA[1] * work.green + _LUMA[2] * work.blue
    level = float(luma[inside].mean())
    high = float(np.mean(work.green[inside] >= 250))
    low = float(np.mean(np.maximum(np.maximum(work.red, work.green), work.blue)[inside] <= 10))
    reasons = []
    if level > limits.max_level or high > MAX_CLIPPED:
        reasons.append(OVER_EXPOSED)
    if level < limits.min_level or low > MAX_CLIPPED:
        reasons.append(UNDER_EXPOSED)
    return {"level": level, "clipped_high": high, "clipped_low": low}, reasons


def assess(
    image: NDArray[np.uint8],
    *,
    threshold: int = 20,
    fov: FieldOfView | None = None,
    limits: GateLimits | None = None,
) -> Verdict:
    """Checks 1-4 on one decoded photograph (see the module docstring).

    Args:
        image: ``(H, W, 3)`` uint8 RGB photograph, any size (a field of view narrower than
            :data:`WORK_DIAMETER` pixels is measured as it is).
        threshold: The model card's FOV threshold (``preprocessing.fov_threshold``).
        fov: :func:`retinagate.preprocess.find_fov` of this image with that threshold, when the
            caller already has it.
        limits: The model card's limits (``card.gate``); ``None``: :data:`DEFAULT_LIMITS`.

    Returns:
        The :class:`Verdict`: reasons in check order (field of view first; colour, focus and exposure
        are measured only when a field of view was found) and the measures.

    Raises:
        ValueError: If the image is not ``(H, W, 3)`` uint8 or the threshold is outside 0-255.
    """
    limits = limits or DEFAULT_LIMITS
    if fov is None:
        fov = find_fov(image, threshold)
    if fov.mask is None:
        # Nothing bright enough to be a field of view: when even the brightest tenth of the image is
        # darker than a gradable retina, it is under-exposed; otherwise it has no field of view.
        bright = float(np.percentile(fov.thumbnail.astype(np.float32) @ _LUMA, 90))
        measures = {"fov_area": 0.0, "level_p90": round(bright, 6)}
        return Verdict((UNDER_EXPOSED,) if bright < limits.min_level else (NO_FOV,), measures)
    circle, measures, reasons = _field_of_view(fov, limits)
    if circle is None or reasons:
        # A dark photograph loses the edge of its field of view in the border: then the darkness is
        # the reason, not the shape.
        level = float((fov.thumbnail[fov.mask].astype(np.float32) @ _LUMA).mean())
        measures["level"] = level
        if level < limits.min_level:
            reasons = [UNDER_EXPOSED]
        return Verdict(tuple(reasons), {k: round(v, 6) for k, v in measures.items()})
    work = _working(image, fov, circle)
    if np.count_nonzero(work.inner) < 64:
        return Verdict((NO_FOV,), measures)
    colour, focus, exposure = _colour(work, limits), _focus(work, limits), _exposure(work, limits)
    for found, why in (colour, focus, exposure):
        measures |= found
        # Over-exposure washes the colour out: then it is the reason, not the colour.
        if why != [NOT_COLOUR] or OVER_EXPOSED not in exposure[1]:
            reasons += why
    return Verdict(tuple(reasons), {k: round(v, 6) for k, v in measures.items()})
