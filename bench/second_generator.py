"""A second fundus generator, written apart from ``retinagate synth``, to check the recipe off its home ground.

The default recipe was chosen on ``retinagate synth`` photographs. The issue's independent set comes
from another generator, so a recipe that learned our generator's habits (its colours, its lesion
shapes, its vessel tree, its mask layout) could win here and lose there. This module draws the same
kinds of findings its own way: another anatomy (vessels as curved random walks, a disc placed from the
fovea), other lesion shapes and colours, another acquisition model, the official RFMiD folder layout,
IDs numbered from 1 in every split, all 46 label columns, and lesion masks in a layout ``synth`` does
not write (``<Split>_Set/Masks/<COLUMN>/<ID>.png``, the rare findings under their own columns). Media
haze and tessellation cover the whole fundus and get no mask, as a set annotated by lesion would.

``--findings`` draws only some of the findings (the issue's independent set reported nine labels:
Disease_Risk, ARMD, MYA, DR, ODC, CRS, OTHER, BRVO and MH), so each has more positives, and
``--mh-hole`` draws the ``MH`` column as a macular hole with a mask, as that set's report reads it
(RFMiD's ``MH`` is media haze and its macular hole ``MHL``).

It is a check, not a tuning set: ``bench/bench_recipe.py --data DIR`` trains the plain baseline and the
default on it in one run, and nothing is chosen on it.

Example::

    .venv/bin/python bench/second_generator.py --out /tmp/second --seed 1     # 400/120/120 at 640x480
    .venv/bin/python bench/bench_recipe.py --data /tmp/second --json /tmp/second.json
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from retinagate.labels import DISEASE_RISK, NAMED_DISEASES, RFMID_COLUMNS

#: The official RFMiD layout: (split set folder, image folder, label CSV).
LAYOUT = {
    "train": ("Training_Set", "Training", "RFMiD_Training_Labels.csv"),
    "val": ("Evaluation_Set", "Validation", "RFMiD_Validation_Labels.csv"),
    "test": ("Test_Set", "Test", "RFMiD_Testing_Labels.csv"),
}
#: Findings that cover the whole fundus: labelled, never masked.
UNMASKED = frozenset({"MH", "TSLN"})
#: The rare findings this generator draws for OTHER.
RARE = ("CWS", "VH", "MNF", "PRH", "CRAO", "HR")
DISC_FINDINGS = frozenset({"ODC", "ODP", "ODE", "AION"})
MACULAR_FINDINGS = frozenset({"MHL", "MS", "CSR", "ARMD", "ERM", "PT"})

Point = tuple[float, float]
RGB = tuple[float, float, float]

HAEM: RGB = (0.55, 0.08, 0.06)
DARK_HAEM: RGB = (0.42, 0.05, 0.05)
EXUDATE: RGB = (0.95, 0.85, 0.45)
DRUSEN: RGB = (0.92, 0.78, 0.50)
WHITE: RGB = (0.95, 0.93, 0.85)
PIGMENT: RGB = (0.18, 0.10, 0.06)
VEIN: RGB = (0.45, 0.07, 0.06)
ARTERY: RGB = (0.68, 0.16, 0.10)


@dataclass
class Eye:
    """One photograph being drawn: the image, its masks and the anatomy lesions are placed on."""

    rng: np.random.Generator
    width: int
    height: int
    image: NDArray[np.float32] = field(init=False)
    masks: dict[str, NDArray[np.uint8]] = field(default_factory=dict)
    centre: Point = (0.0, 0.0)
    radius: float = 0.0
    dd: float = 0.0  # disc diameter, pixels
    disc: Point = (0.0, 0.0)
    fovea: Point = (0.0, 0.0)
    nasal: float = 1.0  # +1: the disc lies right of the fovea
    veins: list[NDArray[np.float64]] = field(default_factory=list)
    unmasked: frozenset[str] = UNMASKED

    def __post_init__(self) -> None:
        self.image = np.zeros((self.height, self.width, 3), np.float32)

    def inside(self, point: Point, margin: float = 0.0) -> bool:
        return math.dist(point, self.centre) < self.radius - margin

    def near(self, around: Point, spread: float, avoid_disc: bool = True) -> Point:
        """A point about ``spread`` pixels from ``around``, inside the field and off the disc."""
        for _ in range(50):
            p = (around[0] + self.rng.normal(0, spread), around[1] + self.rng.normal(0, spread))
            if self.inside(p, 0.04 * self.radius) and not (avoid_disc and math.dist(p, self.disc) < 0.7 * self.dd):
                return p
        return around

    def within(self, course: NDArray[np.float64]) -> NDArray[np.float64]:
        """The points of a vessel's course that lie inside the field of view."""
        return course[[self.inside(tuple(p)) for p in course]]

    def temporal_veins(self) -> list[NDArray[np.float64]]:
        """The veins that run away from the disc towards the fovea's side."""
        return [v for v in self.veins if (v[-1][0] - self.disc[0]) * self.nasal < 0]

    def paint(
        self, column: str | None, alpha: NDArray[np.float32], colour: RGB, box: tuple[int, int, int, int]
    ) -> None:
        """Blends ``colour`` at ``alpha`` into the box (x0, y0, x1, y1) and marks ``column``'s mask."""
        x0, y0, x1, y1 = box
        region = self.image[y0:y1, x0:x1]
        a = alpha[..., None]
        region[:] = region * (1 - a) + np.asarray(colour, np.float32) * a
        if column is not None and column not in self.unmasked:
            mask = self.masks.setdefault(column, np.zeros((self.height, self.width), np.uint8))
            mask[y0:y1, x0:x1] |= (alpha > 0.2).astype(np.uint8)

    def blob(
        self,
        column: str | None,
        at: Point,
        radii: tuple[float, float],
        colour: RGB,
        opacity: float,
        *,
        angle: float = 0.0,
        blur: float = 0.3,
        ring: float = 0.0,
    ) -> None:
        """A filled ellipse (a ring of relative width ``ring`` when above zero), edges softened by ``blur``
        times its smaller radius."""
        reach = max(radii) * (1 + 2 * blur) + 3
        x0, y0 = max(int(at[0] - reach), 0), max(int(at[1] - reach), 0)
        x1, y1 = min(int(at[0] + reach) + 2, self.width), min(int(at[1] + reach) + 2, self.height)
        if x1 <= x0 or y1 <= y0:
            return
        alpha = np.zeros((y1 - y0, x1 - x0), np.float32)
        centre = (round((at[0] - x0) * 16), round((at[1] - y0) * 16))
        axes = (max(round(radii[0] * 16), 8), max(round(radii[1] * 16), 8))
        if ring > 0:
            thick = max(1, round(ring * min(radii)))
            cv2.ellipse(alpha, centre, axes, angle, 0, 360, 1.0, thick, cv2.LINE_AA, 4)
        else:
            cv2.ellipse(alpha, centre, axes, angle, 0, 360, 1.0, -1, cv2.LINE_AA, 4)
        sigma = blur * min(radii)
        if sigma > 0.3:
            alpha = np.asarray(cv2.GaussianBlur(alpha, (0, 0), sigma), np.float32)
        self.paint(column, alpha * opacity, colour, (x0, y0, x1, y1))

    def line(self, column: str | None, points: NDArray[np.float64], width: float, colour: RGB, opacity: float) -> None:
        """A polyline ``width`` pixels wide, softly edged."""
        pad = int(width * 2) + 3
        x0, y0 = max(int(points[:, 0].min()) - pad, 0), max(int(points[:, 1].min()) - pad, 0)
        x1 = min(int(points[:, 0].max()) + pad, self.width)
        y1 = min(int(points[:, 1].max()) + pad, self.height)
        if x1 <= x0 or y1 <= y0:
            return
        alpha = np.zeros((y1 - y0, x1 - x0), np.float32)
        shifted = np.round((points - (x0, y0)) * 16).astype(np.int32)
        cv2.polylines(alpha, [shifted], False, 1.0, max(1, round(width)), cv2.LINE_AA, 4)
        if width > 2:
            alpha = np.asarray(cv2.GaussianBlur(alpha, (0, 0), 0.25 * width), np.float32)
        self.paint(column, alpha * opacity, colour, (x0, y0, x1, y1))


