"""Synthetic fundus photographs with planted lesions, in the RFMiD layout and as DICOM.

The project needs photographs whose heatmaps can be checked against ground truth, without shipping
patient data. Two modes draw them:

**Hard mode** (the default) makes a development set about as hard as real colour fundus photographs, so
that a model trained on it is judged fairly on photographs drawn by someone else. Nothing identifies a
label by itself: not a colour, not a place, not "a spot".

* Anatomy varies per eye: a circular field of view (FOV) 6.8-8.2 optic disc diameters (DD) across (a
  45-degree field is about 13 mm, a disc 1.5-1.8 mm); an oval disc with a cup-to-disc ratio of 0.15-0.5;
  the fovea 2.5 DD (0.9-1.12 times that) temporal of the disc centre and a little below it, the pair
  turned by a few degrees; blond to dark fundus pigmentation, macular pigment, a choroidal pattern
  traced outwards from the posterior pole; four arcades of a vein (calibre 1/10 DD at the disc) and an
  artery (two thirds of that; Hubbard et al., Ophthalmology 1999) with branches, twigs that stop at the
  foveal avascular zone, a wandering course and light reflexes. Healthy eyes show normal findings too:
  vessel reflexes, a foveal reflex, nerve-fibre-layer sheen, a scleral ring, a little pigment, now and
  then a naevus, and dust on the optics.
* Lesions are sized relative to the disc (:data:`LESION_KINDS`), after the ETDRS standard photographs
  and grading definitions (ETDRS report 10, Ophthalmology 1991) and the AREDS drusen grading (Davis et
  al., Arch Ophthalmol 2005): microaneurysms 1/15-1/10 DD (a few pixels at 640 x 480), dot-blot
  haemorrhages up to 1/4 DD, flame haemorrhages 1/4-1/2 DD long along the nerve fibres, hard exudates
  1/20-1/6 DD in clusters and circinate rings, cotton-wool spots 1/4-1/2 DD near the arcades, drusen
  1/25-1/6 DD round the macula, a macular hole 1/4-1/3 DD exactly at the fovea, laser burns 1/10-1/3 DD.
  Each of the 28 outputs draws what the condition looks like (see each ``_<label>`` function: BRVO
  bleeds into the one quadrant a dilated tortuous branch vein drains, CRVO into all four round a swollen
  disc, and so on), in realistic numbers, at varying places in the anatomically plausible region, with
  soft edges and low contrast. Colours are families shared across conditions (``haemorrhage`` in DR,
  BRVO, CRVO and retinitis; ``exudate`` in DR, EDN and macroaneurysms; ``cotton-wool`` in DR, vein
  occlusions and retinitis; ``drusen`` in DN and ARMD), so labels differ by shape, number, size and
  context. ``OTHER`` draws the rare condition its column names (e.g. a boat-shaped preretinal
  haemorrhage for PRH, a cherry-red spot for CRAO). Conditions that would be drawn over the same
  structure (two of the disc, two of the macula) are not planned together, so that no mask covers pixels
  another lesion hides; smaller lesions of different outputs keep clear of each other.
* The camera varies: uneven illumination (vignetting with an off-centre hot spot, a gradient), exposure,
  white balance, gamma, mild gradable defocus, sensor noise, a FOV sometimes taller than the sensor (so
  clipped top and bottom) and sometimes with a small notch, and a JPEG round trip at quality 60-95
  before the PNG is written.
* Sizes: without a fixed size each image takes one of :data:`CAMERA_SIZES` (640 x 480 to 2048 x 1536 and
  square ones), drawn from (seed, split, ID); a fixed size applies to all.
* Masks hold exactly the visible pixels of a column's lesions (those at least half covered, inside the
  FOV), the union over its lesions; ``Lesion.radius`` bounds each lesion.
* Speed, measured on a 2-core machine shared with other jobs: ``retinagate synth OUT --n 640 --size 640
  480 --seed 1`` takes 35 s of CPU time (28 s user, 7 s system: about 55 ms an image, PNG writing
  included), so about 20 s of wall time on two idle cores (38-71 s were measured under a load of 4-7).
  Drawing one image takes about 40 ms of CPU at 640 x 480, 0.1 s at 1024 x 768, 0.35 s at 2048 x 1536.

**Easy mode** plants each of the 28 outputs as a sticker with its own colour and shape at its own place
(:data:`LESION_STYLES`), a disc of about one cell of a 7 x 7 CAM, on a simple fundus (orange-red with
vignetting, a yellow-white disc on the nasal side, a darker macula, dark red vessels): a small
classifier learns it in a few CPU minutes, which suits plumbing tests and the demo. Default size
512 x 384.

Everything is deterministic for a seed: each image draws from its own generator seeded with (seed,
split, id), and every DICOM UID is a name-based UUID UID (``2.25.``) derived from the seed.

Layout written by :func:`write_dataset` under ``OUT``::

    Training/<ID>.png  Evaluation/<ID>.png  Test/<ID>.png
    RFMiD_Training_Labels.csv  RFMiD_Validation_Labels.csv  RFMiD_Testing_Labels.csv
    masks/<Split>/<ID>_<COLUMN>.png      (0/255, one per positive disease column)
    synth.json                           (config with mode and size policy, lesion styles (easy) or kinds
                                          (hard), per-image lesions, fovea and size (hard), DICOM identity)
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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
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
    "CAMERA_SIZES",
    "CSV_NAMES",
    "EASY_SIZE",
    "LESION_KINDS",
    "LESION_STYLES",
    "MODES",
    "OP_8BIT_SOP_CLASS",
    "SPLITS",
    "DicomIdentity",
    "Fundus",
    "ImagePlan",
    "Lesion",
    "LesionKind",
    "LesionStyle",
    "Mode",
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
Mode = Literal["hard", "easy"]
MODES: Final[tuple[Mode, ...]] = ("hard", "easy")
# Easy mode uses the first four; hard mode the others.
Shape = Literal[
    "disc", "ring", "dots", "streak", "dot", "blob", "flame", "patch", "spicule", "band", "crescent", "region", "vessel"
]
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


#: Camera sizes that hard mode mixes when no size is given: the 4:3 sensors of common fundus cameras
#: from VGA to 3 megapixels, and square ones.
CAMERA_SIZES: Final[tuple[tuple[int, int], ...]] = (
    (640, 480), (1024, 768), (1280, 960), (1600, 1200), (2048, 1536), (768, 768), (1024, 1024), (1536, 1536),
)  # fmt: skip
EASY_SIZE: Final = (512, 384)


@dataclass(frozen=True)
class SynthConfig:
    """What :func:`write_dataset` makes.

    Attributes:
        n: Images over the three splits (60/20/20, at least 2 each), 6 to 100000.
        width: Image width in pixels, 64 to 8192; with ``height``, or both ``None`` for the mode's size
            policy: hard mode mixes :data:`CAMERA_SIZES`, easy mode draws 512 x 384.
        height: Image height in pixels, 64 to 8192, or ``None`` (see ``width``).
        seed: Random seed (0 to 2**32 - 1); the same seed gives the same files.
        dicom: Also write Ophthalmic Photography DICOM files, two eyes per study.
        mode: ``hard`` (realistic anatomy, lesions and camera; the default) or ``easy`` (one sticker per
            disease output at a fixed place and colour).
    """

    n: int = 120
    width: int | None = None
    height: int | None = None
    seed: int = 0
    dicom: bool = False
    mode: Mode = "hard"

    def __post_init__(self) -> None:
        for name, low, high in (("n", 6, 100_000), ("width", 64, 8192), ("height", 64, 8192), ("seed", 0, 2**32 - 1)):
            value = getattr(self, name)
            if value is None and name in ("width", "height"):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
            if not low <= value <= high:
                raise ValueError(f"{name} is {value}; expected {low} to {high}")
        if (self.width is None) != (self.height is None):
            raise ValueError(f"width and height are {self.width} and {self.height}; give both or neither")
        if self.mode not in MODES:
            raise ValueError(f"mode is {self.mode!r}; expected one of {', '.join(MODES)}")

    @property
    def size_policy(self) -> str:
        """How image sizes are chosen, in words (recorded in ``synth.json``)."""
        if self.width is not None:
            return f"fixed {self.width}x{self.height}"
        if self.mode == "easy":
            return f"fixed {EASY_SIZE[0]}x{EASY_SIZE[1]}"
        return "mixed camera sizes: " + ", ".join(f"{w}x{h}" for w, h in CAMERA_SIZES)

    def image_size(self, split: str, image_id: int) -> tuple[int, int]:
        """``(width, height)`` of one image: the fixed size, or a camera size drawn from (seed, split, ID)."""
        if self.width is not None and self.height is not None:
            return self.width, self.height
        if self.mode == "easy":
            return EASY_SIZE
        rng = np.random.default_rng([self.seed, 4, SPLITS.index(split), image_id])
        return CAMERA_SIZES[int(rng.integers(len(CAMERA_SIZES)))]


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


# Hard mode: conditions drawn over the same structure, where one would hide the other and leave its mask
# over pixels that no longer show it (a scar over drusen, pallor over a swollen disc). At most one per group.
_EXCLUSIVE_GROUPS: Final[Mapping[str, frozenset[str]]] = {
    "disc": frozenset({"ODE", "AION", "CRVO", "ODP", "RP", "ODC", "TD", "ODPM", "MNF"}),
    "macula": frozenset({"MHL", "MS", "CSR", "ARMD", "PT", "ERM", "DN", "RPEC", "CME", "HPED", "ODPM", "CRAO"}),
    "choroid": frozenset({"MYA", "TSLN", "CF"}),
    "veins": frozenset({"BRVO", "CRVO"}),
    "vitreous": frozenset({"MH", "VH"}),
}


def _hard_compatible(name: str, chosen: Sequence[str]) -> bool:
    """Whether condition ``name`` (a label or a rare column) may join ``chosen`` in one hard image."""
    return not any(name in group and any(c in group for c in chosen) for group in _EXCLUSIVE_GROUPS.values())


def plan_dataset(config: SynthConfig) -> tuple[ImagePlan, ...]:
    """Decides the labels, laterality and study of every image (cheap; nothing is drawn).

    Per split, 30% of the images (chosen at random) are healthy. The diseased ones take their first
    label from a cycle through all 28 disease outputs (reshuffled each round), so every output gets
    ``diseased / 28`` positives or more in each split, then 0-2 random extra labels whose lesions do
    not overlap (easy mode) or would not hide each other (hard mode: at most one condition of the optic
    disc, one of the macula, one of the choroid, one vein occlusion, one vitreous opacity). An ``OTHER``
    lesion stands for the next of the 18 rare columns in another cycle (in hard mode the next one that
    fits the image's other conditions). Images are paired into studies in ID order within a split
    (right eye, then left).
    """
    plans: list[ImagePlan] = []
    study = 0
    rare_rng = np.random.default_rng([config.seed, 3])
    rare: list[str] = []  # the 18 rare columns behind OTHER, also cycled so that each one turns up
    compatible = _compatible if config.mode == "easy" else _hard_compatible

    def rare_column(others: Sequence[str]) -> str:
        if not rare:
            rare.extend(OTHER_COLUMNS[i] for i in rare_rng.permutation(len(OTHER_COLUMNS)))
        if config.mode == "hard":
            for index in range(len(rare) - 1, -1, -1):
                if _hard_compatible(rare[index], others):
                    return rare.pop(index)
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
                    candidates = [x for x in DISEASE_LABELS if x not in labels and compatible(x, labels)]
                    if candidates:
                        labels.append(candidates[int(rng.integers(len(candidates)))])
            columns = [rare_column(labels) if x == OTHER else x for x in labels]
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
        radius: Radius in pixels of the disc that holds every lesion pixel (the mask); in hard mode half
            the lesion's greatest extent, which :data:`LESION_KINDS` bounds relative to the disc.
        colour: Colour name (a key of the easy colour table, or in hard mode a colour family shared by
            every condition whose lesions look alike, e.g. ``haemorrhage``).
        shape: ``disc``, ``ring``, ``dots`` or ``streak`` in easy mode; see :data:`LESION_KINDS` for hard.
        kind: Hard mode: what the lesion is (a key of :data:`LESION_KINDS`); empty in easy mode.
    """

    column: str
    label: str
    centre: tuple[float, float]
    radius: float
    colour: str
    shape: Shape
    kind: str = ""


@dataclass(frozen=True)
class Fundus:
    """A rendered photograph with its ground truth.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        masks: Per disease column, ``(H, W)`` uint8 mask: 255 on its lesions (easy: the lesion's disc), else 0.
        lesions: The planted lesions.
        laterality: ``R`` or ``L``.
        fov_centre: ``(x, y)`` centre of the field of view.
        fov_diameter: Diameter of the field of view in pixels.
        disc_centre: ``(x, y)`` centre of the optic disc.
        disc_radius: Radius of the optic disc in pixels (hard mode: half the mean disc diameter, DD / 2).
        fovea: Hard mode: ``(x, y)`` centre of the fovea; ``None`` in easy mode.
    """

    image: NDArray[np.uint8]
    masks: dict[str, NDArray[np.uint8]]
    lesions: tuple[Lesion, ...]
    laterality: Laterality
    fov_centre: tuple[float, float]
    fov_diameter: float
    disc_centre: tuple[float, float]
    disc_radius: float
    fovea: tuple[float, float] | None = None


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
    *,
    mode: Mode = "hard",
) -> Fundus:
    """Draws one synthetic fundus photograph with the lesions of ``columns``.

    Args:
        rng: Source of randomness; the same generator state gives the same image.
        width: Image width in pixels (64 to 8192).
        height: Image height in pixels (64 to 8192).
        columns: Disease columns to plant: named RFMiD diseases, ``OTHER`` or one of the 18 rarer
            columns (``OTHER`` draws one of the rare conditions; in easy mode all look alike). Each
            disease output at most once.
        laterality: ``R`` (disc right of the fovea) or ``L`` (disc left of the fovea).
        mode: ``hard`` (realistic; default) or ``easy`` (fixed stickers); see the module docstring.

    Returns:
        The :class:`Fundus`, with one mask per column.

    Raises:
        ValueError: For sizes outside 64-8192, an unknown or repeated column, a bad laterality or mode.
    """
    for name, value in (("width", width), ("height", height)):
        if not 64 <= value <= 8192:
            raise ValueError(f"{name} is {value}; expected 64 to 8192")
    if laterality not in ("R", "L"):
        raise ValueError(f"laterality is {laterality!r}; expected 'R' or 'L'")
    if mode not in MODES:
        raise ValueError(f"mode is {mode!r}; expected one of {', '.join(MODES)}")
    labels = [_label_of(c) for c in columns]
    if len(set(labels)) != len(labels):
        raise ValueError(f"columns: {list(columns)} plant the same disease output twice")
    if mode == "hard":
        return _render_hard(rng, width, height, tuple(columns), laterality)
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


# --- hard mode: lesion kinds and colours ---------------------------------------------------------------

Phase = Literal["setup", "deep", "disc", "superficial", "swelling", "vitreous"]
_DRAW_PHASES: Final[tuple[Phase, ...]] = ("deep", "disc", "superficial", "swelling", "vitreous")


@dataclass(frozen=True)
class LesionKind:
    """How one kind of lesion looks in hard mode.

    Attributes:
        colour: Colour family, shared by every condition whose lesions look alike (a haemorrhage is
            ``haemorrhage`` in DR, BRVO, CRVO and retinitis alike).
        shape: Drawing primitive.
        size_dd: ``(min, max)`` greatest extent in optic disc diameters (DD).
    """

    colour: str
    shape: Shape
    size_dd: tuple[float, float]


