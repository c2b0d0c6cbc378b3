"""Draws the heatmap picture: the photograph, Grad-CAM heatmaps of the top findings, and a legend.

The photograph is shown at display size. Each finding's CAM is mapped from the model input back onto
the photograph (:meth:`retinagate.preprocess.Geometry.to_source`) over the retina only
(:func:`retina_heat`: cells off the field of view are zeroed, the map is normalised to its maximum on
the retina and cut at the edge of the field of view, so no heat sits in the black border), and the
strongest of them is blended in a perceptual colour map (viridis: uniform in lightness, readable
by colour-blind readers, and blue-green-yellow stands out against the orange of a fundus) only where
it is high, so the rest of the photograph stays as it was taken. Each finding's peak is marked with its
name; a map shown for context (the Disease_Risk map when no label is a finding) is not marked. A black
panel below the photograph carries the burned-in legend: the findings with their probabilities, the
model's name and version, and the line saying the picture is unverified AI output. A photograph that
was not graded gets a banner saying so and no heat at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import cv2
import numpy as np
from numpy.typing import NDArray

from retinagate.outputs.identity import AI_DISCLAIMER
from retinagate.preprocess import FieldOfView, Geometry

__all__ = ["COLOUR_MAP", "HeatmapFinding", "Legend", "display_shape", "render_heatmaps", "retina_heat"]

#: OpenCV colour map used for the heatmaps.
COLOUR_MAP: Final = cv2.COLORMAP_VIRIDIS

#: The colour map as an RGB lookup table (OpenCV's maps are BGR), for ``cv2.applyColorMap``.
_RGB_LUT: Final = np.ascontiguousarray(
    cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(256, 1), COLOUR_MAP)[:, :, ::-1]
)

#: Heatmaps are mapped onto a grid this many times coarser than the display, then interpolated (a
#: 7 x 7 CAM spread over 1024 pixels has no detail finer than 8 pixels).
_HEAT_STEP: Final = 8

#: Normalised CAM level below which the photograph is left untouched, and the level of full blending.
_HEAT_FLOOR: Final = 0.35
_HEAT_FULL: Final = 0.85
_MAX_ALPHA: Final = 0.6

#: Blending weight (0-255) for each heat level (0-255), from the three constants above.
_ALPHA_LUT: Final = np.round(
    255 * np.clip((np.arange(256) / 255 - _HEAT_FLOOR) * (_MAX_ALPHA / (_HEAT_FULL - _HEAT_FLOOR)), 0.0, _MAX_ALPHA)
).astype(np.uint8)
#: The colour map as a per-channel table for ``cv2.LUT`` on a three-channel image.
_RGB_TABLE: Final = np.ascontiguousarray(_RGB_LUT.reshape(1, 256, 3))

_FONT: Final = cv2.FONT_HERSHEY_SIMPLEX
_WHITE: Final = (255, 255, 255)
_YELLOW: Final = (255, 214, 0)
_GREY: Final = (190, 190, 190)


@dataclass(frozen=True)
class HeatmapFinding:
    """One finding to draw.

    Attributes:
        label: Label name shown on the picture (for example ``DR``).
        probability: The model's probability for it.
        cam: Raw CAM over the model input, any resolution (``(h, w)``); normalised here.
        marked: Whether its peak is marked with its name: a finding is; a map shown only for
            context (a label under its threshold) is not.
    """

    label: str
    probability: float
    cam: NDArray[np.floating]
    marked: bool = True


@dataclass(frozen=True)
class Legend:
    """Text of the burned-in legend.

    Attributes:
        model: Model name and version, as shown.
        lines: Result lines (findings and probabilities), drawn in order after the disclaimer.
        header: Which photograph this is (eye, accession number, study date), drawn first.
    """

    model: str
    lines: tuple[str, ...]
    header: str = ""


def display_shape(source_shape: tuple[int, int], long_side: int) -> tuple[int, int]:
    """``(height, width)`` of the photograph scaled so that its long side is ``long_side``.

    Raises:
        ValueError: If a size is not positive.
    """
    height, width = source_shape
    if height < 1 or width < 1 or long_side < 1:
        raise ValueError(f"source_shape={source_shape}, long_side={long_side}; expected positive sizes")
    factor = long_side / max(height, width)
    return max(1, round(height * factor)), max(1, round(width * factor))


def _font_scale(width: int) -> tuple[float, int, int]:
    """Font scale, stroke thickness and line height for a picture ``width`` pixels wide."""
    scale = max(0.35, width / 1024 * 0.62)
    thickness = max(1, round(scale * 1.6))
    (_, text_h), baseline = cv2.getTextSize("Ag", _FONT, scale, thickness)
    return scale, thickness, text_h + baseline + max(4, round(6 * scale))


def _outlined_text(
    image: NDArray[np.uint8], text: str, origin: tuple[int, int], scale: float, thickness: int, colour: tuple[int, ...]
) -> None:
    cv2.putText(image, text, origin, _FONT, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(image, text, origin, _FONT, scale, colour, thickness, cv2.LINE_AA)


def _retina_cells(geometry: Geometry, fov: FieldOfView | None, shape: tuple[int, int]) -> NDArray[np.bool_]:
    """Cells of a heatmap over the model input whose centre lands on the retina (in the field of view)."""
    visible = geometry.visible_cells(shape)
    if fov is None or not fov.found:
        return visible
    xs, ys = geometry.cell_centres(shape)
    # Pixel centres sit at integers: pixel i covers [i - 0.5, i + 0.5), the FOV mask's [i, i + 1).
    cells = visible & fov.contains(xs[None, :] + 0.5, ys[:, None] + 0.5)
    return cells if cells.any() else visible


def retina_heat(
    cam: NDArray[np.floating], geometry: Geometry, shape: tuple[int, int], fov: FieldOfView | None = None
) -> tuple[NDArray[np.float32], tuple[int, int]] | None:
    """One CAM as heat over the retina only, mapped onto the photograph at ``shape``.

    The CAM's cells whose centre falls off the field of view (the black border, the padding) are
    zeroed, the rest normalised to their maximum, the map taken back onto the photograph and cut to
    the field of view. Without this, a strong cell in a black corner of the crop box became the
    brightest thing on the map, as a hard-edged rectangle.

    Args:
        cam: Raw CAM over the model input, ``(h, w)``.
        geometry: Where the photograph went in the model input.
        shape: ``(height, width)`` to map onto: the photograph at any scale.
        fov: The photograph's field of view (:func:`retinagate.preprocess.find_fov`); without one
            the whole photograph counts as retina.

    Returns:
        The ``float32`` map (0-1) and the ``(row, column)`` of the strongest cell on the retina;
        ``None`` when nothing on the retina is activated.

    Raises:
        ValueError: If the CAM is not 2-D.
    """
    heat = np.asarray(cam, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"cam has shape {heat.shape}; expected a 2-D map")
    cells = _retina_cells(geometry, fov, (heat.shape[0], heat.shape[1]))
    top = float(heat[cells].max(initial=0.0))
    if not math.isfinite(top) or top <= 0.0:
        return None  # nothing activated on the retina: no heatmap to show
    small = np.where(cells, np.clip(heat / top, 0.0, 1.0), 0.0).astype(np.float32)
    mapped = geometry.to_source(small, shape)
    if fov is not None and fov.found:
        mapped *= fov.coverage(shape)
    row, column = np.unravel_index(int(np.argmax(np.where(cells, small, -1.0))), small.shape)
    return mapped, (int(row), int(column))


def render_heatmaps(
    frame: NDArray[np.uint8],
    geometry: Geometry,
    findings: Sequence[HeatmapFinding],
    legend: Legend,
    *,
    long_side: int = 1024,
    fov: FieldOfView | None = None,
    banner: str | None = None,
) -> NDArray[np.uint8]:
    """Renders the Secondary Capture picture.

    Args:
        frame: ``(H, W, 3)`` uint8 RGB photograph, the one ``geometry`` was computed on (it may be a
            reduced decode of the stored image).
        geometry: Where the photograph went in the model input.
        findings: Heatmaps to blend, most important first (only those ``marked`` get a marker).
        legend: Legend text.
        long_side: Long side of the photograph in the picture, in pixels.
        fov: The frame's field of view; heat is drawn only inside it (see :func:`retina_heat`).
        banner: Text written across the top of the photograph (``Not graded: ...``).

    Returns:
        ``(h + legend height, w, 3)`` uint8 RGB: the photograph with heatmaps, the legend panel below.

    Raises:
        ValueError: If the frame is not ``(H, W, 3)`` uint8 or a CAM is not 2-D.
    """
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame has shape {frame.shape} and dtype {frame.dtype}; expected (H, W, 3) uint8")
    height, width = display_shape(frame.shape[:2], long_side)
    shrinking = height <= frame.shape[0]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    if (height, width) == frame.shape[:2]:
        photo = frame.copy()
    else:
        photo = np.asarray(cv2.resize(frame, (width, height), interpolation=interpolation), dtype=np.uint8)

    # Map each CAM onto a grid at 1/_HEAT_STEP of the display (a 7 x 7 CAM has no finer detail);
    # keep the strongest finding per cell.
    low_h, low_w = -(-height // _HEAT_STEP), -(-width // _HEAT_STEP)
    combined = np.zeros((low_h, low_w), dtype=np.float32)
    peaks: list[tuple[str, tuple[int, int]]] = []
    drawn = False
    for finding in findings:
        mapped = retina_heat(finding.cam, geometry, (low_h, low_w), fov)
        if mapped is None:
            continue
        heat, cell = mapped
        np.maximum(combined, heat, out=combined)
        drawn = True
        if finding.marked:
            # The marker: the strongest cell on the retina, mapped exactly (a bilinear map peaks at a
            # node); the coarse grid would place it only to within a grid step.
            cam_h, cam_w = np.shape(finding.cam)
            peaks.append((finding.label, geometry.cell_to_source(cell, (cam_h, cam_w), (height, width))))

    picture: NDArray[np.uint8] = photo
    scale, thickness, _line = _font_scale(width)
    if drawn:
        _blend(picture, combined)
        radius = max(6, width // 90)
        for label, (px, py) in peaks:
            cv2.circle(picture, (px, py), radius, (0, 0, 0), thickness + 2, cv2.LINE_AA)
            cv2.circle(picture, (px, py), radius, _WHITE, thickness, cv2.LINE_AA)
            text_w = int(cv2.getTextSize(label, _FONT, scale, thickness)[0][0])
            tx = px + radius + 4 if px + radius + 4 + text_w < width else max(2, px - radius - 4 - text_w)
            _outlined_text(picture, label, (tx, max(14, py - radius)), scale, thickness, _WHITE)
    if banner:
        big = scale * 1.3
        text = _fit(banner, width - 16, big, thickness + 1)
        (text_w, text_h), _ = cv2.getTextSize(text, _FONT, big, thickness + 1)
        _outlined_text(picture, text, (max(8, (width - text_w) // 2), 12 + text_h), big, thickness + 1, _YELLOW)

    return np.vstack([picture, _legend_panel(width, legend, drawn)])


def _blend(picture: NDArray[np.uint8], heat: NDArray[np.float32]) -> None:
    """Blends the colour-mapped heat (a coarse grid over ``picture``) into ``picture`` in place.

    Only the box where the heat rises over the floor is touched: the rest of the photograph stays
    as it was, and the per-pixel work shrinks to the region of the findings.
    """
    height, width = picture.shape[:2]
    low_h, low_w = heat.shape
    rows, columns = np.nonzero(heat > _HEAT_FLOOR)
    if rows.size == 0:
        return
    # The box on the display, one coarse cell wider each side (interpolation reaches that far).
    y0 = max(0, (int(rows.min()) - 1) * height // low_h)
    y1 = min(height, -(-(int(rows.max()) + 2) * height // low_h))
    x0 = max(0, (int(columns.min()) - 1) * width // low_w)
    x1 = min(width, -(-(int(columns.max()) + 2) * width // low_w))
    # All in 8 bits with lookup tables: heat level -> colour and -> weight; then
    # region * (255 - weight) / 255 + colour * weight / 255, each step one vectorised OpenCV call.
    levels = np.clip(np.rint(heat * 255), 0, 255).astype(np.uint8)
    full = cv2.resize(levels, (width, height), interpolation=cv2.INTER_LINEAR)[y0:y1, x0:x1]
    full3 = cv2.merge([full, full, full])
    colours = cv2.LUT(full3, _RGB_TABLE)
    weight = cv2.LUT(full3, _ALPHA_LUT)
    region = picture[y0:y1, x0:x1]
    kept = cv2.multiply(region, cv2.bitwise_not(weight), scale=1 / 255)
    region[...] = cv2.add(kept, cv2.multiply(colours, weight, scale=1 / 255))


def _legend_panel(width: int, legend: Legend, with_scale: bool) -> NDArray[np.uint8]:
    scale, thickness, line_h = _font_scale(width)
    lines: list[tuple[str, tuple[int, ...]]] = [(legend.header, _WHITE)] if legend.header else []
    lines += [(AI_DISCLAIMER, _YELLOW), (f"Model: {legend.model}", _GREY)]
    lines += [(text, _WHITE) for text in legend.lines]
    margin = max(6, line_h // 2)
    bar_h = line_h if with_scale else 0
    panel = np.zeros((margin * 2 + line_h * len(lines) + bar_h, width, 3), dtype=np.uint8)
    y = margin + line_h - max(4, round(6 * scale))
    for text, colour in lines:
        cv2.putText(panel, _fit(text, width - 2 * margin, scale, thickness), (margin, y), _FONT, scale, colour,
                    thickness, cv2.LINE_AA)  # fmt: skip
        y += line_h
    if with_scale:
        label = "Grad-CAM: low"
        (label_w, _), _ = cv2.getTextSize(label, _FONT, scale, thickness)
        (high_w, _), _ = cv2.getTextSize("high", _FONT, scale, thickness)
        bar_w = max(16, min(width // 3, width - label_w - high_w - 4 * margin))
        top = y - line_h + max(4, round(6 * scale)) + 2
        ramp = np.linspace(_HEAT_FLOOR, 1.0, bar_w, dtype=np.float32)[None, :].repeat(max(4, line_h // 2), 0)
        bar = cv2.applyColorMap((ramp * 255).astype(np.uint8), _RGB_LUT)
        x0 = margin + label_w + margin
        bottom = min(panel.shape[0], top + bar.shape[0])
        panel[top:bottom, x0 : x0 + bar_w] = bar[: bottom - top]
        cv2.putText(panel, label, (margin, y), _FONT, scale, _GREY, thickness, cv2.LINE_AA)
        cv2.putText(panel, "high", (x0 + bar_w + margin, y), _FONT, scale, _GREY, thickness, cv2.LINE_AA)
    return panel


def _fit(text: str, width: int, scale: float, thickness: int) -> str:
    """Shortens ``text`` with an ellipsis until it fits ``width`` pixels."""
    if cv2.getTextSize(text, _FONT, scale, thickness)[0][0] <= width:
        return text
    while len(text) > 1 and cv2.getTextSize(text + "...", _FONT, scale, thickness)[0][0] > width:
        text = text[:-1]
    return text.rstrip() + "..."