def walk(
    rng: np.random.Generator,
    start: Point,
    heading: float,
    turn: float,
    steps: int,
    step: float,
    wiggle: tuple[float, float] = (0.0, 1.0),
) -> NDArray[np.float64]:
    """A vessel's course: a random walk whose heading drifts by ``turn`` a step, plus a sinusoidal swing
    of amplitude ``wiggle[0]`` radians every ``wiggle[1]`` steps (tortuosity)."""
    points = [start]
    x, y = start
    phase = rng.uniform(0, 2 * math.pi)
    for i in range(steps):
        heading += turn + rng.normal(0, 0.05)
        h = heading + wiggle[0] * math.sin(2 * math.pi * i / wiggle[1] + phase)
        x, y = x + step * math.cos(h), y + step * math.sin(h)
        points.append((x, y))
    return np.asarray(points)


def anatomy(eye: Eye, tortuous: bool, thin: bool) -> None:
    """Background, vignetting, macula, disc and the vessel tree."""
    rng = eye.rng
    h, w = eye.height, eye.width
    eye.radius = rng.uniform(0.43, 0.5) * h
    eye.centre = (w / 2 + rng.normal(0, 0.02 * w), h / 2 + rng.normal(0, 0.02 * h))
    eye.dd = rng.uniform(0.13, 0.16) * 2 * eye.radius
    eye.nasal = 1.0 if rng.uniform() < 0.5 else -1.0
    eye.fovea = (eye.centre[0] + rng.normal(0, 0.2 * eye.dd), eye.centre[1] + rng.normal(0, 0.2 * eye.dd))
    eye.disc = (
        eye.fovea[0] + eye.nasal * rng.uniform(2.3, 2.7) * eye.dd,
        eye.fovea[1] - rng.uniform(0.0, 0.4) * eye.dd,
    )

    base = np.array([rng.uniform(0.62, 0.85), rng.uniform(0.25, 0.40), rng.uniform(0.10, 0.20)], np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = np.hypot(xx - eye.centre[0], yy - eye.centre[1]) / eye.radius
    shade = 1.0 - rng.uniform(0.2, 0.45) * d**2
    noise = cv2.resize(rng.normal(0, 1, (8, 10)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    shade *= 1.0 + 0.06 * noise
    macula = np.exp(-((np.hypot(xx - eye.fovea[0], yy - eye.fovea[1]) / (0.9 * eye.dd)) ** 2))
    eye.image[:] = base * (shade * (1 - 0.35 * macula))[..., None]

    eye.blob(None, eye.disc, (0.5 * eye.dd, 0.55 * eye.dd), (0.98, 0.78, 0.50), 0.9, blur=0.15)
    eye.blob(None, eye.disc, (0.18 * eye.dd, 0.2 * eye.dd), (1.0, 0.92, 0.75), 0.8, blur=0.3)

    swing = (rng.uniform(0.3, 0.55), rng.uniform(3, 6)) if tortuous else (0.0, 1.0)
    scale = 0.6 if thin else 1.0
    for up in (-1.0, 1.0):
        for temporal in (True, False):
            heading = math.atan2(up * (0.9 if temporal else 0.5), -eye.nasal if temporal else eye.nasal)
            # the temporal arcades arch round the fovea
            turn = up * eye.nasal * 0.045 if temporal else -up * eye.nasal * 0.015
            for kind, colour, width in (("vein", VEIN, 0.09), ("artery", ARTERY, 0.065)):
                start = (eye.disc[0] + rng.normal(0, 0.05 * eye.dd), eye.disc[1] + up * 0.2 * eye.dd)
                course = walk(
                    rng, start, heading + rng.normal(0, 0.1), turn, 60, 0.12 * eye.dd, swing if temporal else (0.0, 1.0)
                )
                course = eye.within(course)
                if len(course) < 2:
                    continue
                eye.line("TV" if tortuous and temporal else None, course, width * eye.dd * scale, colour, 0.85)
                if kind == "vein":
                    eye.veins.append(course)
                for _ in range(int(rng.integers(1, 4))):
                    at = int(rng.integers(3, max(4, len(course) - 3)))
                    branch = walk(
                        rng,
                        tuple(course[min(at, len(course) - 1)]),
                        heading + rng.choice((-0.8, 0.8)),
                        0.0,
                        25,
                        0.1 * eye.dd,
                    )
                    branch = eye.within(branch)
                    if len(branch) >= 2:
                        eye.line(None, branch, 0.6 * width * eye.dd * scale, colour, 0.75)


# --- findings: each draws its lesions and marks its mask ------------------------------------------


def dr(eye: Eye, column: str) -> None:
    rng = eye.rng
    for _ in range(int(rng.integers(4, 18))):  # microaneurysms, 1/12 DD
        eye.blob(column, eye.near(eye.fovea, 1.6 * eye.dd), (eye.dd / 24,) * 2, DARK_HAEM, 0.9, blur=0.2)
    for _ in range(int(rng.integers(1, 7))):  # dot-blot haemorrhages
        r = rng.uniform(1 / 12, 1 / 6) * eye.dd
        eye.blob(column, eye.near(eye.fovea, 1.8 * eye.dd), (r, r * rng.uniform(0.7, 1)), HAEM, 0.85)
    if rng.uniform() < 0.6:  # hard exudates
        around = eye.near(eye.fovea, 1.2 * eye.dd)
        for _ in range(int(rng.integers(3, 12))):
            r = rng.uniform(1 / 25, 1 / 12) * eye.dd
            eye.blob(column, eye.near(around, 0.4 * eye.dd), (r, r), EXUDATE, 0.9, blur=0.15)


def armd(eye: Eye, column: str) -> None:
    rng = eye.rng
    for _ in range(int(rng.integers(6, 20))):
        r = rng.uniform(1 / 8, 1 / 4) * eye.dd / 2
        eye.blob(column, eye.near(eye.fovea, 0.6 * eye.dd, False), (r, r), DRUSEN, rng.uniform(0.5, 0.8), blur=0.5)
    if rng.uniform() < 0.4:  # geographic atrophy
        r = rng.uniform(0.3, 0.6) * eye.dd
        eye.blob(column, eye.near(eye.fovea, 0.2 * eye.dd, False), (r, 0.8 * r), (0.85, 0.62, 0.45), 0.7, blur=0.2)


def media_haze(eye: Eye, column: str) -> None:
    """Hazy media: the whole picture veiled and blurred (no mask)."""
    k = eye.rng.uniform(2.0, 4.0) * eye.dd / 40
    eye.image[:] = cv2.GaussianBlur(eye.image, (0, 0), k) * 0.7 + 0.3 * eye.image.mean((0, 1))


def drusen(eye: Eye, column: str) -> None:
    rng = eye.rng
    for _ in range(int(rng.integers(10, 35))):
        r = rng.uniform(1 / 15, 1 / 8) * eye.dd / 2
        eye.blob(column, eye.near(eye.fovea, 2.0 * eye.dd), (r, r), DRUSEN, rng.uniform(0.6, 0.9), blur=0.3)


def myopia(eye: Eye, column: str) -> None:
    """Peripapillary atrophy: a pale crescent on the disc's temporal side."""
    rng = eye.rng
    side = (eye.disc[0] - eye.nasal * 0.45 * eye.dd, eye.disc[1])
    width = rng.uniform(0.3, 0.6) * eye.dd
    eye.blob(column, side, (width, 0.6 * eye.dd), (0.93, 0.82, 0.68), rng.uniform(0.6, 0.85), blur=0.3)


def vein_haemorrhages(eye: Eye, column: str, veins: Sequence[NDArray[np.float64]], count: tuple[int, int]) -> None:
    rng = eye.rng
    for course in veins:
        for _ in range(int(rng.integers(*count))):
            i = int(rng.integers(1, len(course)))
            p = course[i] + rng.normal(0, 0.25 * eye.dd, 2)
            if not eye.inside(tuple(p), 0.03 * eye.radius):
                continue
            direction = course[i] - course[i - 1]
            angle = math.degrees(math.atan2(direction[1], direction[0]))
            length = rng.uniform(0.12, 0.3) * eye.dd
            eye.blob(column, tuple(p), (length, length / 3), HAEM, 0.8, angle=angle, blur=0.35)


def brvo(eye: Eye, column: str) -> None:
    temporal = eye.temporal_veins()
    vein = [temporal[int(eye.rng.integers(len(temporal)))]] if temporal else eye.veins[:1]
    vein_haemorrhages(eye, column, vein, (8, 18))


def crvo(eye: Eye, column: str) -> None:
    vein_haemorrhages(eye, column, eye.veins, (5, 12))


def tessellation(eye: Eye, column: str) -> None:
    """Choroidal vessels showing through a thin RPE (no mask)."""
    rng = eye.rng
    layer = np.zeros(eye.image.shape[:2], np.float32)
    for _ in range(40):
        course = walk(
            rng,
            (rng.uniform(0, eye.width), rng.uniform(0, eye.height)),
            rng.uniform(0, 6.3),
            0.0,
            30,
            0.1 * eye.dd,
            (0.4, 8),
        )
        cv2.polylines(
            layer, [np.round(course * 16).astype(np.int32)], False, 1.0, max(2, round(0.12 * eye.dd)), cv2.LINE_AA, 4
        )
    layer = cv2.GaussianBlur(layer, (0, 0), 0.05 * eye.dd) * rng.uniform(0.25, 0.4)
    eye.image[:] = eye.image * (1 - layer[..., None]) + np.array((0.5, 0.18, 0.08), np.float32) * layer[..., None]


def erm(eye: Eye, column: str) -> None:
    """A cellophane sheen over the macula with radial striae."""
    rng = eye.rng
    r = rng.uniform(0.8, 1.3) * eye.dd
    eye.blob(column, eye.fovea, (r, 0.8 * r), (0.95, 0.9, 0.85), rng.uniform(0.2, 0.3), blur=0.5)
    for _ in range(int(rng.integers(5, 10))):
        a = rng.uniform(0, 2 * math.pi)
        ends = np.array([eye.fovea, (eye.fovea[0] + r * math.cos(a), eye.fovea[1] + r * math.sin(a))])
        eye.line(column, ends, 0.03 * eye.dd, WHITE, 0.45)


def laser_scars(eye: Eye, column: str) -> None:
    rng = eye.rng
    for _ in range(int(rng.integers(15, 50))):
        a, d = rng.uniform(0, 2 * math.pi), rng.uniform(2.6, 3.6) * eye.dd
        p = (eye.fovea[0] + d * math.cos(a), eye.fovea[1] + d * math.sin(a))
        if not eye.inside(p, 0.08 * eye.radius) or math.dist(p, eye.disc) < eye.dd:
            continue
        r = rng.uniform(1 / 12, 1 / 7) * eye.dd
        eye.blob(column, p, (r, r), (0.85, 0.75, 0.55), 0.8, blur=0.15)
        eye.blob(column, p, (r, r), PIGMENT, 0.8, ring=0.4, blur=0.1)


def macular_scar(eye: Eye, column: str) -> None:
    rng = eye.rng
    r = rng.uniform(0.4, 0.9) * eye.dd
    eye.blob(
        column, eye.fovea, (r, r * rng.uniform(0.6, 1)), (0.85, 0.82, 0.75), 0.8, angle=rng.uniform(0, 180), blur=0.25
    )
    for _ in range(int(rng.integers(3, 8))):
        eye.blob(column, eye.near(eye.fovea, 0.4 * r, False), (0.12 * r, 0.1 * r), PIGMENT, 0.8)


def csr(eye: Eye, column: str) -> None:
    r = eye.rng.uniform(0.5, 1.0) * eye.dd
    at = eye.near(eye.fovea, 0.2 * eye.dd, False)
    eye.blob(column, at, (r, 0.85 * r), (0.85, 0.55, 0.35), 0.35, blur=0.3)
    eye.blob(column, at, (r, 0.85 * r), (0.95, 0.8, 0.6), 0.5, ring=0.08, blur=0.1)


def disc_cupping(eye: Eye, column: str) -> None:
    r = eye.rng.uniform(0.35, 0.45) * eye.dd
    eye.blob(column, eye.disc, (0.9 * r, r), (1.0, 0.95, 0.82), 0.9, blur=0.15)


def tortuous(eye: Eye, column: str) -> None:
    """Drawn with the vessel tree (:func:`anatomy`)."""


def asteroid(eye: Eye, column: str) -> None:
    rng = eye.rng
    cloud = eye.near(eye.centre, 0.8 * eye.dd, False)
    for _ in range(int(rng.integers(30, 120))):
        r = rng.uniform(1 / 20, 1 / 10) * eye.dd / 2
        eye.blob(
            column,
            eye.near(cloud, 1.2 * eye.dd, False),
            (r, r),
            (1.0, 0.97, 0.75),
            rng.uniform(0.5, 0.9),
            blur=rng.choice((0.2, 0.8)),
        )


def disc_pallor(eye: Eye, column: str) -> None:
    eye.blob(column, eye.disc, (0.5 * eye.dd, 0.55 * eye.dd), (0.97, 0.95, 0.88), eye.rng.uniform(0.6, 0.8), blur=0.1)


def disc_oedema(eye: Eye, column: str) -> None:
    r = eye.rng.uniform(0.65, 0.85) * eye.dd
    eye.blob(column, eye.disc, (r, 1.05 * r), (0.9, 0.45, 0.3), 0.75, blur=0.5)


def shunt(eye: Eye, column: str) -> None:
    rng = eye.rng
    r = rng.uniform(0.12, 0.25) * eye.dd
    c = (eye.disc[0] + rng.normal(0, 0.1 * eye.dd), eye.disc[1] + rng.normal(0, 0.1 * eye.dd))
    a = np.linspace(0, rng.uniform(4.5, 6.0), 30) + rng.uniform(0, 6.3)
    loop = np.stack([c[0] + r * np.cos(a), c[1] + r * np.sin(a) * rng.uniform(0.6, 1.0)], 1)
    eye.line(column, loop, 0.05 * eye.dd, VEIN, 0.9)


def aion(eye: Eye, column: str) -> None:
    half = eye.rng.choice((-1.0, 1.0)) * 0.25 * eye.dd
    at = (eye.disc[0], eye.disc[1] + half)
    eye.blob(column, at, (0.6 * eye.dd, 0.35 * eye.dd), (0.95, 0.88, 0.75), 0.75, blur=0.4)


def telangiectasia(eye: Eye, column: str) -> None:
    rng = eye.rng
    for _ in range(int(rng.integers(6, 14))):
        start = eye.near(eye.fovea, 0.4 * eye.dd, False)
        course = walk(rng, start, rng.uniform(0, 6.3), rng.normal(0, 0.3), 5, 0.06 * eye.dd)
        eye.line(column, course, 0.025 * eye.dd, DARK_HAEM, 0.7)
    eye.blob(column, eye.fovea, (0.45 * eye.dd,) * 2, (0.7, 0.6, 0.55), 0.25, ring=0.5, blur=0.3)


def traction(eye: Eye, column: str) -> None:
    rng = eye.rng
    temporal = eye.temporal_veins() or eye.veins
    course = temporal[int(rng.integers(len(temporal)))] if temporal else np.array([eye.disc, eye.fovea])
    part = course[len(course) // 6 : max(2, len(course) // 2)]
    eye.line(column, part, rng.uniform(0.2, 0.35) * eye.dd, (0.9, 0.88, 0.8), 0.55)


def retinitis(eye: Eye, column: str) -> None:
    rng = eye.rng
    at = eye.near(eye.fovea, 2.0 * eye.dd)
    r = rng.uniform(0.4, 1.0) * eye.dd
    eye.blob(column, at, (r, 0.7 * r), (0.95, 0.9, 0.75), 0.75, angle=rng.uniform(0, 180), blur=0.6)
    for _ in range(int(rng.integers(1, 5))):
        eye.blob(column, eye.near(at, 0.7 * r), (0.15 * eye.dd, 0.06 * eye.dd), HAEM, 0.8, angle=rng.uniform(0, 180))


def chorioretinitis(eye: Eye, column: str) -> None:
    rng = eye.rng
    for _ in range(int(rng.integers(1, 4))):
        at = eye.near(eye.fovea, 2.5 * eye.dd)
        r = rng.uniform(0.25, 0.7) * eye.dd
        eye.blob(column, at, (r, r * rng.uniform(0.7, 1)), (0.93, 0.88, 0.78), 0.85, blur=0.1)
        eye.blob(column, at, (r, r), PIGMENT, 0.8, ring=0.25, blur=0.15)


def exudation(eye: Eye, column: str) -> None:
    """A circinate ring of hard exudates."""
    rng = eye.rng
    at, r = eye.near(eye.fovea, 1.5 * eye.dd), rng.uniform(0.4, 0.9) * eye.dd
    for a in np.linspace(0, 2 * math.pi, int(rng.integers(10, 25)), endpoint=False):
        p = (at[0] + r * math.cos(a) + rng.normal(0, 0.05 * r), at[1] + r * math.sin(a) + rng.normal(0, 0.05 * r))
        s = rng.uniform(1 / 20, 1 / 10) * eye.dd
        if eye.inside(p, 0.03 * eye.radius):
            eye.blob(column, p, (s, s), EXUDATE, 0.9, blur=0.15)


def rpe_changes(eye: Eye, column: str) -> None:
    rng = eye.rng
    at = eye.near(eye.fovea, 1.0 * eye.dd, False)
    for _ in range(int(rng.integers(15, 40))):
        s = rng.uniform(1 / 25, 1 / 12) * eye.dd
        dark = rng.uniform() < 0.5
        eye.blob(column, eye.near(at, 0.5 * eye.dd, False), (s, s), PIGMENT if dark else (0.9, 0.7, 0.5), 0.7)


def macular_hole(eye: Eye, column: str) -> None:
    r = eye.rng.uniform(1 / 8, 1 / 5) * eye.dd
    eye.blob(column, eye.fovea, (1.8 * r, 1.8 * r), (0.8, 0.6, 0.5), 0.4, blur=0.3)
    eye.blob(column, eye.fovea, (r, r), (0.6, 0.1, 0.08), 0.95, blur=0.1)


def pigmentosa(eye: Eye, column: str) -> None:
    rng = eye.rng
    for _ in range(int(rng.integers(25, 60))):
        a, d = rng.uniform(0, 2 * math.pi), rng.uniform(2.2, 3.6) * eye.dd
        p = (eye.fovea[0] + d * math.cos(a), eye.fovea[1] + d * math.sin(a))
        if not eye.inside(p, 0.05 * eye.radius):
            continue
        for _ in range(int(rng.integers(3, 6))):
            b = rng.uniform(0, 2 * math.pi)
            length = rng.uniform(0.08, 0.2) * eye.dd
            eye.line(
                column,
                np.array([p, (p[0] + length * math.cos(b), p[1] + length * math.sin(b))]),
                0.03 * eye.dd,
                PIGMENT,
                0.85,
            )


def rare(eye: Eye, column: str) -> None:
    rng = eye.rng
    if column == "CWS":
        for _ in range(int(rng.integers(1, 5))):
            r = rng.uniform(1 / 6, 1 / 3) * eye.dd
            eye.blob(
                column, eye.near(eye.disc, 1.5 * eye.dd), (r, 0.6 * r), WHITE, 0.7, angle=rng.uniform(0, 180), blur=0.6
            )
    elif column == "VH":
        r = rng.uniform(1.0, 2.0) * eye.dd
        eye.blob(column, eye.near(eye.centre, 1.5 * eye.dd, False), (r, 0.7 * r), (0.35, 0.03, 0.02), 0.8, blur=0.5)
    elif column == "MNF":
        for _ in range(int(rng.integers(6, 12))):
            start = (eye.disc[0] + rng.normal(0, 0.3 * eye.dd), eye.disc[1] + rng.normal(0, 0.3 * eye.dd))
            course = walk(rng, start, rng.uniform(0, 6.3), 0.0, 8, 0.08 * eye.dd)
            eye.line(column, course, 0.12 * eye.dd, WHITE, 0.6)
    elif column == "PRH":
        at, r = eye.near(eye.fovea, 1.0 * eye.dd), rng.uniform(0.5, 1.0) * eye.dd
        eye.blob(column, at, (r, 0.7 * r), DARK_HAEM, 0.9, blur=0.05)
    elif column == "CRAO":
        eye.blob(column, eye.fovea, (2.0 * eye.dd, 1.6 * eye.dd), (0.9, 0.85, 0.8), 0.45, blur=0.5)
        eye.blob(None, eye.fovea, (0.15 * eye.dd,) * 2, (0.75, 0.05, 0.05), 0.9)
    else:  # HR: flame haemorrhages and cotton-wool spots near the disc
        vein_haemorrhages(eye, column, eye.veins[:2], (1, 4))
        eye.blob(column, eye.near(eye.disc, 1.2 * eye.dd), (0.2 * eye.dd, 0.12 * eye.dd), WHITE, 0.7, blur=0.6)


DRAW: dict[str, Callable[[Eye, str], None]] = {
    "DR": dr, "ARMD": armd, "MH": media_haze, "DN": drusen, "MYA": myopia, "BRVO": brvo, "TSLN": tessellation,
    "ERM": erm, "LS": laser_scars, "MS": macular_scar, "CSR": csr, "ODC": disc_cupping, "CRVO": crvo,
    "TV": tortuous, "AH": asteroid, "ODP": disc_pallor, "ODE": disc_oedema, "ST": shunt, "AION": aion,
    "PT": telangiectasia, "RT": traction, "RS": retinitis, "CRS": chorioretinitis, "EDN": exudation,
    "RPEC": rpe_changes, "MHL": macular_hole, "RP": pigmentosa, **{c: rare for c in RARE},
}  # fmt: skip
#: Drawn last: they veil what lies beneath.
LAST = ("MH",)


#: What ``--findings`` chooses from: the named diseases and OTHER (one of :data:`RARE`).
FINDINGS = (*NAMED_DISEASES, "OTHER")


def plan_labels(
    rng: np.random.Generator, n: int, findings: Sequence[str] = FINDINGS, *, hole_mh: bool = False
) -> list[list[str]]:
    """Each photograph's columns: a quarter healthy, the rest one of ``findings`` (cycled, so every label
    has positives in every split) and sometimes one or two more, at most one of the disc and one of the
    macula (``hole_mh``: MH is a macular finding)."""
    findings = list(findings)
    order = list(rng.permutation(len(findings)))
    plans: list[list[str]] = []
    k = 0
    for _ in range(n):
        if rng.uniform() < 0.25:
            plans.append([])
            continue
        chosen = [findings[order[k % len(order)]]]
        k += 1
        for _ in range(int(rng.choice(3, p=(0.55, 0.3, 0.15)))):
            extra = findings[int(rng.integers(len(findings)))]
            groups = (DISC_FINDINGS, (MACULAR_FINDINGS | {"MH"}) if hole_mh else MACULAR_FINDINGS)
            clash = any(extra in g and any(c in g for c in chosen) for g in groups)
            if extra not in chosen and not clash:
                chosen.append(extra)
        plans.append([RARE[int(rng.integers(len(RARE)))] if c == "OTHER" else c for c in chosen])
    return plans


def acquire(eye: Eye) -> NDArray[np.uint8]:
    """The camera: exposure, a colour cast, focus, sensor noise, the field stop and JPEG."""
    rng = eye.rng
    img = eye.image * rng.uniform(0.8, 1.2) * np.array(rng.uniform(0.92, 1.08, 3), np.float32)
    img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25)
    blur = rng.uniform(0.0, 1.2)
    if blur > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), blur)
    img = img + rng.normal(0, 0.01, img.shape).astype(np.float32)
    yy, xx = np.mgrid[0 : eye.height, 0 : eye.width]
    outside = np.hypot(xx - eye.centre[0], yy - eye.centre[1]) > eye.radius
    img[outside] = 0.0
    out = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    ok, jpeg = cv2.imencode(
        ".jpg", cv2.cvtColor(out, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(70, 96))]
    )
    decoded = cv2.imdecode(jpeg, cv2.IMREAD_COLOR) if ok else None
    if decoded is None:
        raise RuntimeError("OpenCV could not round-trip a JPEG")
    return np.asarray(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB), np.uint8)