#: Every lesion kind hard mode draws, with its size relative to the optic disc (see the module docstring
#: for the sources). ``Lesion.radius`` is half the greatest extent, so ``2 * radius / DD`` lies in ``size_dd``.
LESION_KINDS: Final[Mapping[str, LesionKind]] = {
    "microaneurysm": LesionKind("haemorrhage", "dot", (1 / 15, 1 / 10)),
    "dot-blot haemorrhage": LesionKind("haemorrhage", "blob", (1 / 10, 1 / 4)),
    "flame haemorrhage": LesionKind("haemorrhage", "flame", (1 / 4, 1 / 2)),
    "hard exudate": LesionKind("exudate", "dot", (1 / 20, 1 / 6)),
    "cotton-wool spot": LesionKind("cotton-wool", "blob", (1 / 4, 1 / 2)),
    "druse": LesionKind("drusen", "dot", (1 / 25, 1 / 6)),
    "soft druse": LesionKind("drusen", "blob", (1 / 10, 1 / 6)),
    "pigment clump": LesionKind("pigment", "dot", (1 / 20, 1 / 6)),
    "geographic atrophy": LesionKind("atrophy", "patch", (1 / 2, 2.0)),
    "choroidal neovascular membrane": LesionKind("grey", "patch", (1 / 2, 1.0)),
    "subretinal haemorrhage": LesionKind("haemorrhage", "patch", (1 / 2, 1.6)),
    "macular hole": LesionKind("hole", "disc", (1 / 4, 1 / 3)),
    "disciform scar": LesionKind("fibrosis", "patch", (1.0, 2.5)),
    "serous detachment": LesionKind("grey", "disc", (1.0, 2.5)),
    "laser scar": LesionKind("pigment", "ring", (1 / 10, 1 / 3)),
    "bone spicule": LesionKind("pigment", "spicule", (1 / 8, 1 / 3)),
    "waxy disc": LesionKind("pallor", "disc", (0.8, 1.4)),
    "chorioretinal scar": LesionKind("atrophy", "patch", (1 / 2, 2.0)),
    "retinitis patch": LesionKind("cotton-wool", "patch", (1.0, 3.0)),
    "epiretinal sheen": LesionKind("sheen", "patch", (1.5, 3.0)),
    "telangiectatic zone": LesionKind("grey", "patch", (1 / 2, 1.2)),
    "traction membrane": LesionKind("fibrosis", "band", (1.2, 4.5)),
    "rpe mottling": LesionKind("pigment", "patch", (1.0, 3.0)),
    "tessellation": LesionKind("pigment", "region", (3.0, 9.0)),
    "peripapillary atrophy": LesionKind("atrophy", "crescent", (0.8, 1.8)),
    "large cup": LesionKind("pallor", "disc", (0.6, 1.0)),
    "pale disc": LesionKind("pallor", "disc", (0.5, 1.3)),
    "swollen disc": LesionKind("oedema", "disc", (1.3, 1.9)),
    "swollen disc sector": LesionKind("pallor", "crescent", (0.8, 1.9)),
    "optociliary shunt": LesionKind("vein", "vessel", (0.2, 0.8)),
    "tortuous vessel": LesionKind("vein", "vessel", (1.0, 9.0)),
    "media haze": LesionKind("haze", "region", (2.0, 9.0)),
    "asteroid body": LesionKind("asteroid", "dot", (1 / 30, 1 / 12)),
    # The 18 rare conditions behind OTHER.
    "preretinal haemorrhage": LesionKind("haemorrhage", "patch", (1 / 2, 2.0)),
    "vitreous haemorrhage": LesionKind("haemorrhage", "region", (1.0, 4.0)),
    "macroaneurysm": LesionKind("haemorrhage", "disc", (1 / 6, 1 / 3)),
    "myelinated fibres": LesionKind("myelin", "patch", (1 / 2, 2.0)),
    "coloboma": LesionKind("atrophy", "patch", (1.5, 3.5)),
    "retinal whitening": LesionKind("whitening", "region", (1.5, 5.0)),
    "cystoid space": LesionKind("cyst", "dot", (1 / 10, 1 / 4)),
    "choroidal rupture": LesionKind("atrophy", "band", (0.9, 3.0)),
    "choroidal folds": LesionKind("sheen", "region", (2.0, 4.0)),
    "vascular sheathing": LesionKind("cotton-wool", "band", (1.0, 4.5)),
    "cholesterol plaque": LesionKind("exudate", "dot", (1 / 12, 1 / 6)),
    "pigment epithelial detachment": LesionKind("haemorrhage", "disc", (1 / 2, 1.5)),
    "collateral vessel": LesionKind("vein", "vessel", (0.1, 1.0)),
    "disc pit": LesionKind("grey", "dot", (0.15, 0.35)),
}

Blend = Literal["mix", "absorb"]
# "mix" moves a pixel towards an RGB colour (pale lesions); "absorb" multiplies it by a per-channel
# transmittance (blood, pigment, vessels), so they stay darker than the fundus on a blond or a dark one.
_BLENDS: Final[Mapping[str, tuple[Blend, tuple[float, float, float]]]] = {
    "haemorrhage": ("absorb", (0.55, 0.27, 0.35)),
    "hole": ("absorb", (0.66, 0.4, 0.45)),
    "pigment": ("absorb", (0.36, 0.33, 0.36)),
    "vein": ("absorb", (0.6, 0.34, 0.45)),
    "artery": ("absorb", (0.8, 0.56, 0.64)),
    "exudate": ("mix", (242, 216, 122)),
    "drusen": ("mix", (230, 198, 120)),
    "cotton-wool": ("mix", (238, 226, 210)),
    "atrophy": ("mix", (238, 210, 172)),
    "fibrosis": ("mix", (220, 210, 192)),
    "sheen": ("mix", (252, 250, 240)),
    "grey": ("mix", (160, 126, 110)),
    "cyst": ("mix", (214, 172, 140)),
    "pallor": ("mix", (242, 226, 198)),
    "waxy": ("mix", (238, 214, 152)),
    "oedema": ("mix", (234, 156, 122)),
    "haze": ("mix", (206, 176, 146)),
    "asteroid": ("mix", (252, 244, 206)),
    "whitening": ("mix", (228, 216, 202)),
    "myelin": ("mix", (246, 240, 230)),
    "disc": ("mix", (248, 190, 136)),
    "cup": ("mix", (255, 240, 210)),
    "scleral ring": ("mix", (230, 192, 152)),
}

# A lesion of each output to draw when the chance placement left its mask empty (a tiny image, a
# crowded fundus), so every positive column always has a visible lesion.
_FALLBACK_KIND: Final[Mapping[str, str]] = {
    "DR": "dot-blot haemorrhage", "ARMD": "soft druse", "MH": "media haze", "DN": "druse",
    "MYA": "peripapillary atrophy", "BRVO": "flame haemorrhage", "TSLN": "tessellation",
    "ERM": "epiretinal sheen", "LS": "laser scar", "MS": "disciform scar", "CSR": "serous detachment",
    "ODC": "large cup", "CRVO": "flame haemorrhage", "TV": "tortuous vessel", "AH": "asteroid body",
    "ODP": "pale disc", "ODE": "swollen disc", "ST": "optociliary shunt", "AION": "swollen disc sector",
    "PT": "telangiectatic zone", "RT": "traction membrane", "RS": "retinitis patch",
    "CRS": "chorioretinal scar", "EDN": "hard exudate", "RPEC": "rpe mottling", "MHL": "macular hole",
    "RP": "bone spicule", OTHER: "cotton-wool spot",
}  # fmt: skip

Point = tuple[float, float]
Bounds = tuple[int, int, int, int]
Harmonics = tuple[tuple[int, float, float], ...]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> NDArray[np.float32]:
    """Zero-mean noise of about unit variance with features ``cell`` pixels across (bicubic upsampling)."""
    height, width = shape
    grid = rng.standard_normal((max(2, math.ceil(height / cell) + 1), max(2, math.ceil(width / cell) + 1)))
    return np.asarray(cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC))


def _ellipse_cover(
    xs: NDArray[np.float32],
    ys: NDArray[np.float32],
    centre: Point,
    a: float,
    b: float,
    angle: float,
    soft: float,
    harmonics: Harmonics = (),
) -> NDArray[np.float32]:
    """Coverage (0-1) of an ellipse with semi-axes ``a`` (along ``angle``) and ``b``, 0.5 on its edge.

    ``soft`` is the width of the edge ramp in pixels; ``harmonics`` ``(k, amplitude, phase)`` make the
    outline irregular (radius times ``1 + sum(amplitude * cos(k * theta + phase))``).
    """
    dx, dy = xs - np.float32(centre[0]), ys - np.float32(centre[1])
    c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    u = (dx * c + dy * s) / np.float32(a)
    v = (dy * c - dx * s) / np.float32(b)
    rho = np.sqrt(u * u + v * v)
    if harmonics:
        theta = np.arctan2(v, u)
        scale = np.ones_like(rho)
        for k, amplitude, phase in harmonics:
            scale += np.float32(amplitude) * np.cos(np.float32(k) * theta + np.float32(phase))
        rho = rho / scale
    cover = (1.0 - rho) * np.float32(min(a, b) / soft) + np.float32(0.5)
    return np.asarray(np.clip(cover, 0.0, 1.0), dtype=np.float32)


def _reach(harmonics: Harmonics, aspect: float) -> float:
    """Greatest distance from the centre to the outline of :func:`_ellipse_cover` with semi-axes ``1`` and
    ``aspect``, so that a lesion of a given extent can be drawn exactly that large."""
    theta = np.linspace(0.0, 2 * math.pi, 256, endpoint=False)
    scale = np.ones_like(theta)
    for k, amplitude, phase in harmonics:
        scale += amplitude * np.cos(k * theta + phase)
    return float((scale * np.sqrt(np.cos(theta) ** 2 + (aspect * np.sin(theta)) ** 2)).max())


@dataclass
class _Vessel:
    """One vessel of the hard-mode tree, in pixels."""

    key: str  # "STv", "ITa", ... for the eight main vessels, "" for branches and twigs
    vein: bool
    points: NDArray[np.float64]  # (N, 2)
    widths: NDArray[np.float64]  # (N,)
    tortuous: bool


