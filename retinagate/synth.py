"""Synthetic fundus photographs with planted lesions, in the RFMiD layout and as DICOM.

The project needs data that a small classifier can learn in a few CPU minutes and whose heatmaps can be
checked against ground truth, without shipping patient photographs. Each photograph is a black frame
around a circular field of view (FOV) with an orange-red fundus (vignetting, low-frequency texture), a
yellow-white optic disc on the nasal side, a darker macula and dark red vessels radiating from the disc.
Each of the 28 disease outputs (27 named RFMiD conditions plus ``OTHER``) is planted as a lesion with its
own colour and shape at its own place (:data:`LESION_STYLES`), so appearance identifies the label and
the lesion mask says where a heatmap should point.

Everything is deterministic for a seed: each image draws from its own generator seeded with (seed,
split, id), and every DICOM UID is a name-based UUID UID (``2.25.``) derived from the seed.

Layout written by :func:`write_dataset` under ``OUT``::

    Training/<ID>.png  Evaluation/<ID>.png  Test/<ID>.png
    RFMiD_Training_Labels.csv  RFMiD_Validation_Labels.csv  RFMiD_Testing_Labels.csv
    masks/<Split>/<ID>_<COLUMN>.png      (0/255, one per positive disease column)
    synth.json                           (config, lesion styles, per-image lesions and DICOM identity)
    dicom/<study>/<Split>_<ID>.dcm       (with ``dicom=True``: Ophthalmic Photography 8 Bit, JPEG baseline)
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import math
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Literal

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit

from retinagate.labels import DISEASE_LABELS, DISEASE_RISK, NAMED_DISEASES, OTHER, OTHER_COLUMNS, RFMID_COLUMNS

__all__ = [
    "CSV_NAMES",
    "LESION_STYLES",
    "OP_8BIT_SOP_CLASS",
    "SPLITS",
    "DicomIdentity",
    "Fundus",
    "ImagePlan",
    "Lesion",
    "LesionStyle",
    "SynthConfig",
    "build_dicom",
    "plan_dataset",
    "render_fundus",
    "split_sizes",
    "write_dataset",
    "write_dicom",
]

logger = logging.getLogger(__name__)

SPLITS: Final = ("Training", "Evaluation", "Test")
CSV_NAMES: Final[Mapping[str, str]] = {
    "Training": "RFMiD_Training_Labels.csv",
    "Evaluation": "RFMiD_Validation_Labels.csv",
    "Test": "RFMiD_Testing_Labels.csv",
}
OP_8BIT_SOP_CLASS: Final = UID("1.2.840.10008.5.1.4.1.1.77.1.5.1")

Laterality = Literal["R", "L"]
Shape = Literal["disc", "ring", "dots", "streak"]
RGB = tuple[int, int, int]

_COLOURS: Final[Mapping[str, RGB]] = {
    "yellow": (250, 232, 70),  # hard exudate
    "dark red": (105, 0, 8),  # haemorrhage
    "white": (255, 255, 255),  # cotton-wool spot
    "black": (12, 12, 12),  # pigment
    "green": (30, 205, 60),
    "blue": (45, 75, 235),
    "cyan": (40, 225, 225),
}


@dataclass(frozen=True)
class LesionStyle:
    """How and where one disease output is planted.

    Attributes:
        label: Disease output (one of :data:`retinagate.labels.DISEASE_LABELS`).
        colour: Colour name, a key of the colour table (yellow, dark red, white, black, green, blue, cyan).
        shape: ``disc`` (filled), ``ring``, ``dots`` (a cluster of seven) or ``streak`` (a thick bar).
        slot: ``(x, y)`` lesion centre relative to the FOV centre in units of FOV diameter, for a right
            eye (x grows towards the optic disc); mirrored for left eyes.
        angle: Orientation of streaks and dot clusters in degrees, for a right eye.
    """

    label: str
    colour: str
    shape: Shape
    slot: tuple[float, float]
    angle: float

    @property
    def rgb(self) -> RGB:
        return _COLOURS[self.colour]


# Optic disc centre (right eye) and the lesion layout, in units of FOV diameter.
_DISC_OFFSET: Final = (0.27, -0.01)
_DISC_RADIUS: Final = 1 / 14
_SLOT_RADIUS: Final = 0.37  # lesion centres stay inside this, so lesion + jitter stay inside the FOV
_DISC_CLEARANCE: Final = 0.21  # no lesion covers the optic disc
# Lesion radius: about one cell of a 7 x 7 CAM at 224 px, so a CAM peak on the right cell lands inside.
_LESION_RADIUS: Final = (0.075, 0.092)
_LESION_JITTER: Final = 0.012
_MIN_SEPARATION: Final = 2 * (_LESION_RADIUS[1] + _LESION_JITTER) + 0.01  # co-occurring lesions never touch


def _slots(count: int) -> list[tuple[float, float]]:
    """``count`` evenly spread points (a sunflower spiral) in the FOV, away from the optic disc.

    The spiral runs outwards, so earlier slots lie nearer the macula at the centre.
    """
    golden = math.pi * (3 - math.sqrt(5))
    total = count
    while True:
        points = []
        for i in range(total):
            radius = _SLOT_RADIUS * math.sqrt((i + 0.5) / total)
            x, y = radius * math.cos(i * golden), radius * math.sin(i * golden)
            if math.hypot(x - _DISC_OFFSET[0], y - _DISC_OFFSET[1]) >= _DISC_CLEARANCE:
                points.append((round(x, 4), round(y, 4)))
        if len(points) >= count:
            return points[:count]
        total += 1


# (label, colour, shape, angle). Seven colours x four shapes: every label looks different from every
# other. Labels are listed roughly from macular to peripheral conditions, matching the slot order.
_STYLE_TABLE: Final[tuple[tuple[str, str, Shape, float], ...]] = (
    ("MHL", "cyan", "ring", 0.0),
    ("ARMD", "yellow", "disc", 0.0),
    ("CSR", "yellow", "ring", 0.0),
    ("PT", "green", "ring", 0.0),
    ("MS", "black", "disc", 0.0),
    ("DN", "yellow", "dots", 10.0),
    ("ERM", "white", "streak", 30.0),
    ("DR", "dark red", "dots", 0.0),
    ("EDN", "cyan", "disc", 0.0),
    ("BRVO", "dark red", "streak", -40.0),
    ("CRVO", "dark red", "disc", 0.0),
    ("TV", "dark red", "ring", 0.0),
    ("ODC", "blue", "ring", 0.0),
    ("ODP", "blue", "disc", 0.0),
    ("ODE", "yellow", "streak", 70.0),
    ("AION", "blue", "streak", -70.0),
    ("ST", "green", "streak", 15.0),
    ("RT", "black", "streak", 60.0),
    ("RS", "green", "disc", 0.0),
    ("CRS", "black", "ring", 0.0),
    ("RPEC", "blue", "dots", 20.0),
    ("LS", "black", "dots", 5.0),
    ("TSLN", "green", "dots", 25.0),
    ("MYA", "white", "ring", 0.0),
    ("AH", "white", "dots", 15.0),
    ("MH", "white", "disc", 0.0),
    ("RP", "cyan", "streak", -20.0),
    (OTHER, "cyan", "dots", 0.0),
)

#: The planted appearance and place of each of the 28 disease outputs.
LESION_STYLES: Final[Mapping[str, LesionStyle]] = {
    label: LesionStyle(label=label, colour=colour, shape=shape, slot=slot, angle=angle)
    for (label, colour, shape, angle), slot in zip(_STYLE_TABLE, _slots(len(_STYLE_TABLE)), strict=True)
}


def _label_of(column: str) -> str:
    """Disease output a column belongs to (``OTHER`` for the 18 rare columns)."""
    if column in NAMED_DISEASES or column == OTHER:
        return column
    if column in OTHER_COLUMNS:
        return OTHER
    raise ValueError(
        f"columns: unknown disease column {column!r}; expected one of the 27 named RFMiD diseases, "
        f"{OTHER!r} or one of the 18 rarer RFMiD columns"
    )


@dataclass(frozen=True)
class SynthConfig:
    """What :func:`write_dataset` makes.

    Attributes:
        n: Images over the three splits (60/20/20, at least 2 each), 6 to 100000.
        width: Image width in pixels, 64 to 8192.
        height: Image height in pixels, 64 to 8192.
        seed: Random seed (0 to 2**32 - 1); the same seed gives the same files.
        dicom: Also write Ophthalmic Photography DICOM files, two eyes per study.
    """

    n: int = 120
    width: int = 512
    height: int = 384
    seed: int = 0
    dicom: bool = False

    def __post_init__(self) -> None:
        for name, low, high in (("n", 6, 100_000), ("width", 64, 8192), ("height", 64, 8192), ("seed", 0, 2**32 - 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
            if not low <= value <= high:
                raise ValueError(f"{name} is {value}; expected {low} to {high}")


def split_sizes(n: int) -> dict[str, int]:
    """Images per split: 20% Evaluation, 20% Test (at least 2 each), the rest Training."""
    if n < 6:
        raise ValueError(f"n is {n}; expected at least 6 (2 per split)")
    held_out = max(2, round(0.2 * n))
    return {"Training": n - 2 * held_out, "Evaluation": held_out, "Test": held_out}


@dataclass(frozen=True)
class ImagePlan:
    """Labels and identity of one synthetic photograph, decided before it is drawn.

    Attributes:
        split: ``Training``, ``Evaluation`` or ``Test``.
        image_id: RFMiD ID within the split, from 1.
        columns: Positive RFMiD disease columns (an ``OTHER`` lesion names one of the 18 rare columns).
        laterality: ``R`` or ``L``.
        study: Study (and synthetic patient) index, from 0; the two eyes of a study are consecutive IDs.
    """

    split: str
    image_id: int
    columns: tuple[str, ...]
    laterality: Laterality
    study: int

    @property
    def labels(self) -> tuple[str, ...]:
        """Disease outputs present, in column order."""
        return tuple(_label_of(c) for c in self.columns)

    @property
    def key(self) -> str:
        return f"{self.split}_{self.image_id}"

    def rfmid_row(self) -> dict[str, int]:
        """The 46 RFMiD columns as 0/1; ``Disease_Risk`` is 1 iff any disease is."""
        row = dict.fromkeys(RFMID_COLUMNS, 0)
        for column in self.columns:
            row[column] = 1
        row[DISEASE_RISK] = int(bool(self.columns))
        return row


_HEALTHY_SHARE: Final = 0.3
_EXTRA_LABELS_P: Final = (0.45, 0.35, 0.2)  # 0, 1 or 2 labels beyond the cycled one


def _compatible(label: str, chosen: Sequence[str]) -> bool:
    x, y = LESION_STYLES[label].slot
    return all(math.dist((x, y), LESION_STYLES[c].slot) >= _MIN_SEPARATION for c in chosen)


def plan_dataset(config: SynthConfig) -> tuple[ImagePlan, ...]:
    """Decides the labels, laterality and study of every image (cheap; nothing is drawn).

    Per split, 30% of the images (chosen at random) are healthy. The diseased ones take their first
    label from a cycle through all 28 disease outputs (reshuffled each round), so every output gets
    ``diseased / 28`` positives or more in each split, then 0-2 random extra labels whose lesions do
    not overlap. An ``OTHER`` lesion stands for the next of the 18 rare columns in another cycle.
    Images are paired into studies in ID order within a split (right eye, then left).
    """
    plans: list[ImagePlan] = []
    study = 0
    rare_rng = np.random.default_rng([config.seed, 3])
    rare: list[str] = []  # the 18 rare columns behind OTHER, also cycled so that each one turns up

    def rare_column() -> str:
        if not rare:
            rare.extend(OTHER_COLUMNS[i] for i in rare_rng.permutation(len(OTHER_COLUMNS)))
        return rare.pop()

    for split_index, (split, size) in enumerate(split_sizes(config.n).items()):
        rng = np.random.default_rng([config.seed, 1, split_index])
        healthy = set(rng.permutation(size)[: round(_HEALTHY_SHARE * size)].tolist())
        cycle: list[str] = []
        for position in range(size):
            labels: list[str] = []
            if position not in healthy:
                if not cycle:
                    cycle = [DISEASE_LABELS[i] for i in rng.permutation(len(DISEASE_LABELS))]
                labels.append(cycle.pop())
                for _ in range(int(rng.choice(len(_EXTRA_LABELS_P), p=_EXTRA_LABELS_P))):
                    candidates = [x for x in DISEASE_LABELS if x not in labels and _compatible(x, labels)]
                    if candidates:
                        labels.append(candidates[int(rng.integers(len(candidates)))])
            columns = [rare_column() if x == OTHER else x for x in labels]
            columns.sort(key=RFMID_COLUMNS.index)
            if position % 2 == 0 and position > 0:
                study += 1
            plans.append(
                ImagePlan(
                    split=split,
                    image_id=position + 1,
                    columns=tuple(columns),
                    laterality="R" if position % 2 == 0 else "L",
                    study=study,
                )
            )
        study += 1
    return tuple(plans)


@dataclass(frozen=True)
class Lesion:
    """One planted lesion, in pixel coordinates of its photograph.

    Attributes:
        column: RFMiD column it stands for.
        label: Disease output it stands for.
        centre: ``(x, y)`` pixel centre.
        radius: Radius in pixels of the disc that holds every lesion pixel (the mask).
        colour: Colour name.
        shape: ``disc``, ``ring``, ``dots`` or ``streak``.
    """

    column: str
    label: str
    centre: tuple[float, float]
    radius: float
    colour: str
    shape: Shape


@dataclass(frozen=True)
class Fundus:
    """A rendered photograph with its ground truth.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        masks: Per disease column, ``(H, W)`` uint8 mask (255 on the lesion's disc, else 0).
        lesions: The planted lesions.
        laterality: ``R`` or ``L``.
        fov_centre: ``(x, y)`` centre of the field of view.
        fov_diameter: Diameter of the field of view in pixels.
        disc_centre: ``(x, y)`` centre of the optic disc.
        disc_radius: Radius of the optic disc in pixels.
    """

    image: NDArray[np.uint8]
    masks: dict[str, NDArray[np.uint8]]
    lesions: tuple[Lesion, ...]
    laterality: Laterality
    fov_centre: tuple[float, float]
    fov_diameter: float
    disc_centre: tuple[float, float]
    disc_radius: float


_SHIFT: Final = 4  # cv2 drawing with 4 fractional bits: sub-pixel centres and radii
_ONE: Final = 1 << _SHIFT


def _fixed(value: float) -> int:
    return round(value * _ONE)


def _point(x: float, y: float) -> tuple[int, int]:
    return _fixed(x), _fixed(y)


def _soft_disc(
    canvas: NDArray[np.float32], centre: tuple[float, float], radius: float, colour: Sequence[float], edge: float
) -> None:
    """Blends a disc with a soft edge (``edge`` pixels wide) into a float canvas, in place."""
    height, width = canvas.shape[:2]
    reach = radius + edge
    x0, x1 = max(0, int(centre[0] - reach)), min(width, int(centre[0] + reach) + 2)
    y0, y1 = max(0, int(centre[1] - reach)), min(height, int(centre[1] + reach) + 2)
    if x0 >= x1 or y0 >= y1:
        return
    ys, xs = np.ogrid[y0:y1, x0:x1]
    distance = np.sqrt((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2, dtype=np.float32)
    alpha = np.clip((radius - distance) / max(edge, 1e-3) + 0.5, 0.0, 1.0)[..., None]
    patch = canvas[y0:y1, x0:x1]
    patch += alpha * (np.asarray(colour, dtype=np.float32) - patch)


def _vessel_path(
    rng: np.random.Generator, start: tuple[float, float], heading: float, turn: float, length: float, steps: int
) -> NDArray[np.float64]:
    """A smooth random curve: constant turning plus a little wander."""
    points = np.empty((steps + 1, 2))
    points[0] = start
    step = length / steps
    for i in range(steps):
        heading += turn / steps + rng.normal(0.0, 0.06)
        points[i + 1] = points[i] + step * np.array([math.cos(heading), math.sin(heading)])
    return points


def _draw_vessels(
    rng: np.random.Generator,
    image: NDArray[np.uint8],
    disc: tuple[float, float],
    diameter: float,
    mirror: float,
) -> None:
    """Draws four arcades and a few branches from the disc, tapering with distance."""
    # Headings for a right eye (x towards the disc, image y down); mirrored for left eyes.
    arcades = (
        (-2.05, -1.25, 0.7),  # superior temporal: up, then round the macula
        (2.05, 1.25, 0.7),  # inferior temporal
        (-1.0, 0.4, 0.32),  # superior nasal
        (1.0, -0.4, 0.32),  # inferior nasal
    )
    width = max(1.0, diameter * 0.011)
    for heading, turn, length in arcades:
        for vein in (True, False):
            offset = 0.12 if vein else -0.12
            colour = (118, 22, 16) if vein else (160, 48, 32)
            start_heading = heading + offset + rng.normal(0.0, 0.08)
            if mirror < 0:
                start_heading, bend = math.pi - start_heading, -turn
            else:
                bend = turn
            path = _vessel_path(rng, disc, start_heading, bend, length * diameter * rng.uniform(0.9, 1.1), 18)
            thickness = width * (1.0 if vein else 0.75)
            for part in range(3):
                segment = path[part * 6 : part * 6 + 7]
                cv2.polylines(
                    image,
                    [np.round(segment * _ONE).astype(np.int32)],
                    False,
                    colour,
                    max(1, round(thickness * (1.0 - 0.28 * part))),
                    cv2.LINE_AA,
                    _SHIFT,
                )
            for _ in range(int(rng.integers(1, 3))):
                origin = path[int(rng.integers(5, 14))]
                branch_heading = start_heading + rng.choice((-1.0, 1.0)) * rng.uniform(0.5, 1.1)
                branch = _vessel_path(rng, tuple(origin), branch_heading, rng.normal(0, 0.6), 0.15 * diameter, 8)
                cv2.polylines(
                    image,
                    [np.round(branch * _ONE).astype(np.int32)],
                    False,
                    colour,
                    max(1, round(thickness * 0.5)),
                    cv2.LINE_AA,
                    _SHIFT,
                )


def _draw_lesion(
    rng: np.random.Generator,
    image: NDArray[np.uint8],
    style: LesionStyle,
    centre: tuple[float, float],
    radius: float,
    mirror: float,
) -> None:
    colour = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in style.rgb)
    angle = math.radians(style.angle if mirror > 0 else 180.0 - style.angle) + rng.normal(0.0, 0.15)
    cx, cy = centre
    if style.shape == "disc":
        cv2.circle(image, _point(cx, cy), _fixed(0.85 * radius), colour, -1, cv2.LINE_AA, _SHIFT)
    elif style.shape == "ring":
        thickness = max(1, round(0.3 * radius))
        cv2.circle(image, _point(cx, cy), _fixed(0.87 * radius - thickness / 2), colour, thickness, cv2.LINE_AA, _SHIFT)
    elif style.shape == "dots":
        dot = 0.24 * radius
        cv2.circle(image, _point(cx, cy), _fixed(dot), colour, -1, cv2.LINE_AA, _SHIFT)
        for k in range(6):
            theta = angle + k * math.pi / 3
            spot = (cx + 0.6 * radius * math.cos(theta), cy + 0.6 * radius * math.sin(theta))
            cv2.circle(image, _point(*spot), _fixed(dot), colour, -1, cv2.LINE_AA, _SHIFT)
    else:  # streak
        thickness = max(1, round(0.36 * radius))
        reach = radius - thickness / 2 - 0.5
        dx, dy = reach * math.cos(angle), reach * math.sin(angle)
        cv2.line(image, _point(cx - dx, cy - dy), _point(cx + dx, cy + dy), colour, thickness, cv2.LINE_AA, _SHIFT)


def render_fundus(
    rng: np.random.Generator,
    width: int,
    height: int,
    columns: Sequence[str] = (),
    laterality: Laterality = "R",
) -> Fundus:
    """Draws one synthetic fundus photograph with the lesions of ``columns``.

    Args:
        rng: Source of randomness; the same generator state gives the same image.
        width: Image width in pixels (64 to 8192).
        height: Image height in pixels (64 to 8192).
        columns: Disease columns to plant: named RFMiD diseases, ``OTHER`` or one of the 18 rarer
            columns (drawn as ``OTHER``). Each at most once.
        laterality: ``R`` (disc right of centre) or ``L`` (disc left of centre).

    Returns:
        The :class:`Fundus`, with one mask per column.

    Raises:
        ValueError: For sizes outside 64-8192, an unknown or repeated column or a bad laterality.
    """
    for name, value in (("width", width), ("height", height)):
        if not 64 <= value <= 8192:
            raise ValueError(f"{name} is {value}; expected 64 to 8192")
    if laterality not in ("R", "L"):
        raise ValueError(f"laterality is {laterality!r}; expected 'R' or 'L'")
    labels = [_label_of(c) for c in columns]
    if len(set(labels)) != len(labels):
        raise ValueError(f"columns: {list(columns)} plant the same disease output twice")
    mirror = 1.0 if laterality == "R" else -1.0

    short = min(width, height)
    diameter = 0.95 * short * rng.uniform(0.96, 1.0)
    cx = width / 2 + rng.uniform(-0.02, 0.02) * short
    cy = height / 2 + rng.uniform(-0.015, 0.015) * short
    radius = diameter / 2

    # Fundus background: base colour x vignetting x low-frequency texture, as float, then uint8.
    base = np.array([rng.uniform(190, 228), rng.uniform(72, 104), rng.uniform(26, 48)], dtype=np.float32)
    xs = ((np.arange(width, dtype=np.float32) - cx) / radius)[None, :]
    ys = ((np.arange(height, dtype=np.float32) - cy) / radius)[:, None]
    shade = 1.0 - 0.3 * (xs * xs + ys * ys)
    texture = rng.standard_normal((6, 8)).astype(np.float32)
    fine = rng.standard_normal((24, 32)).astype(np.float32)
    shade *= 1.0 + 0.07 * cv2.resize(texture, (width, height), interpolation=cv2.INTER_CUBIC)
    shade += 0.025 * cv2.resize(fine, (width, height), interpolation=cv2.INTER_LINEAR)
    macula = (cx - mirror * rng.uniform(0.0, 0.03) * diameter, cy + rng.uniform(-0.01, 0.01) * diameter)
    sigma = 0.07 * diameter
    mx = ((np.arange(width, dtype=np.float32) - macula[0]) ** 2)[None, :]
    my = ((np.arange(height, dtype=np.float32) - macula[1]) ** 2)[:, None]
    shade *= 1.0 - 0.32 * np.exp(-(mx + my) / (2 * sigma * sigma))
    canvas = np.asarray(shade[..., None] * base, dtype=np.float32)

    disc_centre = (
        cx + mirror * (_DISC_OFFSET[0] * diameter + rng.uniform(-0.012, 0.012) * diameter),
        cy + (_DISC_OFFSET[1] + rng.uniform(-0.012, 0.012)) * diameter,
    )
    disc_radius = _DISC_RADIUS * diameter * rng.uniform(0.93, 1.07)
    _soft_disc(canvas, disc_centre, disc_radius * 1.12, (235, 170, 110), 0.12 * disc_radius)
    _soft_disc(canvas, disc_centre, disc_radius, (250, 218, 150), 0.1 * disc_radius)
    cup = (disc_centre[0] - mirror * 0.12 * disc_radius, disc_centre[1])
    _soft_disc(canvas, cup, 0.42 * disc_radius, (255, 244, 212), 0.25 * disc_radius)
    image = np.clip(canvas, 0, 255).astype(np.uint8)

    _draw_vessels(rng, image, disc_centre, diameter, mirror)

    lesions: list[Lesion] = []
    masks: dict[str, NDArray[np.uint8]] = {}
    for column, label in zip(columns, labels, strict=True):
        style = LESION_STYLES[label]
        jitter_r = _LESION_JITTER * math.sqrt(rng.uniform()) * diameter
        jitter_t = rng.uniform(0, 2 * math.pi)
        centre = (
            cx + mirror * style.slot[0] * diameter + jitter_r * math.cos(jitter_t),
            cy + style.slot[1] * diameter + jitter_r * math.sin(jitter_t),
        )
        lesion_radius = rng.uniform(*_LESION_RADIUS) * diameter
        _draw_lesion(rng, image, style, centre, lesion_radius, mirror)
        mask = np.zeros((height, width), dtype=np.uint8)
        cv2.circle(mask, _point(*centre), _fixed(lesion_radius), 255, -1, cv2.LINE_8, _SHIFT)
        masks[column] = mask
        lesions.append(
            Lesion(
                column=column,
                label=label,
                centre=(round(centre[0], 2), round(centre[1], 2)),
                radius=round(lesion_radius, 2),
                colour=style.colour,
                shape=style.shape,
            )
        )

    # Camera: slight optical blur, then per-image brightness and contrast, then the black frame.
    gain, bias = rng.uniform(0.85, 1.12), rng.uniform(-12, 12)
    levels = np.arange(256, dtype=np.float32)
    lut = np.clip(gain * (levels - 110.0) + 110.0 + bias, 0, 255).astype(np.uint8)
    fov = np.zeros((height, width), dtype=np.uint8)
    cv2.circle(fov, _point(cx, cy), _fixed(radius), 255, -1, cv2.LINE_AA, _SHIFT)
    camera = cv2.LUT(cv2.GaussianBlur(image, (3, 3), 0.6), lut)
    photograph = np.asarray(cv2.bitwise_and(camera, camera, mask=fov), dtype=np.uint8)
    return Fundus(
        image=photograph,
        masks=masks,
        lesions=tuple(lesions),
        laterality=laterality,
        fov_centre=(round(cx, 2), round(cy, 2)),
        fov_diameter=round(diameter, 2),
        disc_centre=(round(disc_centre[0], 2), round(disc_centre[1], 2)),
        disc_radius=round(disc_radius, 2),
    )


# --- DICOM -------------------------------------------------------------------------------------------

_UID_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "urn:retinagate:synth")

# Coded concepts from the Ophthalmic Photography context groups (PS3.16).
_FUNDUS_CAMERA: Final = ("409898007", "SCT", "Fundus Camera")  # CID 4202
_RETINA: Final = ("5665001", "SCT", "Retina")  # CID 4209
_UTC_SYNCHRONIZATION: Final = "1.2.840.10008.15.1.1"  # well-known UID: Universal Coordinated Time


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _synthetic_uid(*parts: object) -> UID:
    """A UUID-derived UID (``2.25.<uuid>``, PS3.5 B.2) from a name-based UUID: same parts, same UID.

    ``pydicom.uid.generate_uid(prefix=None, ...)`` ignores its entropy sources and returns a random
    UUID, so the name-based UUID is made here.
    """
    name = "\x1f".join(map(str, parts))
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}")


@dataclass(frozen=True)
class DicomIdentity:
    """Patient, study, series and instance attributes of one synthetic DICOM photograph.

    Use :meth:`synthetic` for a deterministic identity from (seed, study, eye); set fields directly to
    control them. Patient data here is fabricated (``SYNTH^P0001``); no real person is described.
    """

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    laterality: Laterality = "R"
    patient_name: str = "SYNTH^P0001"
    patient_id: str = "SYN0001"
    patient_birth_date: str = "19600101"
    patient_sex: Literal["M", "F", "O"] = "O"
    accession_number: str = "SYNA0000001"
    study_id: str = "1"
    study_date: str = "20240102"
    study_time: str = "093000"
    series_number: int = 1
    instance_number: int = 1
    manufacturer: str = "RetinaGate synthetic"
    model_name: str = "SynthFundus"

    def __post_init__(self) -> None:
        if self.laterality not in ("R", "L"):
            raise ValueError(f"laterality is {self.laterality!r}; expected 'R' or 'L'")
        for name in ("study_uid", "series_uid", "sop_instance_uid"):
            value = getattr(self, name)
            if not UID(value).is_valid:
                raise ValueError(f"{name} is {value!r}; expected a valid DICOM UID")

    @classmethod
    def synthetic(
        cls, study: int = 0, laterality: Laterality = "R", *, seed: int = 0, instance: int | None = None
    ) -> DicomIdentity:
        """A deterministic identity: patient and study from ``(seed, study)``, series per eye.

        Args:
            study: Study (and patient) index, from 0.
            laterality: Eye; each eye gets its own series.
            seed: Dataset seed; different seeds give different UIDs.
            instance: Instance key within the series (default: one instance per eye); pass distinct
                values to make several instances in one series.
        """
        rng = np.random.default_rng([seed, 7, study])
        birth = dt.date(1935, 1, 1) + dt.timedelta(days=int(rng.integers(0, 60 * 365)))
        acquired = dt.datetime(2024, 1, 2, 8, 0) + dt.timedelta(days=study, minutes=int(rng.integers(0, 9 * 60)))
        number = study + 1
        key = 0 if instance is None else instance
        return cls(
            study_uid=_synthetic_uid(seed, "study", study),
            series_uid=_synthetic_uid(seed, "series", study, laterality),
            sop_instance_uid=_synthetic_uid(seed, "instance", study, laterality, key),
            laterality=laterality,
            patient_name=f"SYNTH^P{number:04d}",
            patient_id=f"SYN{number:04d}",
            patient_birth_date=birth.strftime("%Y%m%d"),
            patient_sex="M" if rng.integers(2) else "F",
            accession_number=f"SYNA{number:07d}",
            study_id=str(number),
            study_date=acquired.strftime("%Y%m%d"),
            study_time=acquired.strftime("%H%M%S"),
            series_number=1 if laterality == "R" else 2,
            instance_number=key + 1,
        )


TransferSyntax = Literal["jpeg_baseline", "explicit_little"]
_TRANSFER_SYNTAXES: Final[Mapping[str, UID]] = {
    "jpeg_baseline": JPEGBaseline8Bit,
    "explicit_little": ExplicitVRLittleEndian,
}


def _age(birth: str, on: str) -> str:
    born, seen = dt.datetime.strptime(birth, "%Y%m%d").date(), dt.datetime.strptime(on, "%Y%m%d").date()
    years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
    return f"{max(0, min(999, years)):03d}Y"


def build_dicom(
    image: NDArray[np.uint8],
    identity: DicomIdentity | None = None,
    *,
    transfer_syntax: TransferSyntax | str = "jpeg_baseline",
    quality: int = 90,
) -> Dataset:
    """Builds one Ophthalmic Photography 8 Bit Image instance from pixels.

    Colour images become ``YBR_FULL_422`` JPEG baseline (Pillow/libjpeg, 4:2:2) or uncompressed ``RGB``;
    ``(H, W)`` grey images become ``MONOCHROME2`` (a red-free photograph).

    Args:
        image: ``(H, W, 3)`` RGB or ``(H, W)`` grey, uint8.
        identity: Patient/study/series/instance attributes; default ``DicomIdentity.synthetic()``.
        transfer_syntax: ``jpeg_baseline`` (default) or ``explicit_little``, or either's UID.
        quality: JPEG quality, 1 to 100.

    Returns:
        The dataset with its file meta information, ready for ``save_as(..., enforce_file_format=True)``.

    Raises:
        ValueError: For a bad image shape or dtype, transfer syntax or quality.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"image must be a uint8 numpy array, got {getattr(image, 'dtype', type(image).__name__)}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)) or min(image.shape[:2]) < 1:
        raise ValueError(f"image has shape {image.shape}; expected (height, width, 3) RGB or (height, width) grey")
    if image.shape[0] > 65535 or image.shape[1] > 65535:
        raise ValueError(f"image has shape {image.shape}; DICOM allows at most 65535 rows and columns")
    syntax = next((uid for name, uid in _TRANSFER_SYNTAXES.items() if transfer_syntax in (name, uid)), None)
    if syntax is None:
        raise ValueError(
            f"transfer_syntax is {transfer_syntax!r}; expected one of {', '.join(_TRANSFER_SYNTAXES)} or their UIDs"
        )
    if not 1 <= quality <= 100:
        raise ValueError(f"quality is {quality}; expected 1 to 100")
    ident = identity if identity is not None else DicomIdentity.synthetic()
    colour = image.ndim == 3
    rows, columns = image.shape[:2]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = OP_8BIT_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = UID(ident.sop_instance_uid)
    meta.TransferSyntaxUID = syntax

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = OP_8BIT_SOP_CLASS
    ds.SOPInstanceUID = ident.sop_instance_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ident.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ident.study_time
    ds.AcquisitionDateTime = ident.study_date + ident.study_time
    ds.AccessionNumber = ident.accession_number
    ds.Modality = "OP"
    ds.Manufacturer = ident.manufacturer
    ds.ReferringPhysicianName = ""
    ds.ManufacturerModelName = ident.model_name
    ds.SoftwareVersions = "retinagate-synth 1"
    # Patient
    ds.PatientName = ident.patient_name
    ds.PatientID = ident.patient_id
    ds.PatientBirthDate = ident.patient_birth_date
    ds.PatientSex = ident.patient_sex
    ds.PatientAge = _age(ident.patient_birth_date, ident.study_date)
    # Study, series, instance
    ds.StudyInstanceUID = ident.study_uid
    ds.SeriesInstanceUID = ident.series_uid
    ds.StudyID = ident.study_id
    ds.SeriesNumber = ident.series_number
    ds.InstanceNumber = ident.instance_number
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    # Synchronization (dciodvfy requires it for OP images): not synchronised to any other device.
    ds.SynchronizationFrameOfReferenceUID = _UTC_SYNCHRONIZATION
    ds.SynchronizationTrigger = "NO TRIGGER"
    ds.AcquisitionTimeSynchronized = "N"
    # Ocular Region Imaged
    ds.ImageLaterality = ident.laterality
    ds.AnatomicRegionSequence = [_code(*_RETINA)]
    # Acquisition Context (nothing to record)
    ds.AcquisitionContextSequence = []
    # Ophthalmic Photography Acquisition Parameters
    ds.PatientEyeMovementCommanded = "NO"
    ds.HorizontalFieldOfView = 45
    ds.RefractiveStateSequence = []
    ds.EmmetropicMagnification = 1.0
    ds.IntraOcularPressure = None
    ds.PupilDilated = "NO"
    # Ophthalmic Photographic Parameters
    ds.AcquisitionDeviceTypeCodeSequence = [_code(*_FUNDUS_CAMERA)]
    ds.IlluminationTypeCodeSequence = []
    ds.LightPathFilterTypeStackCodeSequence = []
    ds.ImagePathFilterTypeStackCodeSequence = []
    ds.LensesCodeSequence = []
    ds.DetectorType = "CCD"
    # Image Pixel, Multi-frame
    ds.SamplesPerPixel = 3 if colour else 1
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    # Multi-frame and Cine: one frame; the Frame Increment Pointer must point at an attribute that is
    # present, so Frame Time is sent (0 ms: there is no second frame).
    ds.NumberOfFrames = 1
    ds.FrameIncrementPointer = 0x00181063
    ds.FrameTime = 0
    if not colour:
        ds.PresentationLUTShape = "IDENTITY"

    if syntax == JPEGBaseline8Bit:
        buffer = io.BytesIO()
        picture = Image.fromarray(np.ascontiguousarray(image))  # RGB or L, from the shape
        # subsampling=1 is 4:2:2, which is what YBR_FULL_422 declares.
        picture.save(buffer, format="JPEG", quality=quality, subsampling=1 if colour else 0)
        frame = buffer.getvalue()
        ds.PhotometricInterpretation = "YBR_FULL_422" if colour else "MONOCHROME2"
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = f"{image.nbytes / len(frame):.2f}"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
        ds.LossyImageCompression = "00"
        ds.PixelData = np.ascontiguousarray(image).tobytes()
        ds["PixelData"].VR = "OB"
    if colour:
        ds.PlanarConfiguration = 0
    return ds


def write_dicom(
    image: NDArray[np.uint8],
    path: Path,
    identity: DicomIdentity | None = None,
    *,
    transfer_syntax: TransferSyntax | str = "jpeg_baseline",
    quality: int = 90,
) -> Dataset:
    """Writes one Ophthalmic Photography 8 Bit Image file (DICOM Part 10) and returns its dataset.

    See :func:`build_dicom` for the arguments. Parent folders are created.
    """
    ds = build_dicom(image, identity, transfer_syntax=transfer_syntax, quality=quality)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


# --- dataset -----------------------------------------------------------------------------------------


def _png(path: Path, image: NDArray[np.uint8]) -> None:
    data = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    # Level 1: half the encoding time of the default for files about 10% larger.
    ok, encoded = cv2.imencode(".png", data, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise OSError(f"could not encode {path.name} as PNG")
    path.write_bytes(encoded.tobytes())


def _write_image(out: Path, config: SynthConfig, plan: ImagePlan) -> dict[str, Any]:
    """Renders one planned image, writes its PNG, masks (and DICOM); returns its manifest entry."""
    rng = np.random.default_rng([config.seed, 2, SPLITS.index(plan.split), plan.image_id])
    fundus = render_fundus(rng, config.width, config.height, plan.columns, plan.laterality)
    _png(out / plan.split / f"{plan.image_id}.png", fundus.image)
    for column, mask in fundus.masks.items():
        _png(out / "masks" / plan.split / f"{plan.image_id}_{column}.png", mask)
    entry: dict[str, Any] = {
        "split": plan.split,
        "id": plan.image_id,
        "image": f"{plan.split}/{plan.image_id}.png",
        "columns": list(plan.columns),
        "labels": list(plan.labels),
        "laterality": plan.laterality,
        "study": plan.study,
        "patient": plan.study,
        "fov": {"centre": list(fundus.fov_centre), "diameter": fundus.fov_diameter},
        "optic_disc": {"centre": list(fundus.disc_centre), "radius": fundus.disc_radius},
        "lesions": [
            {
                "column": lesion.column,
                "label": lesion.label,
                "centre": list(lesion.centre),
                "radius": lesion.radius,
                "colour": lesion.colour,
                "shape": lesion.shape,
                "mask": f"masks/{plan.split}/{plan.image_id}_{lesion.column}.png",
            }
            for lesion in fundus.lesions
        ],
    }
    if config.dicom:
        identity = DicomIdentity.synthetic(plan.study, plan.laterality, seed=config.seed)
        relative = f"dicom/{plan.study + 1:04d}/{plan.split}_{plan.image_id}.dcm"
        write_dicom(fundus.image, out / relative, identity)
        entry["dicom"] = {
            "path": relative,
            "study_instance_uid": identity.study_uid,
            "series_instance_uid": identity.series_uid,
            "sop_instance_uid": identity.sop_instance_uid,
        }
    return entry


def write_dataset(out: Path, config: SynthConfig) -> dict[str, Any]:
    """Writes a synthetic RFMiD-layout dataset (and DICOM files) under ``out``.

    Images are rendered on a few threads (OpenCV, zlib and libjpeg release the GIL); the files do not
    depend on the thread count. Existing files with the same names are overwritten; nothing else in
    ``out`` is touched. A progress bar goes to stderr when it is a terminal.

    Args:
        out: Output folder (created).
        config: What to make.

    Returns:
        Summary: ``images`` (int), ``splits`` ({split: count}), ``dicom_files`` (int) and ``studies``
        (int, synthetic studies, two eyes each). Positives per label and split are in ``synth.json``.
    """
    from tqdm import tqdm

    out = Path(out)
    plans = plan_dataset(config)
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
        (out / "masks" / split).mkdir(parents=True, exist_ok=True)
    logger.info("writing %d synthetic images (dicom=%s)", len(plans), config.dicom)
    entries: list[dict[str, Any]] = []
    chunk = 32  # bounds the finished-but-unconsumed work held in memory
    with (
        ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool,
        tqdm(total=len(plans), desc="synth", unit="img", file=sys.stderr, disable=None) as progress,
    ):
        for start in range(0, len(plans), chunk):
            batch = plans[start : start + chunk]
            for entry in pool.map(lambda plan: _write_image(out, config, plan), batch):
                entries.append(entry)
                progress.update()

    for split in SPLITS:
        with (out / CSV_NAMES[split]).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["ID", *RFMID_COLUMNS], lineterminator="\n")
            writer.writeheader()
            writer.writerows({"ID": p.image_id, **p.rfmid_row()} for p in plans if p.split == split)

    summary: dict[str, Any] = {
        "images": len(plans),
        "splits": split_sizes(config.n),
        "dicom_files": len(plans) if config.dicom else 0,
        "studies": len({p.study for p in plans}),
    }
    manifest = {
        "generator": "retinagate.synth",
        "format": 1,
        "config": asdict(config),
        "summary": summary,
        "label_counts": {
            split: {label: sum(label in p.labels for p in plans if p.split == split) for label in DISEASE_LABELS}
            for split in SPLITS
        },
        "lesion_styles": {
            label: {"colour": s.colour, "rgb": list(s.rgb), "shape": s.shape, "slot": list(s.slot), "angle": s.angle}
            for label, s in LESION_STYLES.items()
        },
        "images": entries,
    }
    (out / "synth.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return summary