def draw(
    seed: int, columns: Sequence[str], width: int = 640, height: int = 480, *, hole_mh: bool = False
) -> tuple[NDArray[np.uint8], dict[str, NDArray[np.uint8]]]:
    """One photograph with ``columns`` planted, and each masked column's mask (``hole_mh``: ``MH`` drawn
    as a macular hole, masked)."""
    draws, last = ({**DRAW, "MH": macular_hole}, ()) if hole_mh else (DRAW, LAST)
    eye = Eye(np.random.default_rng(seed), width, height, unmasked=(UNMASKED - {"MH"}) if hole_mh else UNMASKED)
    anatomy(eye, tortuous="TV" in columns, thin="RP" in columns)
    for column in sorted(columns, key=lambda c: c in last):
        draws[column](eye, column)
    image = acquire(eye)
    retina = image.max(axis=2) > 0
    masks = {c: m * retina for c, m in eye.masks.items() if c in columns}
    return image, {c: m for c, m in masks.items() if m.any()}


def write(
    out: Path, seed: int, sizes: dict[str, int], findings: Sequence[str] = FINDINGS, *, hole_mh: bool = False
) -> dict[str, int]:
    """Writes photographs in the official RFMiD layout with masks, ``sizes`` by split, drawing only
    ``findings`` (``hole_mh``: ``MH`` as a macular hole)."""
    rng = np.random.default_rng(seed)
    plans = plan_labels(rng, sum(sizes.values()), findings, hole_mh=hole_mh)
    start = 0
    for split, count in sizes.items():
        set_folder, image_folder, csv_name = LAYOUT[split]
        images = out / set_folder / set_folder / image_folder
        images.mkdir(parents=True, exist_ok=True)
        rows = []
        for number in range(1, count + 1):
            columns = plans[start + number - 1]
            image, masks = draw(int(rng.integers(2**31)), columns, hole_mh=hole_mh)
            cv2.imwrite(str(images / f"{number}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            for column, mask in masks.items():
                path = out / set_folder / "Masks" / column / f"{number}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(path), mask * 255)
            row = {c: int(c in columns) for c in RFMID_COLUMNS}
            row[DISEASE_RISK] = int(bool(columns))
            rows.append({"ID": number, **row})
        start += count
        with (out / set_folder / set_folder / csv_name).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["ID", *RFMID_COLUMNS], lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    mh = "macular hole" if hole_mh else "media haze"
    about = {"seed": seed, "splits": sizes, "findings": list(findings), "mh": mh}
    (out / "second_generator.json").write_text(json.dumps(about) + "\n")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (created)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--splits",
        type=int,
        nargs=3,
        default=(400, 120, 120),
        metavar=("TRAIN", "VAL", "TEST"),
        help="photographs in each split (default: the independent set's 400 120 120)",
    )
    parser.add_argument(
        "--findings",
        nargs="+",
        default=FINDINGS,
        metavar="COLUMN",
        help="draw only these findings (named RFMiD diseases or OTHER; default: all)",
    )
    parser.add_argument(
        "--mh-hole", action="store_true", help="draw MH as a macular hole with a mask (default: media haze, no mask)"
    )
    args = parser.parse_args(argv)
    if min(args.splits) < 10:
        parser.error(f"--splits {' '.join(map(str, args.splits))}: each split needs at least 10 photographs")
    if unknown := sorted(set(args.findings) - set(FINDINGS)):
        parser.error(f"--findings: {', '.join(unknown)} are not named RFMiD diseases or OTHER")
    sizes = dict(zip(LAYOUT, args.splits, strict=True))
    print(json.dumps(write(args.out, args.seed, sizes, args.findings, hole_mh=args.mh_hole)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