class _Scene:
    """One hard-mode photograph while it is drawn: anatomy, a float RGB canvas, masks and lesions.

    Distances in disc diameters (DD) are measured in an eye frame: ``t`` points temporally (from the
    disc towards the fovea), ``s`` superiorly, both turned with the photograph's small rotation.
    """

    def __init__(self, rng: np.random.Generator, width: int, height: int, laterality: Laterality) -> None:
        self.rng = rng
        self.width, self.height = width, height
        self.mirror = 1.0 if laterality == "R" else -1.0
        self.masks: dict[str, NDArray[np.bool_]] = {}
        self.lesions: list[Lesion] = []
        self.owner = np.full((height, width), -1, np.int8)  # which output's lesion holds a pixel
        self._owners: dict[str, int] = {}
        self._tints: dict[str, tuple[Blend, NDArray[np.float32]]] = {}
        self._place_anatomy()
        self.rgb: NDArray[np.float32] = np.zeros((height, width, 3), np.float32)
        # What conditions change in the anatomy; set in the "setup" phase, before anything is drawn.
        self.pigmentation = float(rng.beta(2.0, 2.0))  # 0: blond fundus, 1: dark
        self.artery_calibre = 1.0
        self.vein_calibre = 1.0
        self.vein_tortuosity = 0.0
        self.tortuous: dict[str, tuple[float, float]] = {}  # main vessel key -> (amplitude, wavelength DD)
        self.tv_column: str | None = None
        self.brvo: tuple[str, float] | None = None  # quadrant, occlusion distance along its vein (DD)
        self.cup_ratio = float(rng.uniform(0.15, 0.5))
        self.cup_column: str | None = None
        self.disc_squash = 1.0
        self.aion_sector = 1.0  # +1: the superior half of the disc swells, -1: the inferior half
        self.tessellation: list[tuple[str, Point, float, float, float]] = []  # column, centre, rx DD, ry DD, strength
        self.vessels: list[_Vessel] = []

    # --- geometry ---

    def _place_anatomy(self) -> None:
        rng, width, height = self.rng, self.width, self.height
        # Many cameras image a circle taller than the sensor, so the FOV is clipped top and bottom.
        self.clipped = width >= 1.15 * height and rng.uniform() < 0.4
        if self.clipped:
            diameter = min(height * rng.uniform(1.04, 1.22), 0.97 * width)
        else:
            diameter = min(width, height) * rng.uniform(0.86, 0.99)
        self.radius = diameter / 2
        self.centre: Point = (
            width / 2 + rng.uniform(-0.015, 0.015) * height,
            height / 2 + rng.uniform(-0.012, 0.012) * height,
        )
        self.dd = diameter / rng.uniform(6.8, 8.2)  # a 45-degree field is 7-8 disc diameters across
        tilt = math.radians(rng.normal(0.0, 4.0))
        c, s = math.cos(tilt), math.sin(tilt)
        self.e_t = (-self.mirror * c, -self.mirror * s)
        self.e_s = (s, -c)
        temporal, superior = rng.uniform(-0.3, 1.0), rng.normal(0.0, 0.2)
        # Disc centre 2.5 DD nasal of the fovea (about 4.5 mm) and a little above it.
        to_disc = (-2.5 * rng.uniform(0.9, 1.12), rng.uniform(0.05, 0.4))
        for _ in range(40):
            self.fovea = self.at(self.centre, temporal, superior)
            self.disc = self.at(self.fovea, *to_disc)
            if math.dist(self.disc, self.centre) + 0.75 * self.dd <= self.radius:
                break
            temporal += 0.1
        self.disc_axes = (0.5 * self.dd * rng.uniform(0.9, 1.0), 0.5 * self.dd * rng.uniform(1.0, 1.1))
        self.notch: tuple[float, float, float] | None = None
        if rng.uniform() < 0.3:
            sides = (0.0, math.pi) if self.clipped else (0.0, math.pi / 2, math.pi, 1.5 * math.pi)
            angle = sides[int(rng.integers(len(sides)))] + rng.normal(0.0, 0.05)
            size = diameter * rng.uniform(0.02, 0.035)
            edge = (self.centre[0] + self.radius * math.cos(angle), self.centre[1] + self.radius * math.sin(angle))
            self.notch = (edge[0], edge[1], size)
        circle = np.zeros((height, width), np.uint8)
        cv2.circle(circle, _point(*self.centre), _fixed(self.radius), 255, -1, cv2.LINE_AA, _SHIFT)
        fov = circle.astype(np.float32) / 255.0
        if self.notch is not None:
            nx, ny, size = self.notch
            cut = np.zeros((height, width), np.uint8)
            corners = np.array([[nx - size / 2, ny - size / 2], [nx + size / 2, ny + size / 2]])
            cv2.rectangle(cut, _point(*corners[0]), _point(*corners[1]), 255, -1, cv2.LINE_AA, _SHIFT)
            fov *= 1.0 - cut.astype(np.float32) / 255.0
        self.fov: NDArray[np.float32] = np.asarray(fov, dtype=np.float32)
        self.visible: NDArray[np.bool_] = self.fov >= 0.5

    def at(self, origin: Point, t: float, s: float) -> Point:
        """The point ``t`` DD temporal and ``s`` DD superior of ``origin``."""
        return (
            origin[0] + self.dd * (t * self.e_t[0] + s * self.e_s[0]),
            origin[1] + self.dd * (t * self.e_t[1] + s * self.e_s[1]),
        )

    def ts(self, point: Point, origin: Point) -> Point:
        """``(t, s)`` of ``point`` from ``origin``, in DD."""
        dx, dy = point[0] - origin[0], point[1] - origin[1]
        return (dx * self.e_t[0] + dy * self.e_t[1]) / self.dd, (dx * self.e_s[0] + dy * self.e_s[1]) / self.dd

    def polar(self, origin: Point, distance: float, angle: float) -> Point:
        """The point ``distance`` DD from ``origin`` at ``angle`` (radians, from temporal towards superior)."""
        return self.at(origin, distance * math.cos(angle), distance * math.sin(angle))

    def around(self, origin: Point, inner: float, outer: float) -> Point:
        """A point uniformly in the annulus ``inner``-``outer`` DD around ``origin``."""
        distance = math.sqrt(self.rng.uniform(inner * inner, outer * outer))
        return self.polar(origin, distance, self.rng.uniform(0.0, 2 * math.pi))

    def inside(self, point: Point, margin: float) -> bool:
        """Whether a disc of radius ``margin`` around ``point`` lies in the visible field of view."""
        x, y = point
        if not (margin <= x <= self.width - 1 - margin and margin <= y <= self.height - 1 - margin):
            return False
        if math.dist(point, self.centre) > self.radius - margin:
            return False
        return self.notch is None or math.dist(point, self.notch[:2]) > self.notch[2] + margin

    def bounds(self, centre: Point, reach: float) -> Bounds | None:
        x0, x1 = max(0, math.floor(centre[0] - reach)), min(self.width, math.ceil(centre[0] + reach) + 1)
        y0, y1 = max(0, math.floor(centre[1] - reach)), min(self.height, math.ceil(centre[1] + reach) + 1)
        return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None

    @staticmethod
    def grid(bounds: Bounds) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        x0, y0, x1, y1 = bounds
        return np.arange(x0, x1, dtype=np.float32)[None, :], np.arange(y0, y1, dtype=np.float32)[:, None]

    def t_map(self, bounds: Bounds, origin: Point) -> NDArray[np.float32]:
        """``t`` (DD) of every pixel of ``bounds`` from ``origin``."""
        xs, ys = self.grid(bounds)
        t = ((xs - origin[0]) * self.e_t[0] + (ys - origin[1]) * self.e_t[1]) / self.dd
        return np.asarray(t, dtype=np.float32)

    def s_map(self, bounds: Bounds, origin: Point) -> NDArray[np.float32]:
        """``s`` (DD) of every pixel of ``bounds`` from ``origin``."""
        xs, ys = self.grid(bounds)
        s = ((xs - origin[0]) * self.e_s[0] + (ys - origin[1]) * self.e_s[1]) / self.dd
        return np.asarray(s, dtype=np.float32)

    @property
    def axis_angle(self) -> float:
        """Image angle (radians) of the temporal direction."""
        return math.atan2(self.e_t[1], self.e_t[0])

    def size(self, kind: str, low: float | None = None, high: float | None = None) -> float:
        """A random greatest extent in pixels for ``kind``, within its range (narrowed by ``low``/``high`` DD)."""
        lo, hi = LESION_KINDS[kind].size_dd
        lo, hi = max(lo, low if low is not None else lo), min(hi, high if high is not None else hi)
        return float(self.rng.uniform(lo, hi)) * self.dd

    def harmonics(self, wobble: float) -> Harmonics:
        if wobble <= 0:
            return ()
        rng = self.rng
        return tuple((k, wobble * rng.uniform(0.3, 1.0) / (k - 1), rng.uniform(0, 2 * math.pi)) for k in range(2, 6))

    def noise(self, bounds: Bounds, cell_dd: float) -> NDArray[np.float32]:
        x0, y0, x1, y1 = bounds
        return _smooth_noise(self.rng, (y1 - y0, x1 - x0), max(1.0, cell_dd * self.dd))

    def tint(self, colour: str) -> tuple[Blend, NDArray[np.float32]]:
        """The colour family's blend for this photograph, varied a little from image to image."""
        if colour not in self._tints:
            blend, value = _BLENDS[colour]
            jitter = self.rng.uniform(0.94, 1.06, 3)
            if blend == "mix":
                rgb = np.clip(np.asarray(value) * jitter, 0, 255)
            else:
                rgb = np.clip(np.asarray(value) ** jitter, 0.0, 1.0)
            self._tints[colour] = (blend, rgb.astype(np.float32))
        return self._tints[colour]

    # --- masks and placement ---

    def _owner_id(self, column: str) -> int:
        return self._owners.setdefault(column, len(self._owners))

    def taken(self, point: Point, reach: float, column: str) -> bool:
        """Whether another output's lesion lies within ``reach`` pixels (bounding box) of ``point``."""
        box = self.bounds(point, reach)
        if box is None:
            return False
        x0, y0, x1, y1 = box
        patch = self.owner[y0:y1, x0:x1]
        return bool(((patch >= 0) & (patch != self._owner_id(column))).any())

    def sample(
        self,
        where: Callable[[], Point],
        reach: float,
        column: str | None,
        accept: Callable[[Point], bool] | None = None,
        tries: int = 40,
    ) -> Point | None:
        """A point from ``where`` whose ``reach`` stays in the FOV, passes ``accept`` and, for a column,
        keeps clear of other outputs' lesions; ``None`` after ``tries`` misses."""
        for _ in range(tries):
            point = where()
            if not self.inside(point, reach + 1.0):
                continue
            if accept is not None and not accept(point):
                continue
            if column is not None and self.taken(point, reach, column):
                continue
            return point
        return None

    def record(self, column: str, kind: str, centre: Point, extent: float) -> None:
        """Adds a lesion to the ground truth: ``extent`` is its greatest extent in pixels."""
        self.lesions.append(
            Lesion(
                column=column,
                label=_label_of(column),
                centre=(round(centre[0], 2), round(centre[1], 2)),
                radius=round(extent / 2, 2),
                colour=LESION_KINDS[kind].colour,
                shape=LESION_KINDS[kind].shape,
                kind=kind,
            )
        )

    def mark(self, column: str, bounds: Bounds, region: NDArray[np.bool_], claim: bool = True) -> None:
        """Adds visible pixels of ``region`` (within ``bounds``) to the column's mask."""
        x0, y0, x1, y1 = bounds
        region = region & self.visible[y0:y1, x0:x1]
        mask = self.masks.setdefault(column, np.zeros((self.height, self.width), bool))
        mask[y0:y1, x0:x1] |= region
        if claim:
            self.owner[y0:y1, x0:x1][region] = self._owner_id(column)

    def blend(
        self, bounds: Bounds, weight: NDArray[np.float32], colour: str, *, target: NDArray[np.float32] | None = None
    ) -> None:
        """Blends a colour family into the canvas with per-pixel ``weight`` (0-1)."""
        x0, y0, x1, y1 = bounds
        mode, value = self.tint(colour)
        patch = self.rgb[y0:y1, x0:x1] if target is None else target
        w = np.clip(weight, 0.0, 1.0)[..., None]
        if mode == "mix":
            patch += w * (value - patch)
        else:
            patch *= 1.0 - w * (1.0 - value)

    def blend_layer(self, layer: cv2.typing.MatLike, colour: str, strength: float = 1.0) -> None:
        """Blends a colour family over the whole canvas with weight ``layer / 255 * strength``.

        Whole-image blends (the vessel tree) go through per-channel look-up tables: a few times faster
        than float arithmetic on every pixel, which matters at 3 megapixels.
        """
        mode, value = self.tint(colour)
        weight = np.arange(256, dtype=np.float32)[:, None] * np.float32(strength / 255.0)  # (256, 1)
        triple = cv2.merge([layer, layer, layer])
        if mode == "absorb":
            factor = cv2.LUT(triple, (1.0 - weight * (1.0 - value)).reshape(256, 1, 3).astype(np.float32))
            cv2.multiply(self.rgb, factor, dst=self.rgb)
        else:
            keep = cv2.LUT(triple, np.repeat(1.0 - weight, 3, axis=1).reshape(256, 1, 3).astype(np.float32))
            add = cv2.LUT(triple, (weight * value).reshape(256, 1, 3).astype(np.float32))
            cv2.multiply(self.rgb, keep, dst=self.rgb)
            cv2.add(self.rgb, add, dst=self.rgb)

    def paint(
        self,
        column: str | None,
        kind: str,
        bounds: Bounds,
        cover: NDArray[np.float32],
        opacity: float | NDArray[np.float32],
        *,
        colour: str | None = None,
        centre: Point | None = None,
        extent: float = 0.0,
        claim: bool = True,
    ) -> None:
        """Draws a lesion part: blends its colour with ``cover * opacity`` and masks ``cover >= 0.5``.

        With ``centre`` the lesion is recorded (``extent``: greatest extent in pixels) and its centre
        pixel always masked, so a lesion smaller than a pixel still has a mask. ``column`` ``None``
        draws a normal finding (no mask, no record).
        """
        self.blend(bounds, cover * opacity, colour or LESION_KINDS[kind].colour)
        if column is None:
            return
        region = cover >= 0.5
        if centre is not None:
            x0, y0, x1, y1 = bounds
            cx, cy = round(centre[0]) - x0, round(centre[1]) - y0
            if 0 <= cx < x1 - x0 and 0 <= cy < y1 - y0:
                region[cy, cx] = True
            self.record(column, kind, centre, extent)
        self.mark(column, bounds, region, claim)

    def ellipse(
        self, centre: Point, extent: float, aspect: float, angle: float, soft: float, harmonics: Harmonics = ()
    ) -> tuple[Bounds, NDArray[np.float32]] | None:
        """Bounds and coverage of an ellipse whose greatest extent (outline included) is ``extent``."""
        a = max(0.3, extent / 2 / _reach(harmonics, aspect))
        b = max(0.3, a * aspect)
        soft_px = max(0.5, soft * b)
        box = self.bounds(centre, extent / 2 + soft_px + 1)
        if box is None:
            return None
        xs, ys = self.grid(box)
        return box, _ellipse_cover(xs, ys, centre, a, b, angle, soft_px, harmonics)

    def spot(
        self,
        column: str | None,
        kind: str,
        centre: Point,
        extent: float,
        *,
        opacity: float,
        aspect: float = 1.0,
        angle: float = 0.0,
        soft: float = 0.3,
        wobble: float = 0.0,
        texture: float = 0.0,
        texture_cell: float = 0.15,
        colour: str | None = None,
        record: bool = True,
        claim: bool = True,
    ) -> None:
        """An elliptic lesion; ``soft`` is its edge width relative to the minor semi-axis, ``wobble``
        makes its outline irregular, ``texture`` varies its opacity (features ``texture_cell`` DD)."""
        shape = self.ellipse(centre, extent, aspect, angle, soft, self.harmonics(wobble))
        if shape is None:
            return
        box, cover = shape
        strength: float | NDArray[np.float32] = opacity
        if texture > 0 or extent >= 8:
            # Real lesions are not flat: a fine grain on every lesion big enough to show one.
            x0, y0, x1, y1 = box
            variation = np.zeros((y1 - y0, x1 - x0), np.float32)
            if extent >= 8:
                variation += 0.2 * self.noise(box, 0.03)
            if texture > 0:
                variation += texture * self.noise(box, texture_cell)
            strength = np.asarray(np.clip(opacity * (1.0 + variation), 0.0, 1.0), np.float32)
        self.paint(
            column,
            kind,
            box,
            cover,
            strength,
            colour=colour,
            centre=centre if record else None,
            extent=extent,
            claim=claim,
        )

    def band_cover(
        self, points: NDArray[np.float64], width: float, soft: float, bounds: Bounds | None = None
    ) -> tuple[Bounds, NDArray[np.float32]] | None:
        """Coverage of a polyline ``width`` pixels wide with a blurred edge (``soft`` pixels)."""
        if bounds is None:
            low, high = points.min(axis=0), points.max(axis=0)
            reach = width / 2 + 2 * soft + 2
            centre = ((low[0] + high[0]) / 2, (low[1] + high[1]) / 2)
            bounds = self.bounds(centre, max(high[0] - low[0], high[1] - low[1]) / 2 + reach)
            if bounds is None:
                return None
        x0, y0, x1, y1 = bounds
        canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
        local = np.round((points - (x0, y0)) * _ONE).astype(np.int32)
        cv2.polylines(canvas, [local], False, 255, max(1, round(width)), cv2.LINE_AA, _SHIFT)
        cover = canvas.astype(np.float32) / 255.0
        if soft > 0.3:
            cover = np.asarray(cv2.GaussianBlur(cover, (0, 0), soft), np.float32)
        if width < 1:
            cover *= width
        return bounds, np.asarray(cover, dtype=np.float32)

    def band(
        self,
        column: str | None,
        kind: str,
        points: NDArray[np.float64],
        width: float,
        *,
        opacity: float,
        soft: float = 0.5,
        texture: float = 0.0,
        colour: str | None = None,
        record: bool = True,
        claim: bool = True,
    ) -> None:
        """A lesion along a polyline (a membrane, a sheathed vessel, a shunt); recorded by the circle
        around the middle of its bounding box that holds it."""
        shape = self.band_cover(points, width, soft)
        if shape is None:
            return
        box, cover = shape
        strength: float | NDArray[np.float32] = opacity
        if texture > 0:
            strength = np.clip(opacity * (1.0 + texture * self.noise(box, 0.1)), 0.0, 1.0)
        low, high = points.min(axis=0), points.max(axis=0)
        centre = (float(low[0] + high[0]) / 2, float(low[1] + high[1]) / 2)
        extent = 2 * (float(np.hypot(*(points - centre).T).max()) + width / 2 + soft)
        self.paint(
            column,
            kind,
            box,
            cover,
            strength,
            colour=colour,
            centre=centre if record else None,
            extent=extent,
            claim=claim,
        )

    def nfl_angle(self, point: Point) -> float:
        """Image angle of the nerve-fibre layer at ``point``: along the nearest large vessel (they run
        with the fibre bundles), else radial from the disc."""
        best, angle = 1.5 * self.dd, math.atan2(point[1] - self.disc[1], point[0] - self.disc[0])
        for vessel in self.vessels:
            if not vessel.key:
                continue
            d = np.hypot(vessel.points[:, 0] - point[0], vessel.points[:, 1] - point[1])
            i = int(np.argmin(d))
            if d[i] < best and 0 < i < len(d) - 1:
                best = float(d[i])
                step = vessel.points[i + 1] - vessel.points[i - 1]
                angle = math.atan2(step[1], step[0])
        return angle

    def main(self, key: str) -> _Vessel:
        return next(v for v in self.vessels if v.key == key)

    def along(self, key: str, start: float, stop: float, spread: float = 0.0) -> Point:
        """A point on main vessel ``key`` between ``start`` and ``stop`` DD from the disc, moved sideways
        by a normal offset of ``spread`` DD."""
        vessel = self.main(key)
        i = int(self.rng.integers(max(1, round(start / _STEP_DD)), max(2, round(stop / _STEP_DD))))
        i = min(i, len(vessel.points) - 2)
        x, y = vessel.points[i]
        step = vessel.points[i + 1] - vessel.points[i - 1]
        norm = float(np.hypot(*step)) or 1.0
        offset = self.rng.normal(0.0, spread) * self.dd if spread > 0 else 0.0
        return float(x - step[1] / norm * offset), float(y + step[0] / norm * offset)

    def jitter(self, origin: Point, spread: float) -> Point:
        """``origin`` moved by a normal offset of ``spread`` DD in each direction."""
        return self.at(origin, self.rng.normal(0.0, spread), self.rng.normal(0.0, spread))

    def near_arcade(self) -> Point:
        key = ("STv", "STa", "ITv", "ITa")[int(self.rng.integers(4))]
        return self.along(key, 0.8, 4.5, 0.35)

    # --- anatomy ---

    def paint_background(self) -> None:
        """Fundus colour, macular pigment, choroidal pattern (tessellation) and grain.

        Smooth parts are computed on a grid of 12 cells per DD and upsampled, which keeps the cost of a
        large photograph close to that of a small one.
        """
        rng, dd = self.rng, self.dd
        lw, lh = max(8, round(self.width * 16 / dd)), max(8, round(self.height * 16 / dd))
        xs = ((np.arange(lw, dtype=np.float32) + 0.5) * (self.width / lw) - 0.5)[None, :]
        ys = ((np.arange(lh, dtype=np.float32) + 0.5) * (self.height / lh) - 0.5)[:, None]
        from_fovea = np.sqrt((xs - self.fovea[0]) ** 2 + (ys - self.fovea[1]) ** 2) / np.float32(dd)
        from_centre = np.sqrt((xs - self.centre[0]) ** 2 + (ys - self.centre[1]) ** 2) / np.float32(dd)
        pigment = self.pigmentation
        blond, dark = np.array([228, 124, 66], np.float32), np.array([150, 66, 34], np.float32)
        base = (blond * (1 - pigment) + dark * pigment) * rng.uniform(0.94, 1.06, 3).astype(np.float32)
        light = 1.0 + 0.06 * _smooth_noise(rng, (lh, lw), 32) + 0.025 * _smooth_noise(rng, (lh, lw), 8)
        light += 0.025 * _smooth_noise(rng, (lh, lw), 1.6)  # RPE mottle, a tenth of a disc diameter across
        macula = rng.uniform(0.12, 0.3) * (0.6 + 0.6 * pigment) * np.exp(
            -0.5 * (from_fovea / rng.uniform(0.55, 0.85)) ** 2
        ) + rng.uniform(0.04, 0.1) * np.exp(-0.5 * (from_fovea / 0.14) ** 2)
        # Choroidal vessels: ribbons where noise crosses zero; the pigmented spaces between them darken.
        # The noise is drawn in polar coordinates round the posterior pole, coarse along the radius, so
        # the ribbons run outwards and widen towards the periphery as the choroidal vessels do.
        pole = self.fovea
        radius = np.sqrt((xs - pole[0]) ** 2 + (ys - pole[1]) ** 2) / np.float32(dd)
        turns, step = 64, 0.45
        polar = rng.standard_normal((math.ceil(float(radius.max()) / step) + 3, turns)).astype(np.float32)
        map_x = ((np.arctan2(ys - pole[1], xs - pole[0]) + math.pi) * (turns / (2 * math.pi))).astype(np.float32)
        map_y = (radius / step).astype(np.float32)
        radial = cv2.remap(polar, map_x, map_y, cv2.INTER_CUBIC, borderMode=cv2.BORDER_WRAP)
        outward = np.clip(radius / 2.0, 0.0, 1.0)  # no pinwheel at the pole: isotropic there
        crossing = 0.85 * outward * radial + (0.35 + 0.5 * (1 - outward)) * _smooth_noise(rng, (lh, lw), 5)
        ribbons = np.exp(-((crossing / 0.55) ** 2))
        contrast = rng.uniform(0.02, 0.12) * (1 - 0.6 * pigment) * (0.4 + 0.6 * np.clip(from_centre / 3.5, 0, 1))
        for column, centre, rx, ry, strength in self.tessellation:
            harmonics = self.harmonics(0.15)
            grow = _reach(harmonics, ry / rx)
            angle = rng.uniform(0, math.pi)
            region = _ellipse_cover(xs, ys, centre, rx * dd / grow, ry * dd / grow, angle, 0.5 * ry * dd, harmonics)
            contrast = contrast + strength * region
            full = cv2.resize(region, (self.width, self.height), interpolation=cv2.INTER_LINEAR)
            self.mark(column, (0, 0, self.width, self.height), full >= 0.5, claim=False)
            self.record(column, "tessellation", centre, 2 * max(rx, ry) * dd)
        rgb = base[None, None, :] * light[..., None]
        rgb *= 1.0 - macula[..., None] * np.array([0.8, 1.0, 1.1], np.float32)
        rgb *= 1.0 - (contrast * (1.0 - ribbons))[..., None] * np.array([0.55, 0.7, 0.65], np.float32)
        self.rgb = np.asarray(
            cv2.resize(rgb.astype(np.float32), (self.width, self.height), interpolation=cv2.INTER_CUBIC), np.float32
        )
        grain = _smooth_noise(rng, (self.height, self.width), max(1.0, dd / 40))
        self.rgb *= (1.0 + np.float32(rng.uniform(0.015, 0.035)) * grain)[..., None]

    def draw_disc(self) -> None:
        """Optic disc: a pink-orange rim, a pale cup (large with ODC), sometimes a scleral ring."""
        rng = self.rng
        a, b = self.disc_axes[0] * self.disc_squash, self.disc_axes[1]
        angle = self.axis_angle
        if rng.uniform() < 0.5:  # peripapillary scleral ring, a normal finding
            ring = self.disc_cover(grow=1.12, soft=0.15)
            if ring is not None:
                box, cover = ring
                xs, ys = self.grid(box)
                cover = np.clip(cover - _ellipse_cover(xs, ys, self.disc, b, a, angle + math.pi / 2, 0.16 * a), 0, 1)
                self.paint(None, "pale disc", box, cover, rng.uniform(0.2, 0.4), colour="scleral ring")
        rim = self.ellipse(self.disc, 2 * b, a / b, angle + math.pi / 2, 0.1)
        if rim is not None:
            self.paint(None, "pale disc", *rim, rng.uniform(0.75, 0.9), colour="disc")
        cup_centre = self.at(self.disc, rng.uniform(0.02, 0.1), rng.uniform(-0.03, 0.03))
        cup_b = self.cup_ratio * b
        large = self.cup_column is not None
        cup_a = cup_b * (rng.uniform(0.85, 1.0) if large else rng.uniform(0.75, 0.95)) * self.disc_squash
        cup = self.ellipse(cup_centre, 2 * cup_b, cup_a / cup_b, angle + math.pi / 2, 0.25 if large else 0.5)
        if cup is not None:
            opacity = rng.uniform(0.7, 0.9)
            if self.cup_column is not None:
                self.paint(
                    self.cup_column, "large cup", *cup, opacity, colour="cup", centre=cup_centre, extent=2 * cup_b
                )
            else:
                self.paint(None, "large cup", *cup, opacity, colour="cup")

    def disc_cover(self, grow: float = 1.0, soft: float = 0.16) -> tuple[Bounds, NDArray[np.float32]] | None:
        a, b = self.disc_axes[0] * self.disc_squash * grow, self.disc_axes[1] * grow
        return self.ellipse(self.disc, 2 * b, a / b, self.axis_angle + math.pi / 2, soft)

    def _path(
        self,
        start: Point,
        heading: float,
        curvature: float,
        decay: float,
        length: float,
        amplitude: float = 0.0,
        wavelength: float = 1.0,
        onset: float = 0.0,
        wander: float = 0.12,
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """A vessel course in the eye frame (DD): heading (radians) turning by ``curvature`` rad/DD that
        fades over ``decay`` DD, a random wander and, for tortuous vessels, a sinusoidal heading swing
        from ``onset`` DD on. Returns points (N, 2), headings and distances along it."""
        count = max(2, math.ceil(length / _STEP_DD))
        arc = np.arange(1, count + 1) * _STEP_DD
        turn = curvature * np.exp(-arc / decay) * _STEP_DD
        turn += self.rng.normal(0.0, wander * math.sqrt(_STEP_DD), count)
        headings = heading + np.cumsum(turn)
        if amplitude > 0:
            ramp = np.clip((arc - onset) / 0.5, 0.0, 1.0)
            headings += amplitude * ramp * np.sin(2 * math.pi * arc / wavelength + self.rng.uniform(0, 2 * math.pi))
        steps = np.stack([np.cos(headings), np.sin(headings)], axis=1) * _STEP_DD
        points = np.vstack([np.asarray(start)[None, :], np.asarray(start)[None, :] + np.cumsum(steps, axis=0)])
        return points, np.concatenate([headings[:1], headings]), np.concatenate([[0.0], arc])

    def _to_pixels(self, points: NDArray[np.float64]) -> NDArray[np.float64]:
        e_t, e_s = np.asarray(self.e_t), np.asarray(self.e_s)
        return np.asarray(np.asarray(self.disc) + self.dd * (points[:, :1] * e_t + points[:, 1:2] * e_s), np.float64)

    def grow_vessels(self) -> None:
        """The vessel tree: four arcades of an artery and a vein each, branches, macular twigs.

        Temporal arcades leave the disc upwards (downwards) and curve round the macula; vein calibre at
        the disc is about 1/10 DD, arteries two thirds of that; vessels taper with distance.
        """
        rng, dd = self.rng, self.dd
        calibre = rng.uniform(0.085, 0.105) * dd
        fovea = self.ts(self.fovea, self.disc)
        for quadrant in ("ST", "IT", "SN", "IN"):
            sign = 1.0 if quadrant[0] == "S" else -1.0
            temporal = quadrant[1] == "T"
            for vein in (True, False):
                key = quadrant + ("v" if vein else "a")
                if temporal:
                    heading, curvature, decay, length = (
                        sign * rng.uniform(70, 95),
                        -sign * rng.uniform(26, 36),
                        2.5,
                        7.5,
                    )
                else:
                    heading, curvature, decay, length = sign * rng.uniform(115, 150), rng.uniform(-6, 6), 3.0, 5.0
                width = calibre * (self.vein_calibre if vein else rng.uniform(0.62, 0.75) * self.artery_calibre)
                width *= 1.0 if temporal else 0.75
                amplitude, wavelength = self.tortuous.get(key, (rng.uniform(0.0, 0.1), rng.uniform(0.6, 1.2)))
                onset, widen = 0.0, 1.0
                if vein:
                    amplitude = max(amplitude, self.vein_tortuosity)
                    if self.brvo is not None and self.brvo[0] == quadrant:
                        onset, widen = self.brvo[1], rng.uniform(1.3, 1.7)
                        amplitude = max(amplitude, rng.uniform(0.25, 0.45))
                start = (rng.uniform(-0.08, 0.02), sign * rng.uniform(0.02, 0.12))
                points, headings, arc = self._path(
                    start, math.radians(heading), math.radians(curvature), decay, length, amplitude, wavelength, onset
                )
                widths = width * np.clip(1.0 - 0.55 * arc / length, 0.3, 1.0)
                widths *= 1.0 + (widen - 1.0) * np.clip((arc - onset) / 0.3, 0.0, 1.0) * (onset > 0)
                tortuous = key in self.tortuous
                self.vessels.append(_Vessel(key, vein, self._to_pixels(points), widths, tortuous))
                for _ in range(int(rng.integers(3, 6) if temporal else rng.integers(1, 4))):
                    i = int(rng.integers(int(0.12 * len(arc)), int(0.8 * len(arc))))
                    branch_heading = headings[i] + rng.choice((-1.0, 1.0)) * math.radians(rng.uniform(30, 65))
                    branch, _, branch_arc = self._path(
                        tuple(points[i]),
                        branch_heading,
                        math.radians(rng.uniform(-25, 25)),
                        10.0,
                        rng.uniform(1.0, 3.0),
                        0.8 * amplitude if tortuous else rng.uniform(0, 0.1),
                        wavelength,
                        wander=0.3,
                    )
                    branch_widths = widths[i] * rng.uniform(0.5, 0.7) * np.clip(1 - 0.6 * branch_arc / 3, 0.3, 1)
                    self.vessels.append(_Vessel("", vein, self._to_pixels(branch), branch_widths, tortuous))
                if temporal:  # twigs towards the fovea, ending at the edge of the avascular zone
                    for _ in range(int(rng.integers(1, 3))):
                        i = int(rng.integers(round(1.2 / _STEP_DD), round(3.2 / _STEP_DD)))
                        dt, ds = fovea[0] - points[i][0], fovea[1] - points[i][1]
                        reach = math.hypot(dt, ds) - rng.uniform(0.45, 0.75)
                        if reach > 0.3:
                            twig, _, _ = self._path(
                                tuple(points[i]), math.atan2(ds, dt) + rng.normal(0, 0.2), 0.0, 10.0, reach, wander=0.45
                            )
                            self.vessels.append(
                                _Vessel("", vein, self._to_pixels(twig), np.full(len(twig), widths[i] * 0.38), False)
                            )
        for _ in range(int(rng.integers(2, 5))):  # small radial vessels on the nasal side
            twig, _, _ = self._path(
                (0.0, 0.0), math.radians(rng.uniform(150, 210)), 0.0, 10.0, rng.uniform(1.5, 3.0), wander=0.35
            )
            vein = bool(rng.integers(2))
            self.vessels.append(_Vessel("", vein, self._to_pixels(twig), np.full(len(twig), calibre * 0.32), False))

    def draw_vessels(self) -> None:
        """Draws the tree (veins darker and wider than arteries), their light reflexes, and the TV mask."""
        rng = self.rng
        veins = np.zeros((self.height, self.width), np.uint8)
        arteries = np.zeros_like(veins)
        reflex = np.zeros_like(veins)
        tortuous = np.zeros_like(veins) if self.tv_column is not None else None
        reflex_artery, reflex_vein = rng.uniform() < 0.8, rng.uniform() < 0.4
        operations: list[tuple[int, bool, bool, NDArray[np.int32], int, bool]] = []
        for vessel in self.vessels:
            for start in range(0, len(vessel.points) - 1, 5):
                segment = vessel.points[start : start + 6]
                width = 0.5 * float(vessel.widths[start] + vessel.widths[min(start + 5, len(vessel.widths) - 1)])
                alpha = 255 if width >= 1 else max(60, round(255 * width))
                shine = (reflex_vein if vessel.vein else reflex_artery) and width >= 3
                fixed = np.round(segment * _ONE).astype(np.int32)
                operations.append((alpha, vessel.vein, vessel.tortuous, fixed, max(1, round(width)), shine))
        # An anti-aliased line overwrites what is under it: faint (thin) vessels first.
        operations.sort(key=lambda op: op[0])
        for alpha, vein, is_tortuous, fixed, thickness, shine in operations:
            cv2.polylines(veins if vein else arteries, [fixed], False, alpha, thickness, cv2.LINE_AA, _SHIFT)
            if tortuous is not None and is_tortuous:
                cv2.polylines(tortuous, [fixed], False, 255, thickness, cv2.LINE_AA, _SHIFT)
            if shine:
                cv2.polylines(reflex, [fixed], False, 255, max(1, round(0.25 * thickness)), cv2.LINE_AA, _SHIFT)
        sigma = max(0.4, 0.006 * self.dd)
        full = (0, 0, self.width, self.height)
        for layer, colour in ((veins, "vein"), (arteries, "artery")):
            self.blend_layer(cv2.GaussianBlur(layer, (0, 0), sigma), colour)
        if reflex.any():
            self.blend_layer(cv2.GaussianBlur(reflex, (0, 0), sigma), "sheen", rng.uniform(0.05, 0.15))
        if tortuous is not None and self.tv_column is not None:
            self.mark(self.tv_column, full, tortuous >= 128, claim=False)
            for vessel in self.vessels:
                if vessel.key in self.tortuous:
                    shown = [tuple(p) for p in vessel.points if self.inside((float(p[0]), float(p[1])), 0.0)]
                    if len(shown) >= 2:
                        middle = shown[len(shown) // 2]
                        extent = max(len(shown) * _STEP_DD * self.dd, self.dd)
                        self.record(self.tv_column, "tortuous vessel", (float(middle[0]), float(middle[1])), extent)

    def swell_disc(self, column: str, kind: str, colour: str, sector: float | None = None) -> None:
        """A swollen disc: margin blurred (vessels obscured at it), tinted; ``sector`` +1/-1 swells only
        the superior/inferior half (AION)."""
        rng = self.rng
        outer = rng.uniform(0.65, 0.9) * self.dd  # radius of the swollen area
        shape = self.ellipse(self.disc, 2 * outer, rng.uniform(0.9, 1.0), self.axis_angle + math.pi / 2, 0.35)
        if shape is None:
            return
        box, cover = shape
        if sector is not None:
            cover = cover * np.clip(sector * self.s_map(box, self.disc) / 0.12 + 0.5, 0.0, 1.0)
        x0, y0, x1, y1 = box
        patch = self.rgb[y0:y1, x0:x1]
        blurred = cv2.GaussianBlur(patch, (0, 0), 0.07 * self.dd)
        weight = (cover * rng.uniform(0.75, 0.95))[..., None]
        patch += weight * (blurred - patch)
        centre = self.disc if sector is None else self.at(self.disc, 0.0, sector * 0.3)
        self.paint(column, kind, box, cover, rng.uniform(0.25, 0.45), colour=colour, centre=centre, extent=2 * outer)

    def crescent(self, column: str, direction: tuple[float, float], width: float) -> None:
        """Peripapillary atrophy: a pale crescent ``width`` DD wide on the ``direction`` (t, s) side of the
        disc, with a pigmented outer border; the disc is drawn over its inner edge afterwards."""
        rng = self.rng
        a, b = self.disc_axes[0] * self.disc_squash, self.disc_axes[1]
        centre = self.at(self.disc, direction[0] * width / 2, direction[1] * width / 2)
        extent = 2 * max(a + width * self.dd / 2, b * 1.04)
        outer_a, outer_b = a + width * self.dd / 2, b * 1.04
        box = self.bounds(centre, extent / 2 + 2)
        if box is None:
            return
        xs, ys = self.grid(box)
        angle = math.atan2(
            direction[0] * self.e_t[1] + direction[1] * self.e_s[1],
            direction[0] * self.e_t[0] + direction[1] * self.e_s[0],
        )
        outer = _ellipse_cover(xs, ys, centre, outer_a, outer_b, angle, 0.5)
        disc = _ellipse_cover(xs, ys, self.disc, b, a, self.axis_angle + math.pi / 2, 0.5)
        cover = np.clip(outer - disc, 0.0, 1.0)
        self.paint(column, "peripapillary atrophy", box, cover, rng.uniform(0.55, 0.85), centre=centre, extent=extent)
        inner = _ellipse_cover(xs, ys, centre, outer_a - 0.08 * self.dd, outer_b - 0.05 * self.dd, angle, 0.5)
        border = np.clip(outer - inner, 0.0, 1.0) * (1.0 - disc)
        self.paint(column, "peripapillary atrophy", box, border, rng.uniform(0.3, 0.6), colour="pigment")

    def acquire(self) -> NDArray[np.uint8]:
        """The camera: uneven illumination, exposure, white balance, dust, mild defocus, noise, the FOV
        (clipped, notched), gamma and a JPEG round trip at quality 60-95."""
        rng, dd = self.rng, self.dd
        lw = 64
        lh = max(2, round(lw * self.height / self.width))
        xs = ((np.arange(lw, dtype=np.float32) + 0.5) * (self.width / lw) - self.centre[0]) / np.float32(self.radius)
        ys = ((np.arange(lh, dtype=np.float32) + 0.5) * (self.height / lh) - self.centre[1]) / np.float32(self.radius)
        off = rng.normal(0.0, 0.15, 2)
        distance = np.sqrt((xs[None, :] - off[0]) ** 2 + (ys[:, None] - off[1]) ** 2)
        light = 1.0 - rng.uniform(0.15, 0.45) * np.clip(distance, 0, 1.6) ** rng.uniform(2.0, 3.2)
        direction = rng.uniform(0, 2 * math.pi)
        light *= 1.0 + rng.uniform(0.0, 0.22) * (xs[None, :] * math.cos(direction) + ys[:, None] * math.sin(direction))
        if rng.uniform() < 0.25:  # flash hot spot
            light += rng.uniform(0.05, 0.15) * np.exp(-(distance**2) / 0.15)
        gains = math.exp(rng.normal(0.0, 0.18)) * np.array(
            [rng.uniform(0.92, 1.06), rng.uniform(0.9, 1.1), rng.uniform(0.8, 1.2)], np.float32
        )
        light_full = cv2.resize(light.astype(np.float32), (self.width, self.height), interpolation=cv2.INTER_LINEAR)
        cv2.multiply(self.rgb, cv2.merge([light_full * np.float32(g) for g in gains]), dst=self.rgb)
        for _ in range(int(rng.choice((0, 0, 1, 2, 3, 5)))):  # dust on the optics: soft grey discs
            spot = self.sample(lambda: self.around(self.centre, 0.0, self.radius / dd), 1.0, None)
            if spot is not None:
                if rng.uniform() < 0.25:
                    self.spot(
                        None,
                        "druse",
                        spot,
                        rng.uniform(0.05, 0.12) * dd,
                        opacity=rng.uniform(0.15, 0.35),
                        soft=0.8,
                        colour="sheen",
                    )
                else:
                    self.spot(
                        None,
                        "druse",
                        spot,
                        rng.uniform(0.1, 0.3) * dd,
                        opacity=rng.uniform(0.1, 0.25),
                        soft=0.9,
                        colour="pigment",
                    )
        sigma = dd * (rng.uniform(0.002, 0.012) if rng.uniform() < 0.75 else rng.uniform(0.012, 0.02))
        if sigma > 0.3:
            self.rgb = np.asarray(cv2.GaussianBlur(self.rgb, (0, 0), sigma), np.float32)
        # Sensor noise, drawn at half resolution: demosaicing and JPEG correlate neighbouring pixels anyway.
        half = rng.standard_normal(((self.height + 1) // 2, (self.width + 1) // 2), dtype=np.float32)
        grain = cv2.resize(
            half * np.float32(rng.uniform(1.0, 3.5)), (self.width, self.height), interpolation=cv2.INTER_LINEAR
        )
        cv2.add(self.rgb, cv2.merge([grain, grain, grain]), dst=self.rgb)
        if rng.uniform() < 0.2:  # a bright halo at the edge of the field, as some cameras show
            radial = np.sqrt((xs[None, :]) ** 2 + (ys[:, None]) ** 2)
            halo = np.exp(-(((1.0 - radial) / 0.05) ** 2)) * np.clip(
                xs[None, :] * math.cos(direction) + ys[:, None] * math.sin(direction), 0, 1
            )
            halo_full = cv2.resize(halo.astype(np.float32), (self.width, self.height), interpolation=cv2.INTER_LINEAR)
            self.rgb += (halo_full * rng.uniform(10, 35))[..., None]
        cv2.multiply(self.rgb, cv2.merge([self.fov, self.fov, self.fov]), dst=self.rgb)
        image = np.clip(self.rgb, 0, 255, out=self.rgb).astype(np.uint8)
        gamma = rng.uniform(0.8, 1.25)
        lut = np.round(255.0 * (np.arange(256) / 255.0) ** (1.0 / gamma)).astype(np.uint8)
        image = np.asarray(cv2.LUT(image, lut), np.uint8)
        quality = int(rng.integers(60, 96))
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("OpenCV could not encode a JPEG")
        decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
        if decoded is None:
            raise RuntimeError("OpenCV could not decode its own JPEG")
        return np.asarray(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB), dtype=np.uint8)


_STEP_DD: Final = 0.08  # vessel courses are traced in steps of 0.08 DD


# --- hard mode: what each condition draws ----------------------------------------------------------------


def _haemorrhage(
    scene: _Scene, column: str, kind: str, where: Callable[[], Point], accept: Callable[[Point], bool] | None = None
) -> None:
    """One intraretinal haemorrhage: a microaneurysm, a dot-blot or a flame along the nerve fibres."""
    rng = scene.rng
    extent = scene.size(kind)
    point = scene.sample(where, extent / 2, column, accept)
    if point is None:
        return
    if kind == "flame haemorrhage":
        scene.spot(
            column,
            kind,
            point,
            extent,
            opacity=rng.uniform(0.55, 0.92),
            aspect=rng.uniform(0.25, 0.45),
            angle=scene.nfl_angle(point) + rng.normal(0, 0.15),
            soft=0.5,
            texture=0.35,
            texture_cell=0.05,
        )
    elif kind == "dot-blot haemorrhage":
        scene.spot(
            column,
            kind,
            point,
            extent,
            opacity=rng.uniform(0.55, 0.92),
            aspect=rng.uniform(0.65, 1.0),
            angle=rng.uniform(0, math.pi),
            soft=0.35,
            wobble=0.12,
        )
    else:
        scene.spot(column, kind, point, extent, opacity=rng.uniform(0.55, 0.9), aspect=rng.uniform(0.85, 1.0), soft=0.4)


def _haemorrhages(
    scene: _Scene,
    column: str,
    count: int,
    where: Callable[[], Point],
    flame_share: float,
    accept: Callable[[Point], bool] | None = None,
) -> None:
    for _ in range(count):
        draw = scene.rng.uniform()
        kind = "flame haemorrhage" if draw < flame_share else "dot-blot haemorrhage" if draw < 0.92 else "microaneurysm"
        _haemorrhage(scene, column, kind, where, accept)


def _cotton_wool(
    scene: _Scene, column: str, where: Callable[[], Point], accept: Callable[[Point], bool] | None = None
) -> None:
    """A cotton-wool spot: white, fluffy, elongated along the nerve fibres."""
    rng = scene.rng
    extent = scene.size("cotton-wool spot")
    point = scene.sample(where, extent / 2, column, accept)
    if point is not None:
        scene.spot(
            column,
            "cotton-wool spot",
            point,
            extent,
            opacity=rng.uniform(0.35, 0.65),
            aspect=rng.uniform(0.5, 0.85),
            angle=scene.nfl_angle(point),
            soft=0.7,
            wobble=0.2,
            texture=0.4,
            texture_cell=0.06,
        )


def _exudate(scene: _Scene, column: str, point: Point, aspect: float = 1.0, angle: float | None = None) -> None:
    rng = scene.rng
    extent = scene.size("hard exudate")
    spot = scene.sample(lambda: point, extent / 2, column, tries=1)
    if spot is not None:
        scene.spot(
            column,
            "hard exudate",
            spot,
            extent,
            opacity=rng.uniform(0.45, 0.85),
            aspect=aspect * rng.uniform(0.7, 1.0),
            angle=rng.uniform(0, math.pi) if angle is None else angle,
            soft=0.25,
            wobble=0.15,
        )


def _exudates(scene: _Scene, column: str, where: Callable[[], Point], style: str) -> None:
    """A group of hard exudates: a cluster, a circinate ring, or a (partial) macular star."""
    rng = scene.rng
    if style == "star":
        for _ in range(int(rng.integers(10, 31))):
            distance, angle = rng.uniform(0.25, 1.1), math.pi + rng.normal(0, 0.9)
            point = scene.polar(scene.fovea, distance, angle)
            radial = math.atan2(point[1] - scene.fovea[1], point[0] - scene.fovea[0])
            _exudate(scene, column, point, aspect=rng.uniform(0.35, 0.6), angle=radial)
        return
    centre = scene.sample(where, 0.4 * scene.dd, None)
    if centre is None:
        return
    if style == "ring":
        radius, count = rng.uniform(0.3, 0.7), int(rng.integers(8, 26))
        for i in range(count):
            angle = 2 * math.pi * i / count + rng.normal(0, 0.15)
            _exudate(scene, column, scene.polar(centre, radius * (1 + rng.normal(0, 0.12)), angle))
    else:
        for _ in range(int(rng.integers(3, 15))):
            _exudate(scene, column, scene.at(centre, rng.normal(0, 0.2), rng.normal(0, 0.2)))


def _constant(point: Point) -> Point:
    return point


def _away_from_disc(scene: _Scene, distance: float = 0.9) -> Callable[[Point], bool]:
    return lambda p: math.dist(p, scene.disc) > distance * scene.dd


def _dr(scene: _Scene, column: str, phase: Phase) -> None:
    """Diabetic retinopathy: 3-30 microaneurysms and dot-blot haemorrhages at the posterior pole, maybe
    flame haemorrhages, clusters or rings of hard exudates, cotton-wool spots by the arcades."""
    if phase != "superficial":
        return
    rng = scene.rng
    pole = lambda: scene.around(scene.fovea, 0.35, 3.3)  # noqa: E731
    off_disc = _away_from_disc(scene)
    for _ in range(int(rng.integers(3, 31))):
        kind = "microaneurysm" if rng.uniform() < 0.6 else "dot-blot haemorrhage"
        _haemorrhage(scene, column, kind, pole, off_disc)
    if rng.uniform() < 0.3:
        _haemorrhages(scene, column, int(rng.integers(1, 4)), scene.near_arcade, 1.0, off_disc)
    if rng.uniform() < 0.5:
        for _ in range(int(rng.integers(1, 4))):
            _exudates(
                scene,
                column,
                lambda: scene.around(scene.fovea, 0.5, 2.5),
                "ring" if rng.uniform() < 0.35 else "cluster",
            )
    if rng.uniform() < 0.3:
        for _ in range(int(rng.integers(1, 4))):
            _cotton_wool(scene, column, scene.near_arcade, off_disc)


def _quadrant(scene: _Scene, point: Point) -> tuple[int, int]:
    """Temporal (+1) or nasal (-1), superior (+1) or inferior (-1) of the disc, about the disc-fovea line."""
    t, s = scene.ts(point, scene.disc)
    return (1 if t > 0 else -1), (1 if s > 0 else -1)


def _brvo(scene: _Scene, column: str, phase: Phase) -> None:
    """Branch retinal vein occlusion: one temporal branch vein dilated and tortuous beyond an arteriovenous
    crossing 1.3-2.4 DD from the disc; 10-40 flame and blot haemorrhages and a few cotton-wool spots in
    the quadrant it drains, never beyond the horizontal raphe."""
    rng = scene.rng
    if phase == "setup":
        scene.brvo = ("ST" if rng.uniform() < 0.65 else "IT", rng.uniform(1.3, 2.4))
        return
    if phase != "superficial" or scene.brvo is None:
        return
    quadrant, occlusion = scene.brvo
    sign = 1.0 if quadrant[0] == "S" else -1.0

    def in_sector(point: Point) -> bool:
        t, s = scene.ts(point, scene.disc)
        return t > 0.35 and sign * s > 0.25

    def drained() -> Point:
        return scene.along(quadrant + "v", occlusion, 6.5, rng.uniform(0.2, 0.9))

    _haemorrhages(scene, column, int(rng.integers(15, 61)), drained, 0.7, in_sector)
    if rng.uniform() < 0.6:
        for _ in range(int(rng.integers(1, 5))):
            _cotton_wool(scene, column, drained, in_sector)


def _crvo(scene: _Scene, column: str, phase: Phase) -> None:
    """Central retinal vein occlusion: dilated tortuous veins, flame haemorrhages round the disc and blots
    further out in all four quadrants (20-80), cotton-wool spots, a swollen disc."""
    rng = scene.rng
    if phase == "setup":
        scene.vein_calibre *= rng.uniform(1.3, 1.6)
        scene.vein_tortuosity = rng.uniform(0.2, 0.4)
    elif phase == "superficial":
        total = int(rng.integers(20, 81))
        for sign_t in (1, -1):
            for sign_s in (1, -1):

                def where(st: int = sign_t, ss: int = sign_s) -> Point:
                    angle = math.radians(rng.uniform(10, 80))
                    distance = rng.uniform(0.75, 3.6 if st > 0 else 2.4)
                    return scene.at(scene.disc, st * distance * math.cos(angle), ss * distance * math.sin(angle))

                def accept(point: Point, st: int = sign_t, ss: int = sign_s) -> bool:
                    return _quadrant(scene, point) == (st, ss)

                for _ in range(max(3, total // 4 + int(rng.integers(-2, 3)))):
                    near = rng.uniform() < 0.5
                    kind = "flame haemorrhage" if rng.uniform() < (0.7 if near else 0.35) else "dot-blot haemorrhage"
                    _haemorrhage(scene, column, kind, where, accept)
        if rng.uniform() < 0.7:
            for _ in range(int(rng.integers(1, 7))):
                _cotton_wool(scene, column, lambda: scene.around(scene.disc, 0.8, 2.5))
    elif phase == "swelling":
        scene.swell_disc(column, "swollen disc", "oedema")


def _rs(scene: _Scene, column: str, phase: Phase) -> None:
    """Retinitis: a white fluffy necrotic patch (1-3 DD, granular irregular edge) by an arcade or in the
    mid-periphery, with intraretinal haemorrhages in and at it."""
    if phase != "superficial":
        return
    rng = scene.rng
    for _ in range(1 if rng.uniform() < 0.8 else 2):
        extent = scene.size("retinitis patch")
        where = scene.near_arcade if rng.uniform() < 0.6 else (lambda: scene.around(scene.fovea, 1.5, 3.5))
        centre = scene.sample(where, extent / 2, column, _away_from_disc(scene, 0.5 + extent / scene.dd / 2))
        if centre is None:
            continue
        scene.spot(
            column,
            "retinitis patch",
            centre,
            extent,
            opacity=rng.uniform(0.45, 0.75),
            aspect=rng.uniform(0.6, 0.9),
            angle=rng.uniform(0, math.pi),
            soft=0.5,
            wobble=0.25,
            texture=0.5,
            texture_cell=0.07,
        )

        def inside(c: Point = centre, spread: float = extent / scene.dd / 4) -> Point:
            return scene.at(c, rng.normal(0, spread), rng.normal(0, spread))

        def near(point: Point, c: Point = centre, e: float = extent) -> bool:
            return math.dist(point, c) < 0.3 * e

        _haemorrhages(scene, column, int(rng.integers(3, 13)), inside, 0.4, near)


def _armd(scene: _Scene, column: str, phase: Phase) -> None:
    """Age-related macular degeneration: soft drusen clustered and confluent at the macula, pigment
    clumps, and sometimes geographic atrophy or a neovascular membrane with subretinal blood."""
    if phase != "deep":
        return
    rng = scene.rng
    draw = rng.uniform()
    if draw < 0.35:
        extent = scene.size("geographic atrophy", high=1.6)
        centre = scene.at(scene.fovea, rng.normal(0, 0.2), rng.normal(0, 0.2))
        scene.spot(
            column,
            "geographic atrophy",
            centre,
            extent,
            opacity=rng.uniform(0.35, 0.6),
            aspect=rng.uniform(0.65, 1.0),
            angle=rng.uniform(0, math.pi),
            soft=0.3,
            wobble=0.25,
            texture=0.3,
        )
    elif draw < 0.6:
        centre = scene.at(scene.fovea, rng.normal(0, 0.15), rng.normal(0, 0.15))
        blood = scene.size("subretinal haemorrhage")
        scene.spot(
            column,
            "subretinal haemorrhage",
            scene.at(centre, rng.normal(0, 0.15), rng.normal(0, 0.15)),
            blood,
            opacity=rng.uniform(0.45, 0.75),
            aspect=rng.uniform(0.6, 0.9),
            angle=rng.uniform(0, math.pi),
            soft=0.3,
            wobble=0.25,
        )
        scene.spot(
            column,
            "choroidal neovascular membrane",
            centre,
            scene.size("choroidal neovascular membrane"),
            opacity=rng.uniform(0.3, 0.5),
            aspect=rng.uniform(0.7, 1.0),
            soft=0.4,
            wobble=0.2,
        )
    centres = [scene.at(scene.fovea, rng.normal(0, 0.35), rng.normal(0, 0.35)) for _ in range(int(rng.integers(1, 4)))]
    for _ in range(int(rng.integers(5, 26))):
        base = centres[int(rng.integers(len(centres)))]
        extent = scene.size("soft druse")
        point = scene.sample(partial(scene.jitter, base, 0.3), extent / 2, column)
        if point is not None:
            scene.spot(
                column,
                "soft druse",
                point,
                extent,
                opacity=rng.uniform(0.3, 0.6),
                aspect=rng.uniform(0.7, 1.0),
                angle=rng.uniform(0, math.pi),
                soft=0.6,
                wobble=0.1,
            )
    for _ in range(int(rng.integers(2, 9))):
        extent = scene.size("pigment clump")
        point = scene.sample(lambda: scene.around(scene.fovea, 0.0, 1.2), extent / 2, column)
        if point is not None:
            scene.spot(
                column,
                "pigment clump",
                point,
                extent,
                opacity=rng.uniform(0.3, 0.65),
                aspect=rng.uniform(0.6, 1.0),
                angle=rng.uniform(0, math.pi),
                soft=0.4,
                wobble=0.2,
            )


def _dn(scene: _Scene, column: str, phase: Phase) -> None:
    """Drusen: 8-40 small discrete yellow deposits (1/25-1/6 DD) scattered round the macula."""
    if phase != "deep":
        return
    rng = scene.rng
    for _ in range(int(rng.integers(8, 41))):
        extent = scene.size("druse")
        point = scene.sample(
            lambda: scene.polar(scene.fovea, 2.2 * rng.uniform() ** 0.7, rng.uniform(0, 2 * math.pi)),
            extent / 2,
            column,
            _away_from_disc(scene),
        )
        if point is not None:
            scene.spot(
                column, "druse", point, extent, opacity=rng.uniform(0.3, 0.65), aspect=rng.uniform(0.8, 1.0), soft=0.35
            )


def _mya(scene: _Scene, column: str, phase: Phase) -> None:
    """Myopia: a paler, tessellated posterior pole, an oval tilted disc and a temporal crescent of
    peripapillary atrophy (0.2-0.7 DD wide) with a pigmented border."""
    rng = scene.rng
    if phase == "setup":
        scene.pigmentation *= 0.5
        scene.disc_squash = rng.uniform(0.72, 0.88)
        rx = rng.uniform(1.6, 3.6)
        centre = scene.at(scene.disc, rng.uniform(0.8, 1.6), rng.uniform(-0.3, 0.3))
        scene.tessellation.append((column, centre, rx, rx * rng.uniform(0.7, 1.0), rng.uniform(0.22, 0.4)))
    elif phase == "deep":
        scene.crescent(column, (1.0, rng.normal(0, 0.15)), rng.uniform(0.2, 0.7))


def _tsln(scene: _Scene, column: str, phase: Phase) -> None:
    """Tessellation: choroidal vessels seen through a thin RPE, dark polygons between orange ribbons, over
    a region of 3-9 DD round the disc or the posterior pole."""
    if phase == "setup":
        rng = scene.rng
        rx = rng.uniform(1.5, 4.4)
        centre = scene.at(scene.fovea, rng.uniform(-2.0, 0.5), rng.uniform(-0.5, 0.5))
        scene.tessellation.append((column, centre, rx, rx * rng.uniform(0.65, 1.0), rng.uniform(0.22, 0.45)))


def _erm(scene: _Scene, column: str, phase: Phase) -> None:
    """Epiretinal membrane: an irregular glistening cellophane sheen (1.5-3 DD) over the macula with fine
    radiating wrinkles."""
    if phase != "superficial":
        return
    rng = scene.rng
    extent = scene.size("epiretinal sheen")
    centre = scene.at(scene.fovea, rng.normal(0, 0.25), rng.normal(0, 0.25))
    aspect = rng.uniform(0.6, 0.95)
    scene.spot(
        column,
        "epiretinal sheen",
        centre,
        extent,
        opacity=rng.uniform(0.07, 0.15),
        aspect=aspect,
        angle=rng.uniform(0, math.pi),
        soft=0.5,
        wobble=0.2,
        texture=0.8,
        texture_cell=0.2,
    )
    reach = 0.3 * extent * aspect
    pull = scene.at(centre, rng.normal(0, 0.05), rng.normal(0, 0.05))
    for _ in range(int(rng.integers(6, 15))):
        angle, start = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.4) * reach
        stop = rng.uniform(0.6, 1.0) * reach
        line = np.array(
            [
                [pull[0] + r * math.cos(angle + 0.1 * r / reach), pull[1] + r * math.sin(angle + 0.1 * r / reach)]
                for r in np.linspace(start, stop, 6)
            ]
        )
        scene.band(
            column,
            "epiretinal sheen",
            line,
            max(1.0, 0.02 * scene.dd),
            opacity=rng.uniform(0.15, 0.3),
            soft=0.4,
            colour="sheen",
            record=False,
            claim=False,
        )


def _ls(scene: _Scene, column: str, phase: Phase) -> None:
    """Laser scars: panretinal photocoagulation, rows of 1/6-1/3 DD burns in the mid-periphery sparing the
    macula and disc (80%), or a grid of 1/10-1/7 DD burns round the macula; each burn a pale centre with
    a pigmented ring, or pigmented, or pale."""
    if phase != "deep":
        return
    rng = scene.rng
    panretinal = rng.uniform() < 0.8
    low, high = (1 / 6, 1 / 3) if panretinal else (1 / 10, 1 / 7)
    spacing = rng.uniform(1.25, 1.6) * (low + high) / 2
    turn = rng.uniform(0, math.pi)
    start = rng.uniform(0, 2 * math.pi)
    span = rng.uniform(math.pi, 2 * math.pi)
    candidates: list[Point] = []
    rows = np.arange(-5.0, 5.0, spacing * 0.866)
    for r, row in enumerate(rows):
        for col in np.arange(-5.0, 5.0, spacing) + (spacing / 2 if r % 2 else 0.0):
            t, s = col * math.cos(turn) - row * math.sin(turn), col * math.sin(turn) + row * math.cos(turn)
            distance, angle = math.hypot(t, s), (math.atan2(s, t) - start) % (2 * math.pi)
            if angle > span:
                continue
            if panretinal and not (
                rng.uniform(2.0, 2.5) <= distance
                and math.dist(scene.at(scene.fovea, t, s), scene.disc) > 1.1 * scene.dd
            ):
                continue
            if not panretinal and not 0.6 <= distance <= 2.0:
                continue
            if rng.uniform() < 0.15:
                continue
            candidates.append(scene.at(scene.fovea, t, s))
    order = rng.permutation(len(candidates))[: int(rng.integers(25, 151) if panretinal else rng.integers(15, 51))]
    style = int(rng.integers(3))
    for i in order:
        extent = rng.uniform(low, high) * scene.dd
        point = scene.sample(partial(_constant, candidates[i]), extent / 2, column, tries=1)
        if point is None:
            continue
        if style == 0:  # pale centre, pigmented ring
            scene.spot(
                column,
                "laser scar",
                point,
                extent,
                opacity=rng.uniform(0.35, 0.6),
                soft=0.3,
                wobble=0.08,
                colour="atrophy",
            )
            shape = scene.ellipse(point, extent, 1.0, 0.0, 0.3)
            if shape is not None:
                box, cover = shape
                xs, ys = scene.grid(box)
                ring = np.clip(
                    cover - _ellipse_cover(xs, ys, point, 0.3 * extent, 0.3 * extent, 0.0, max(0.5, 0.1 * extent)), 0, 1
                )
                scene.paint(column, "laser scar", box, ring, rng.uniform(0.4, 0.75), colour="pigment")
        elif style == 1:
            scene.spot(
                column,
                "laser scar",
                point,
                extent,
                opacity=rng.uniform(0.3, 0.6),
                soft=0.35,
                wobble=0.15,
                texture=0.4,
                texture_cell=0.04,
            )
        else:
            scene.spot(
                column,
                "laser scar",
                point,
                extent,
                opacity=rng.uniform(0.3, 0.5),
                soft=0.35,
                wobble=0.1,
                colour="atrophy",
                texture=0.3,
                texture_cell=0.04,
            )


def _ms(scene: _Scene, column: str, phase: Phase) -> None:
    """Macular scar: a whitish-yellow fibrous disciform scar (1-2.5 DD) at the fovea with pigment clumps."""
    if phase != "deep":
        return
    rng = scene.rng
    extent = scene.size("disciform scar")
    centre = scene.at(scene.fovea, rng.normal(0, 0.15), rng.normal(0, 0.15))
    aspect = rng.uniform(0.65, 1.0)
    scene.spot(
        column,
        "disciform scar",
        centre,
        extent,
        opacity=rng.uniform(0.4, 0.7),
        aspect=aspect,
        angle=rng.uniform(0, math.pi),
        soft=0.45,
        wobble=0.25,
        texture=0.35,
    )
    for _ in range(int(rng.integers(3, 11))):
        reach = 0.3 * extent * aspect / scene.dd
        point = scene.at(centre, rng.uniform(-reach, reach), rng.uniform(-reach, reach))
        scene.spot(
            column,
            "pigment clump",
            point,
            rng.uniform(0.06, 0.15) * scene.dd,
            opacity=rng.uniform(0.35, 0.7),
            soft=0.4,
            wobble=0.2,
            record=False,
            claim=False,
        )


def _serous(scene: _Scene, column: str, centre: Point, extent: float) -> None:
    """A round serous elevation: a slightly greyer, darker disc with a faint bright ring reflex."""
    rng = scene.rng
    scene.spot(
        column,
        "serous detachment",
        centre,
        extent,
        opacity=rng.uniform(0.1, 0.2),
        aspect=rng.uniform(0.85, 1.0),
        angle=rng.uniform(0, math.pi),
        soft=0.15,
    )
    shape = scene.ellipse(centre, extent, 1.0, 0.0, 0.08)
    if shape is not None:
        box, cover = shape
        xs, ys = scene.grid(box)
        inner = 0.45 * extent
        ring = np.clip(cover - _ellipse_cover(xs, ys, centre, inner, inner, 0.0, max(0.5, 0.04 * extent)), 0, 1)
        faint = np.clip(rng.uniform(0.03, 0.09) * (1.0 + 0.7 * scene.noise(box, 0.15)), 0.0, 1.0)
        scene.paint(column, "serous detachment", box, ring, faint, colour="sheen", claim=False)


def _csr(scene: _Scene, column: str, phase: Phase) -> None:
    """Central serous chorioretinopathy: a round serous detachment (1-2.5 DD) at the macula, sometimes
    with yellow subretinal precipitates."""
    if phase != "deep":
        return
    rng = scene.rng
    extent = scene.size("serous detachment")
    centre = scene.at(scene.fovea, rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3))
    _serous(scene, column, centre, extent)
    if rng.uniform() < 0.4:
        for _ in range(int(rng.integers(4, 13))):
            point = scene.polar(centre, rng.uniform(0, 0.3) * extent / scene.dd, rng.uniform(0, 2 * math.pi))
            scene.spot(
                column,
                "druse",
                point,
                rng.uniform(0.03, 0.06) * scene.dd,
                opacity=rng.uniform(0.3, 0.5),
                colour="drusen",
                record=False,
                claim=False,
            )


def _odc(scene: _Scene, column: str, phase: Phase) -> None:
    """Optic disc cupping: a large, deep, vertically oval cup (cup-to-disc ratio 0.65-0.9)."""
    if phase == "setup":
        scene.cup_ratio = scene.rng.uniform(0.65, 0.9)
        scene.cup_column = column


def _tv(scene: _Scene, column: str, phase: Phase) -> None:
    """Tortuous vessels: two to four of the temporal arcade vessels and their branches corkscrew (heading
    swings of 0.45-0.8 rad every 0.45-0.9 DD)."""
    if phase == "setup":
        rng = scene.rng
        keys = ("STv", "STa", "ITv", "ITa")
        for i in rng.permutation(4)[: int(rng.integers(2, 5))]:
            scene.tortuous[keys[i]] = (rng.uniform(0.45, 0.8), rng.uniform(0.45, 0.9))
        scene.tv_column = column


def _ah(scene: _Scene, column: str, phase: Phase) -> None:
    """Asteroid hyalosis: 30-250 small bright yellow-white specks (1/30-1/12 DD) in a vitreous cloud,
    some out of focus."""
    if phase != "vitreous":
        return
    rng = scene.rng
    cloud = scene.at(scene.centre, rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5))
    spread = rng.uniform(0.8, 2.0)
    for _ in range(int(rng.integers(30, 251))):
        extent = scene.size("asteroid body")
        point = scene.sample(lambda: scene.at(cloud, rng.normal(0, spread), rng.normal(0, spread)), extent / 2, None)
        if point is None:
            continue
        blurred = rng.uniform() < 0.3
        scene.spot(
            column,
            "asteroid body",
            point,
            extent,
            opacity=rng.uniform(0.3, 0.5) if blurred else rng.uniform(0.5, 0.9),
            soft=0.8 if blurred else 0.3,
            claim=False,
        )


def _odp(scene: _Scene, column: str, phase: Phase) -> None:
    """Optic disc pallor: the whole rim (or its temporal half) pale white-yellow."""
    if phase != "disc":
        return
    rng = scene.rng
    shape = scene.disc_cover()
    if shape is None:
        return
    box, cover = shape
    centre = scene.disc
    if rng.uniform() < 0.3:
        cover = cover * np.clip(scene.t_map(box, scene.disc) / 0.1 + 0.5, 0.0, 1.0)
        centre = scene.at(scene.disc, 0.25, 0.0)
    extent = 2 * scene.disc_axes[1]
    scene.paint(column, "pale disc", box, cover, rng.uniform(0.5, 0.8), centre=centre, extent=extent)


def _ode(scene: _Scene, column: str, phase: Phase) -> None:
    """Optic disc oedema: a swollen hyperaemic disc with blurred margins over 1.3-1.8 DD, vessels obscured
    at the margin, sometimes peripapillary flame haemorrhages and cotton-wool spots."""
    rng = scene.rng
    if phase == "superficial":
        near = lambda: scene.around(scene.disc, 0.7, 1.2)  # noqa: E731
        _haemorrhages(scene, column, int(rng.integers(0, 5)), near, 1.0)
        if rng.uniform() < 0.3:
            _cotton_wool(scene, column, near)
    elif phase == "swelling":
        scene.swell_disc(column, "swollen disc", "oedema")


def _st(scene: _Scene, column: str, phase: Phase) -> None:
    """Optociliary shunt: a small looping vessel (0.25-0.6 DD) on the disc surface."""
    if phase != "superficial":
        return
    rng = scene.rng
    centre = scene.at(scene.disc, rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15))
    radius = rng.uniform(0.1, 0.22)
    start, sweep = rng.uniform(0, 2 * math.pi), rng.uniform(4.5, 5.8)
    angles = np.linspace(start, start + sweep, 40)
    wiggle = 1.0 + 0.2 * np.sin(3 * angles + rng.uniform(0, 2 * math.pi))
    points = np.array([scene.polar(centre, radius * w, a) for a, w in zip(angles, wiggle, strict=True)])
    scene.band(
        column,
        "optociliary shunt",
        points,
        rng.uniform(0.035, 0.06) * scene.dd,
        opacity=rng.uniform(0.7, 0.95),
        soft=0.5,
        colour="vein",
    )


def _aion(scene: _Scene, column: str, phase: Phase) -> None:
    """Anterior ischaemic optic neuropathy: the superior or inferior half of the disc pale and swollen,
    sometimes with a flame haemorrhage at its margin."""
    rng = scene.rng
    if phase == "setup":
        scene.aion_sector = 1.0 if rng.uniform() < 0.5 else -1.0
    elif phase == "superficial" and rng.uniform() < 0.5:
        sector = scene.aion_sector
        _haemorrhage(
            scene,
            column,
            "flame haemorrhage",
            lambda: scene.at(scene.disc, rng.uniform(-0.3, 0.3), sector * rng.uniform(0.7, 0.95)),
        )
    elif phase == "swelling":
        scene.swell_disc(column, "swollen disc sector", "pallor", sector=scene.aion_sector)


def _pt(scene: _Scene, column: str, phase: Phase) -> None:
    """Parafoveal telangiectasia: a greyish loss of transparency temporal to the fovea (0.5-1.2 DD) with
    right-angled dilated venules, refractile crystals and sometimes a pigment plaque."""
    if phase != "deep":
        return
    rng = scene.rng
    extent = scene.size("telangiectatic zone")
    centre = scene.at(scene.fovea, rng.uniform(0.25, 0.55), rng.uniform(-0.15, 0.15))
    aspect = rng.uniform(0.7, 1.0)
    scene.spot(
        column,
        "telangiectatic zone",
        centre,
        extent,
        opacity=rng.uniform(0.14, 0.26),
        aspect=aspect,
        angle=rng.uniform(0, math.pi),
        soft=0.5,
        wobble=0.15,
    )
    reach = 0.3 * extent * aspect / scene.dd
    for _ in range(int(rng.integers(2, 6))):
        corner = scene.at(centre, rng.uniform(-reach, reach), rng.uniform(-reach, reach))
        a = rng.uniform(0, 2 * math.pi)
        arm = 0.08 * scene.dd
        line = np.array(
            [
                [corner[0] + arm * math.cos(a), corner[1] + arm * math.sin(a)],
                corner,
                [corner[0] + arm * math.cos(a + math.pi / 2), corner[1] + arm * math.sin(a + math.pi / 2)],
            ]
        )
        scene.band(
            column,
            "telangiectatic zone",
            line,
            max(0.8, 0.025 * scene.dd),
            opacity=0.7,
            soft=0.4,
            colour="vein",
            record=False,
            claim=False,
        )
    for _ in range(int(rng.integers(4, 13))):
        point = scene.at(centre, rng.uniform(-reach, reach), rng.uniform(-reach, reach))
        scene.spot(
            column,
            "telangiectatic zone",
            point,
            max(1.0, 0.03 * scene.dd),
            opacity=rng.uniform(0.35, 0.7),
            soft=0.3,
            colour="sheen",
            record=False,
            claim=False,
        )
    if rng.uniform() < 0.35:
        scene.spot(
            column,
            "pigment clump",
            scene.at(centre, rng.uniform(-reach, reach) / 2, 0.0),
            0.12 * scene.dd,
            opacity=rng.uniform(0.4, 0.7),
            wobble=0.2,
            record=False,
            claim=False,
        )


def _rt(scene: _Scene, column: str, phase: Phase) -> None:
    """Retinal traction: a greyish-white fibrovascular membrane (0.3-0.7 DD wide, 1.5-3.5 DD long) along a
    temporal arcade from near the disc, with fine folds across it."""
    if phase != "superficial":
        return
    rng = scene.rng
    key = ("STv", "ITv")[int(rng.integers(2))]
    vessel = scene.main(key)
    first = round(rng.uniform(0.4, 1.0) / _STEP_DD)
    last = min(len(vessel.points) - 1, first + round(rng.uniform(1.5, 3.5) / _STEP_DD))
    points = vessel.points[first : last + 1]
    width = rng.uniform(0.3, 0.7) * scene.dd
    scene.band(
        column,
        "traction membrane",
        points,
        width,
        opacity=rng.uniform(0.3, 0.55),
        soft=0.12 * scene.dd,
        texture=0.4,
        colour="fibrosis",
    )
    for _ in range(int(rng.integers(4, 11))):
        i = int(rng.integers(1, len(points) - 1))
        step = points[i + 1] - points[i - 1]
        normal = np.array([-step[1], step[0]]) / (float(np.hypot(*step)) or 1.0)
        fold = np.array([points[i] - normal * width * 0.4, points[i] + normal * width * 0.4])
        scene.band(
            column,
            "traction membrane",
            fold,
            max(1.0, 0.02 * scene.dd),
            opacity=rng.uniform(0.15, 0.3),
            soft=0.4,
            colour="sheen",
            record=False,
            claim=False,
        )


def _crs(scene: _Scene, column: str, phase: Phase) -> None:
    """Chorioretinitis: one to four healed punched-out scars (0.5-2 DD), white-yellow bare sclera with a
    heavy black pigmented border and clumps, at the posterior pole or in the mid-periphery."""
    if phase != "deep":
        return
    rng = scene.rng
    for _ in range(int(rng.choice(4, p=(0.5, 0.25, 0.15, 0.1))) + 1):
        extent = scene.size("chorioretinal scar")
        where = (
            (lambda: scene.around(scene.fovea, 0.0, 1.5))
            if rng.uniform() < 0.5
            else (lambda: scene.around(scene.fovea, 1.5, 3.4))
        )
        centre = scene.sample(where, extent / 2, column, _away_from_disc(scene, 0.6 + extent / scene.dd / 2))
        if centre is None:
            continue
        harmonics = scene.harmonics(0.2)
        aspect, angle = rng.uniform(0.65, 1.0), rng.uniform(0, math.pi)
        outer = scene.ellipse(centre, extent, aspect, angle, 0.3, harmonics)
        if outer is None:
            continue
        box, cover = outer
        scene.paint(column, "chorioretinal scar", box, cover, rng.uniform(0.4, 0.65), centre=centre, extent=extent)
        xs, ys = scene.grid(box)
        a = extent / 2 / _reach(harmonics, aspect)
        inner = _ellipse_cover(xs, ys, centre, 0.72 * a, 0.72 * a * aspect, angle, max(0.5, 0.1 * a), harmonics)
        clumps = np.clip(1.0 + 0.8 * scene.noise(box, 0.08), 0.0, 1.5)
        scene.paint(
            column,
            "chorioretinal scar",
            box,
            np.clip(cover - inner, 0, 1) * clumps,
            rng.uniform(0.45, 0.75),
            colour="pigment",
        )


def _edn(scene: _Scene, column: str, phase: Phase) -> None:
    """Exudation: hard exudates (yellow, as in DR) in one to three groups: circinate rings round a leak,
    a partial macular star, or clusters."""
    if phase != "superficial":
        return
    rng = scene.rng
    for _ in range(int(rng.integers(1, 4))):
        style = str(rng.choice(("ring", "star", "cluster"), p=(0.45, 0.25, 0.3)))
        _exudates(scene, column, lambda: scene.around(scene.fovea, 0.8, 3.0), style)


def _rpec(scene: _Scene, column: str, phase: Phase) -> None:
    """RPE changes: a mottled region (1-3 DD) of fine granular hyper- and hypopigmentation at the macula or
    the posterior pole."""
    if phase != "deep":
        return
    rng = scene.rng
    extent = scene.size("rpe mottling")
    if rng.uniform() < 0.6:
        centre = scene.at(scene.fovea, rng.normal(0, 0.3), rng.normal(0, 0.3))
    else:
        centre = (
            scene.sample(
                lambda: scene.around(scene.fovea, 1.2, 3.0),
                extent / 2,
                column,
                _away_from_disc(scene, 0.5 + extent / scene.dd / 2),
            )
            or scene.fovea
        )
    shape = scene.ellipse(centre, extent, rng.uniform(0.65, 1.0), rng.uniform(0, math.pi), 0.8, scene.harmonics(0.2))
    if shape is None:
        return
    box, cover = shape
    grain = scene.noise(box, 0.035)
    dark = np.clip((grain - 0.2) * 1.5, 0.0, 1.0) * rng.uniform(0.2, 0.4)
    pale = np.clip((-grain - 0.2) * 1.5, 0.0, 1.0) * rng.uniform(0.12, 0.25)
    scene.paint(column, "rpe mottling", box, cover, dark, centre=centre, extent=extent)
    scene.paint(column, "rpe mottling", box, cover, pale, colour="atrophy")


def _mhl(scene: _Scene, column: str, phase: Phase) -> None:
    """Macular hole: a round dark-red hole of 1/4-1/3 DD exactly at the fovea with a yellowish rim and
    yellow dots at its base."""
    if phase != "superficial":
        return
    rng = scene.rng
    extent = scene.size("macular hole")
    centre = scene.fovea
    scene.spot(column, "macular hole", centre, 0.84 * extent, opacity=rng.uniform(0.55, 0.8), soft=0.2, record=False)
    shape = scene.ellipse(centre, extent, 1.0, 0.0, 0.12)
    if shape is not None:
        box, cover = shape
        xs, ys = scene.grid(box)
        inner = 0.42 * extent
        rim = np.clip(cover - _ellipse_cover(xs, ys, centre, inner, inner, 0.0, max(0.5, 0.05 * extent)), 0, 1)
        scene.paint(
            column, "macular hole", box, rim, rng.uniform(0.25, 0.45), colour="exudate", centre=centre, extent=extent
        )
    for _ in range(int(rng.integers(2, 6))):
        point = scene.polar(centre, rng.uniform(0, 0.25) * extent / scene.dd, rng.uniform(0, 2 * math.pi))
        scene.spot(
            column,
            "macular hole",
            point,
            max(1.0, 0.03 * scene.dd),
            opacity=rng.uniform(0.3, 0.6),
            colour="drusen",
            record=False,
            claim=False,
        )


def _rp(scene: _Scene, column: str, phase: Phase) -> None:
    """Retinitis pigmentosa: 20-150 black bone-spicule clumps in the mid-periphery sparing the macula,
    attenuated arteries and veins, a waxy pale disc."""
    rng = scene.rng
    if phase == "setup":
        scene.artery_calibre *= rng.uniform(0.45, 0.6)
        scene.vein_calibre *= rng.uniform(0.65, 0.8)
    elif phase == "deep":
        for _ in range(int(rng.integers(20, 151))):
            extent = scene.size("bone spicule")
            point = scene.sample(
                lambda: scene.around(scene.fovea, 2.3, 4.6), extent / 2, column, _away_from_disc(scene, 1.0)
            )
            if point is not None:
                _spicule(scene, column, point, extent)
    elif phase == "disc":
        shape = scene.disc_cover()
        if shape is not None:
            scene.paint(
                column,
                "waxy disc",
                *shape,
                rng.uniform(0.45, 0.7),
                colour="waxy",
                centre=scene.disc,
                extent=2 * scene.disc_axes[1],
            )


def _spicule(scene: _Scene, column: str, centre: Point, extent: float) -> None:
    """A bone spicule: three to five thin branching pigment strands from a centre."""
    rng = scene.rng
    box = scene.bounds(centre, extent / 2 + 2)
    if box is None:
        return
    x0, y0, x1, y1 = box
    canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
    thickness = max(1, round(0.03 * scene.dd))
    for _ in range(int(rng.integers(3, 6))):
        angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.5, 1.0) * (extent / 2 - thickness / 2)
        end = (centre[0] + length * math.cos(angle), centre[1] + length * math.sin(angle))
        cv2.line(
            canvas,
            _point(centre[0] - x0, centre[1] - y0),
            _point(end[0] - x0, end[1] - y0),
            255,
            thickness,
            cv2.LINE_AA,
            _SHIFT,
        )
    cover = cv2.GaussianBlur(canvas, (0, 0), max(0.4, 0.01 * scene.dd)).astype(np.float32) / 255.0
    scene.paint(column, "bone spicule", box, cover, rng.uniform(0.45, 0.85), centre=centre, extent=extent)


def _mh(scene: _Scene, column: str, phase: Phase) -> None:
    """Media haze: the view blurred and veiled (cataract, vitreous haze), densest over a region of 2-9 DD."""
    if phase != "vitreous":
        return
    rng, dd = scene.rng, scene.dd
    rx = rng.uniform(1.0, 4.5)
    centre = scene.at(scene.centre, rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5))
    lw, lh = max(8, round(scene.width * 8 / dd)), max(8, round(scene.height * 8 / dd))
    xs = ((np.arange(lw, dtype=np.float32) + 0.5) * (scene.width / lw) - 0.5)[None, :]
    ys = ((np.arange(lh, dtype=np.float32) + 0.5) * (scene.height / lh) - 0.5)[:, None]
    harmonics = scene.harmonics(0.15)
    ry = rx * rng.uniform(0.6, 1.0)
    grow = _reach(harmonics, ry / rx)
    region = _ellipse_cover(
        xs, ys, centre, rx * dd / grow, ry * dd / grow, rng.uniform(0, math.pi), 0.6 * ry * dd, harmonics
    )
    full = cv2.resize(region, (scene.width, scene.height), interpolation=cv2.INTER_LINEAR)
    base, peak = rng.uniform(0.1, 0.4), rng.uniform(0.45, 0.75)
    haze = (base + (1 - base) * full) * peak
    blurred = cv2.GaussianBlur(scene.rgb, (0, 0), dd * rng.uniform(0.04, 0.08))
    scene.rgb += np.clip(2 * haze, 0, 1)[..., None] * (blurred - scene.rgb)
    scene.blend((0, 0, scene.width, scene.height), 0.6 * haze, "haze")
    scene.mark(column, (0, 0, scene.width, scene.height), full >= 0.5, claim=False)
    scene.record(column, "media haze", centre, 2 * max(rx, ry) * dd)


# --- hard mode: the 18 rare conditions behind OTHER ------------------------------------------------------


def _rare_cws(scene: _Scene, column: str, phase: Phase) -> None:
    """Cotton-wool spots (1-5) by the arcades, white as in DR and vein occlusions."""
    if phase == "superficial":
        for _ in range(int(scene.rng.integers(1, 6))):
            _cotton_wool(scene, column, scene.near_arcade, _away_from_disc(scene))


def _rare_cb(scene: _Scene, column: str, phase: Phase) -> None:
    """Coloboma: a large white excavation (1.5-3.5 DD) below the disc with a pigmented border."""
    if phase != "deep":
        return
    rng = scene.rng
    extent = scene.size("coloboma", high=min(3.5, 2 * (scene.radius / scene.dd - 0.3)))
    where = lambda: scene.at(scene.disc, rng.uniform(-0.4, 0.6), -rng.uniform(1.0, 2.2))  # noqa: E731
    centre = scene.sample(where, extent / 2, column) or scene.at(scene.disc, 0.5, -0.9)
    scene.spot(
        column,
        "coloboma",
        centre,
        extent,
        opacity=rng.uniform(0.6, 0.85),
        aspect=rng.uniform(0.6, 0.85),
        angle=scene.axis_angle + math.pi / 2,
        soft=0.2,
        wobble=0.15,
        texture=0.2,
    )


def _rare_odpm(scene: _Scene, column: str, phase: Phase) -> None:
    """Optic disc pit maculopathy: a grey oval pit at the temporal disc margin and a serous macular
    detachment towards it."""
    rng = scene.rng
    if phase == "disc":
        centre = scene.at(scene.disc, rng.uniform(0.18, 0.28), rng.uniform(-0.15, 0.15))
        scene.spot(
            column,
            "disc pit",
            centre,
            scene.size("disc pit"),
            opacity=rng.uniform(0.35, 0.6),
            aspect=rng.uniform(0.6, 0.85),
            angle=scene.axis_angle + math.pi / 2,
            soft=0.3,
        )
    elif phase == "deep":
        extent = scene.size("serous detachment", high=2.0)
        _serous(scene, column, scene.at(scene.fovea, -rng.uniform(0.2, 0.5), rng.uniform(-0.2, 0.2)), extent)


def _rare_prh(scene: _Scene, column: str, phase: Phase) -> None:
    """Preretinal haemorrhage: dense, boat-shaped (a flat fluid level on top), by the disc or an arcade."""
    if phase != "superficial":
        return
    rng = scene.rng
    extent = scene.size("preretinal haemorrhage")
    centre = scene.sample(scene.near_arcade, extent / 2, column, _away_from_disc(scene, 0.4 + extent / scene.dd / 2))
    if centre is None:
        return
    shape = scene.ellipse(centre, extent, rng.uniform(0.55, 0.8), scene.axis_angle, 0.15)
    if shape is None:
        return
    box, cover = shape
    # The fluid level is horizontal in the photograph (gravity), whatever the eye's rotation.
    _, ys = scene.grid(box)
    level = centre[1] - rng.uniform(0.0, 0.3) * extent / 2
    cover = cover * np.clip((ys - level) / 1.0 + 0.5, 0.0, 1.0)
    scene.paint(column, "preretinal haemorrhage", box, cover, rng.uniform(0.75, 0.95), centre=centre, extent=extent)


def _rare_mnf(scene: _Scene, column: str, phase: Phase) -> None:
    """Myelinated nerve fibres: a white feathery patch hugging the disc margin along the arcade fibres."""
    if phase != "superficial":
        return
    rng = scene.rng
    extent = scene.size("myelinated fibres", high=1.6)
    sign = 1.0 if rng.uniform() < 0.5 else -1.0
    centre = scene.at(scene.disc, rng.uniform(-0.2, 0.3), sign * (0.45 + extent / scene.dd / 2))
    scene.spot(
        column,
        "myelinated fibres",
        centre,
        extent,
        opacity=rng.uniform(0.5, 0.8),
        aspect=rng.uniform(0.35, 0.6),
        angle=scene.axis_angle + math.pi / 2 + rng.normal(0, 0.2),
        soft=0.8,
        wobble=0.3,
        texture=0.5,
        texture_cell=0.04,
    )


def _rare_hr(scene: _Scene, column: str, phase: Phase) -> None:
    """Haemorrhagic retinopathy: 15-60 dot-blot and flame haemorrhages scattered over the fundus."""
    if phase == "superficial":
        _haemorrhages(
            scene,
            column,
            int(scene.rng.integers(15, 61)),
            lambda: scene.around(scene.fovea, 0.3, 3.6),
            0.4,
            _away_from_disc(scene),
        )


def _rare_crao(scene: _Scene, column: str, phase: Phase) -> None:
    """Central retinal artery occlusion: thin arteries and a milky white posterior pole (1.8-4.8 DD) round a
    cherry-red fovea."""
    rng = scene.rng
    if phase == "setup":
        scene.artery_calibre *= rng.uniform(0.45, 0.6)
    elif phase == "superficial":
        extent = scene.size("retinal whitening", low=1.8, high=4.8)
        shape = scene.ellipse(
            scene.fovea, extent, rng.uniform(0.7, 0.95), rng.uniform(0, math.pi), 0.4, scene.harmonics(0.15)
        )
        if shape is None:
            return
        box, cover = shape
        xs, ys = scene.grid(box)
        distance = ((xs - scene.fovea[0]) ** 2 + (ys - scene.fovea[1]) ** 2) / (0.2 * scene.dd) ** 2
        spared = np.asarray(1.0 - np.exp(-distance), np.float32)  # the fovea keeps its colour: a cherry-red spot
        scene.paint(
            column, "retinal whitening", box, cover * spared, rng.uniform(0.25, 0.45), centre=scene.fovea, extent=extent
        )


def _rare_td(scene: _Scene, column: str, phase: Phase) -> None:
    """Tilted disc: an oval disc with an inferonasal crescent."""
    if phase == "setup":
        scene.disc_squash = scene.rng.uniform(0.75, 0.88)
    elif phase == "deep":
        scene.crescent(column, (-0.7, -0.7), scene.rng.uniform(0.2, 0.5))


def _rare_cme(scene: _Scene, column: str, phase: Phase) -> None:
    """Cystoid macular oedema: a petaloid ring of six to ten small cysts round a central one."""
    if phase != "deep":
        return
    rng = scene.rng
    count = int(rng.integers(6, 11))
    ring = rng.uniform(0.12, 0.22)
    points = [scene.fovea] + [
        scene.polar(scene.fovea, ring, 2 * math.pi * i / count + rng.normal(0, 0.1)) for i in range(count)
    ]
    for point in points:
        scene.spot(
            column,
            "cystoid space",
            point,
            scene.size("cystoid space", high=0.2),
            opacity=rng.uniform(0.2, 0.35),
            aspect=rng.uniform(0.6, 0.9),
            angle=math.atan2(point[1] - scene.fovea[1], point[0] - scene.fovea[0]),
            soft=0.5,
        )


def _rare_ptcr(scene: _Scene, column: str, phase: Phase) -> None:
    """Choroidal rupture: a thin yellow-white crescent concentric with the disc between disc and fovea."""
    if phase != "deep":
        return
    rng = scene.rng
    radius, span, middle = rng.uniform(1.2, 1.8), math.radians(rng.uniform(50, 80)), rng.normal(0, 0.4)
    points = np.array(
        [scene.polar(scene.disc, radius, a) for a in np.linspace(middle - span / 2, middle + span / 2, 24)]
    )
    scene.band(
        column,
        "choroidal rupture",
        points,
        rng.uniform(0.06, 0.14) * scene.dd,
        opacity=rng.uniform(0.5, 0.8),
        soft=0.6,
        colour="atrophy",
    )


def _rare_cf(scene: _Scene, column: str, phase: Phase) -> None:
    """Choroidal folds: alternating light and dark parallel lines over the posterior pole (2-4 DD)."""
    if phase != "deep":
        return
    rng = scene.rng
    extent = scene.size("choroidal folds")
    centre = scene.at(scene.fovea, rng.uniform(-0.8, 0.8), rng.uniform(-0.5, 0.5))
    shape = scene.ellipse(centre, extent, rng.uniform(0.7, 1.0), rng.uniform(0, math.pi), 0.5)
    if shape is None:
        return
    box, cover = shape
    xs, ys = scene.grid(box)
    angle = scene.axis_angle + rng.normal(0, 0.3)
    period = rng.uniform(0.2, 0.35) * scene.dd
    wave = np.sin(2 * math.pi * ((ys - centre[1]) * math.cos(angle) - (xs - centre[0]) * math.sin(angle)) / period)
    scene.paint(
        column,
        "choroidal folds",
        box,
        cover,
        np.clip(wave, 0, 1).astype(np.float32) * np.float32(rng.uniform(0.08, 0.15)),
        centre=centre,
        extent=extent,
    )
    dark = np.clip(-wave, 0, 1).astype(np.float32) * np.float32(rng.uniform(0.1, 0.18))
    scene.paint(column, "choroidal folds", box, cover, dark, colour="pigment")


def _rare_vh(scene: _Scene, column: str, phase: Phase) -> None:
    """Vitreous haemorrhage: a dense blurred red cloud settled in the lower field."""
    if phase != "vitreous":
        return
    rng = scene.rng
    extent = scene.size("vitreous haemorrhage")
    centre = (
        scene.sample(lambda: scene.at(scene.centre, rng.uniform(-1, 1), -rng.uniform(0.8, 2.2)), 0.0, None)
        or scene.centre
    )
    scene.spot(
        column,
        "vitreous haemorrhage",
        centre,
        extent,
        opacity=rng.uniform(0.45, 0.8),
        aspect=rng.uniform(0.5, 0.9),
        angle=rng.uniform(0, math.pi),
        soft=0.8,
        wobble=0.3,
        texture=0.5,
        texture_cell=0.2,
        claim=False,
    )


def _rare_mca(scene: _Scene, column: str, phase: Phase) -> None:
    """Retinal arterial macroaneurysm: a round red dilation on an arcade artery, ringed by exudates."""
    if phase != "superficial":
        return
    rng = scene.rng
    key = ("STa", "ITa")[int(rng.integers(2))]
    extent = scene.size("macroaneurysm")
    centre = scene.sample(lambda: scene.along(key, 1.2, 3.5), extent / 2, column) or scene.along(key, 1.2, 2.0)
    scene.spot(column, "macroaneurysm", centre, extent, opacity=rng.uniform(0.75, 0.95), soft=0.25)
    radius, count = rng.uniform(0.3, 0.6), int(rng.integers(6, 16))
    for i in range(count):
        _exudate(scene, column, scene.polar(centre, radius * (1 + rng.normal(0, 0.12)), 2 * math.pi * i / count))


def _rare_vs(scene: _Scene, column: str, phase: Phase) -> None:
    """Vascular sheathing: white cuffs along both sides of a vein segment (1-3 DD)."""
    if phase != "superficial":
        return
    rng = scene.rng
    vessel = scene.main(("STv", "ITv")[int(rng.integers(2))])
    first = round(rng.uniform(0.8, 2.5) / _STEP_DD)
    last = min(len(vessel.points) - 1, first + round(rng.uniform(1.0, 3.0) / _STEP_DD))
    points = vessel.points[first : last + 1]
    width = float(vessel.widths[first : last + 1].mean())
    outer = scene.band_cover(points, width * rng.uniform(2.0, 2.6), 0.5)
    if outer is None:
        return
    box, cover = outer
    inner = scene.band_cover(points, width * 0.9, 0.5, box)
    if inner is None:
        return
    sheath = np.clip(cover - inner[1], 0, 1)
    low, high = points.min(axis=0), points.max(axis=0)
    centre = (float(low[0] + high[0]) / 2, float(low[1] + high[1]) / 2)
    extent = 2 * (float(np.hypot(*(points - centre).T).max()) + width * 1.3 + 1)
    scene.paint(column, "vascular sheathing", box, sheath, rng.uniform(0.35, 0.6), centre=centre, extent=extent)


def _rare_brao(scene: _Scene, column: str, phase: Phase) -> None:
    """Branch retinal artery occlusion: milky whitening of the retina along one arcade artery."""
    if phase != "superficial":
        return
    rng = scene.rng
    vessel = scene.main(("STa", "ITa")[int(rng.integers(2))])
    first = round(rng.uniform(0.5, 1.5) / _STEP_DD)
    last = min(len(vessel.points) - 1, first + round(rng.uniform(1.2, 3.0) / _STEP_DD))
    scene.band(
        column,
        "retinal whitening",
        vessel.points[first : last + 1],
        rng.uniform(0.5, 0.9) * scene.dd,
        opacity=rng.uniform(0.25, 0.45),
        soft=0.15 * scene.dd,
        texture=0.2,
    )


def _rare_plq(scene: _Scene, column: str, phase: Phase) -> None:
    """Hollenhorst plaque: a bright refractile yellow cholesterol embolus in an arcade artery."""
    if phase != "superficial":
        return
    rng = scene.rng
    key = ("STa", "ITa")[int(rng.integers(2))]
    extent = scene.size("cholesterol plaque")
    centre = scene.sample(lambda: scene.along(key, 0.8, 3.0), extent / 2, column) or scene.along(key, 1.0, 1.5)
    scene.spot(
        column,
        "cholesterol plaque",
        centre,
        extent,
        opacity=rng.uniform(0.75, 0.95),
        aspect=rng.uniform(0.6, 1.0),
        angle=scene.nfl_angle(centre),
        soft=0.2,
    )


def _rare_hped(scene: _Scene, column: str, phase: Phase) -> None:
    """Haemorrhagic pigment epithelial detachment: a sharply bordered dark red-grey dome at the macula."""
    if phase == "deep":
        rng = scene.rng
        centre = scene.at(scene.fovea, rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5))
        scene.spot(
            column,
            "pigment epithelial detachment",
            centre,
            scene.size("pigment epithelial detachment"),
            opacity=rng.uniform(0.4, 0.65),
            aspect=rng.uniform(0.75, 1.0),
            angle=rng.uniform(0, math.pi),
            soft=0.12,
            texture=0.2,
        )


def _rare_cl(scene: _Scene, column: str, phase: Phase) -> None:
    """Collateral vessels: one to three small tortuous loops at the disc margin."""
    if phase != "superficial":
        return
    rng = scene.rng
    for _ in range(int(rng.integers(1, 4))):
        start = scene.ts(scene.at(scene.disc, rng.uniform(-0.45, 0.45), rng.uniform(-0.5, 0.5)), scene.disc)
        course, _, _ = scene._path(
            start,
            rng.uniform(0, 2 * math.pi),
            math.radians(rng.uniform(-200, 200)),
            10.0,
            rng.uniform(0.3, 0.7),
            rng.uniform(0.5, 0.9),
            rng.uniform(0.2, 0.35),
        )
        scene.band(
            column,
            "collateral vessel",
            scene._to_pixels(course),
            rng.uniform(0.03, 0.05) * scene.dd,
            opacity=rng.uniform(0.6, 0.9),
            soft=0.5,
            colour="vein",
        )


Renderer = Callable[[_Scene, str, Phase], None]

_RARE_DRAW: Final[Mapping[str, Renderer]] = {
    "CWS": _rare_cws, "CB": _rare_cb, "ODPM": _rare_odpm, "PRH": _rare_prh, "MNF": _rare_mnf, "HR": _rare_hr,
    "CRAO": _rare_crao, "TD": _rare_td, "CME": _rare_cme, "PTCR": _rare_ptcr, "CF": _rare_cf, "VH": _rare_vh,
    "MCA": _rare_mca, "VS": _rare_vs, "BRAO": _rare_brao, "PLQ": _rare_plq, "HPED": _rare_hped, "CL": _rare_cl,
}  # fmt: skip


def _other(scene: _Scene, column: str, phase: Phase) -> None:
    """OTHER: the rare condition the column names (``OTHER`` itself draws cotton-wool spots)."""
    _RARE_DRAW.get(column, _rare_cws)(scene, column, phase)


_HARD_DRAW: Final[Mapping[str, Renderer]] = {
    "DR": _dr, "ARMD": _armd, "MH": _mh, "DN": _dn, "MYA": _mya, "BRVO": _brvo, "TSLN": _tsln, "ERM": _erm,
    "LS": _ls, "MS": _ms, "CSR": _csr, "ODC": _odc, "CRVO": _crvo, "TV": _tv, "AH": _ah, "ODP": _odp,
    "ODE": _ode, "ST": _st, "AION": _aion, "PT": _pt, "RT": _rt, "RS": _rs, "CRS": _crs, "EDN": _edn,
    "RPEC": _rpec, "MHL": _mhl, "RP": _rp, OTHER: _other,
}  # fmt: skip


def _normal_findings(scene: _Scene, phase: Phase, macular: bool) -> None:
    """What healthy eyes show too, so that a spot alone does not mean disease: a little pigment, now and
    then a choroidal naevus, a foveal reflex, nerve-fibre-layer sheen along the arcades."""
    rng = scene.rng
    if phase == "deep":
        if rng.uniform() < 0.3:
            for _ in range(int(rng.integers(1, 4))):
                point = scene.sample(lambda: scene.around(scene.fovea, 0.8, 3.5), 0.1 * scene.dd, None)
                if point is not None:
                    scene.spot(
                        None,
                        "pigment clump",
                        point,
                        rng.uniform(0.04, 0.1) * scene.dd,
                        opacity=rng.uniform(0.2, 0.45),
                        soft=0.5,
                    )
        if rng.uniform() < 0.06:
            point = scene.sample(lambda: scene.around(scene.fovea, 1.5, 3.5), 0.6 * scene.dd, None)
            if point is not None:
                scene.spot(
                    None,
                    "pigment clump",
                    point,
                    rng.uniform(0.6, 1.2) * scene.dd,
                    opacity=rng.uniform(0.12, 0.25),
                    aspect=rng.uniform(0.6, 0.9),
                    soft=0.7,
                    colour="grey",
                )
    elif phase == "superficial":
        if not macular and rng.uniform() < 0.6:
            scene.spot(
                None,
                "druse",
                scene.fovea,
                rng.uniform(0.06, 0.12) * scene.dd,
                opacity=rng.uniform(0.2, 0.45),
                soft=0.6,
                colour="sheen",
            )
        if rng.uniform() < 0.35:
            for _ in range(int(rng.integers(2, 6))):
                point = scene.near_arcade()
                scene.spot(
                    None,
                    "cotton-wool spot",
                    point,
                    rng.uniform(0.6, 1.5) * scene.dd,
                    opacity=rng.uniform(0.05, 0.13),
                    aspect=rng.uniform(0.2, 0.35),
                    angle=scene.nfl_angle(point),
                    soft=0.8,
                    colour="sheen",
                )


def _fallback(scene: _Scene, column: str) -> None:
    """Draws one lesion of the output's main kind near the fovea when chance placement drew none."""
    kind = _FALLBACK_KIND[_label_of(column)]
    extent = scene.size(kind)
    where = lambda: scene.around(scene.fovea, 0.5, 1.5)  # noqa: E731
    centre = scene.sample(where, extent / 2, column, tries=20) or scene.fovea
    scene.spot(column, kind, centre, extent, opacity=0.6, soft=0.3)


def _render_hard(
    rng: np.random.Generator, width: int, height: int, columns: tuple[str, ...], laterality: Laterality
) -> Fundus:
    """Hard mode: see the module docstring."""
    scene = _Scene(rng, width, height, laterality)
    draw = [(column, _HARD_DRAW[_label_of(column)]) for column in columns]
    for column, renderer in draw:
        renderer(scene, column, "setup")
    scene.grow_vessels()
    scene.paint_background()
    macular = any(_label_of(c) in _EXCLUSIVE_GROUPS["macula"] or c in _EXCLUSIVE_GROUPS["macula"] for c in columns)
    for phase in _DRAW_PHASES:
        if phase == "disc":
            scene.draw_disc()
        _normal_findings(scene, phase, macular)
        for column, renderer in draw:
            renderer(scene, column, phase)
        if phase == "disc":
            scene.draw_vessels()
    for column in columns:
        if column not in scene.masks or not scene.masks[column].any():
            _fallback(scene, column)
    image = scene.acquire()
    masks = {column: np.where(scene.masks[column], np.uint8(255), np.uint8(0)) for column in columns}
    order = {column: i for i, column in enumerate(columns)}
    lesions = sorted(scene.lesions, key=lambda lesion: order[lesion.column])
    return Fundus(
        image=image,
        masks=masks,
        lesions=tuple(lesions),
        laterality=laterality,
        fov_centre=(round(scene.centre[0], 2), round(scene.centre[1], 2)),
        fov_diameter=round(2 * scene.radius, 2),
        disc_centre=(round(scene.disc[0], 2), round(scene.disc[1], 2)),
        disc_radius=round(scene.dd / 2, 2),
        fovea=(round(scene.fovea[0], 2), round(scene.fovea[1], 2)),
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


def _png(path: Path, image: NDArray[np.uint8], *, rle: bool = False) -> None:
    data = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    # Level 1: half the encoding time of the default for files about 10% larger. Hard mode adds run-length
    # matching and the "up" row filter alone (OpenCV 4.11+): 11 ms instead of 34 ms for a noisy 640 x 480
    # photograph, 4% smaller, and masks in under a millisecond; libpng's adaptive filter choice was most
    # of the time of writing a dataset.
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1]
    if rle:
        params += [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
        if hasattr(cv2, "IMWRITE_PNG_FILTER"):
            params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]
    ok, encoded = cv2.imencode(".png", data, params)
    if not ok:
        raise OSError(f"could not encode {path.name} as PNG")
    path.write_bytes(encoded.tobytes())


def _write_image(out: Path, config: SynthConfig, plan: ImagePlan) -> dict[str, Any]:
    """Renders one planned image, writes its PNG, masks (and DICOM); returns its manifest entry."""
    rng = np.random.default_rng([config.seed, 2, SPLITS.index(plan.split), plan.image_id])
    width, height = config.image_size(plan.split, plan.image_id)
    fundus = render_fundus(rng, width, height, plan.columns, plan.laterality, mode=config.mode)
    rle = config.mode == "hard"
    _png(out / plan.split / f"{plan.image_id}.png", fundus.image, rle=rle)
    for column, mask in fundus.masks.items():
        _png(out / "masks" / plan.split / f"{plan.image_id}_{column}.png", mask, rle=rle)
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
                **({"kind": lesion.kind} if lesion.kind else {}),
                "mask": f"masks/{plan.split}/{plan.image_id}_{lesion.column}.png",
            }
            for lesion in fundus.lesions
        ],
    }
    if fundus.fovea is not None:  # hard mode
        entry["size"] = [width, height]
        entry["fovea"] = list(fundus.fovea)
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
    logger.info("writing %d synthetic images (mode=%s, dicom=%s)", len(plans), config.mode, config.dicom)
    entries: list[dict[str, Any]] = []
    chunk = 32  # bounds the finished-but-unconsumed work held in memory
    # One image per thread already keeps the cores busy; OpenCV's own worker threads on top of that only
    # contend for them (a fifth of the kernel time of a run), so they are off while images are drawn.
    opencv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with (
            ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool,
            tqdm(total=len(plans), desc="synth", unit="img", file=sys.stderr, disable=None) as progress,
        ):
            for start in range(0, len(plans), chunk):
                batch = plans[start : start + chunk]
                for entry in pool.map(lambda plan: _write_image(out, config, plan), batch):
                    entries.append(entry)
                    progress.update()
    finally:
        cv2.setNumThreads(opencv_threads)

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
        "config": {**asdict(config), "size_policy": config.size_policy},
        "summary": summary,
        "label_counts": {
            split: {label: sum(label in p.labels for p in plans if p.split == split) for label in DISEASE_LABELS}
            for split in SPLITS
        },
        **(
            {
                "lesion_styles": {
                    label: {
                        "colour": s.colour,
                        "rgb": list(s.rgb),
                        "shape": s.shape,
                        "slot": list(s.slot),
                        "angle": s.angle,
                    }
                    for label, s in LESION_STYLES.items()
                }
            }
            if config.mode == "easy"
            else {
                "lesion_kinds": {
                    kind: {"colour": k.colour, "shape": k.shape, "size_dd": [round(v, 4) for v in k.size_dd]}
                    for kind, k in LESION_KINDS.items()
                }
            }
        ),
        "images": entries,
    }
    (out / "synth.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return summary
